"""Browser login links: one-time codes that the gateway trades for a cookie.

Browsers cannot send `Authorization: Bearer`, so a browser page (TensorBoard,
notebooks, the console) is opened through a link the CLI asks for
(CreateLoginLink, as the caller) and the gateway redeems (RedeemLoginLink,
with no token: the code is the credential):

- the code is 160 random bits; etcd holds only its SHA-256 (reading etcd
  gives no usable link), under a lease, with the maker's tenant, access key
  and the page's path;
- it is consumed in one transaction (present -> get + delete): two
  redemptions racing, on one gateway or two, yield one token;
- it expires LOGIN_LINK_TTL seconds after it was made (checked on the
  record's own clock field; the lease only garbage-collects);
- the token issued is an ordinary platform token for the maker's access key
  (LOGIN_TOKEN_TTL), so revoking the key ends the browser session too, and
  every proxied request checks it exactly as a Bearer token is checked.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets

from services.common import errors
from services.common.etcd import Etcd, cmp_present, op_delete, op_get
from services.common.tokens import Principal

#: seconds a login link stays valid
LOGIN_LINK_TTL = 60
#: seconds the token behind a browser cookie stays valid
LOGIN_TOKEN_TTL = 3600
#: the path the gateway redeems links on
LOGIN_PATH = "/login"

# A browser page: /<kind>/<tenant>/<name>/..., the kinds the gateway serves.
_PAGE = re.compile(r"^/(?P<kind>tensorboard|dev)/(?P<tenant>[a-z0-9][-a-z0-9]{0,62})/"
                   r"(?P<name>[a-z0-9][-a-z0-9]{0,62})(?P<rest>/[\x21-\x7e]*)?$")
_REFUSED = "invalid, used or expired login link: ask for a new one"
#: the web console (services/gateway/console): one path for every tenant; the
#: cookie's token says whose data it shows
CONSOLE_PATH = "/ui/"


def page_of(path: str) -> tuple[str, str, str, str]:
    """(kind, tenant, name, cookie path) of a browser page path, or INVALID_ARGUMENT.
    The console ("/ui/") has no tenant or name: ("ui", "", "", "/ui/")."""
    if path == CONSOLE_PATH:
        return "ui", "", "", CONSOLE_PATH
    match = _PAGE.match(path or "")
    rest = (match["rest"] or "") if match else ""
    if (match is None or any(c in rest for c in "?#\\") or "//" in rest
            or any(segment in (".", "..") for segment in rest.split("/"))):
        raise errors.InvalidArgument(
            f"path {path!r} is not a browser page: /tensorboard/<tenant>/<name>/, /dev/<tenant>/<name>/ "
            f"or {CONSOLE_PATH}")
    return match["kind"], match["tenant"], match["name"], f"/{match['kind']}/{match['tenant']}/{match['name']}/"


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class LoginLinks:
    """Makes and redeems login links; `core` signs the tokens (AuthCore)."""

    def __init__(self, core, etcd: Etcd, prefix: str, clock):
        self.core = core
        self.etcd = etcd
        self.prefix = prefix
        self.clock = clock

    async def create(self, caller: Principal, path: str) -> tuple[str, float]:
        """(login path with the code, expiry) for `caller` to open `path`."""
        _, tenant, _, _ = page_of(path)
        if tenant and not caller.may_access(tenant):
            raise errors.NotFound(f"tenant {tenant!r} not found")
        if tenant and tenant != caller.tenant:
            # An admin: the gateway serves a page only to its own tenant's members
            # (services/gateway/pages.py), so a link would only lead to a 404.
            raise errors.PermissionDenied(f"pages of tenant {tenant!r} open only for its own members: "
                                          "use an access key of that tenant")
        code = secrets.token_urlsafe(20)
        expires = self.clock() + LOGIN_LINK_TTL
        record = {"tenant": caller.tenant, "access_key_id": caller.access_key_id, "path": path,
                  "expires": expires}
        lease = await self.etcd.grant_lease(LOGIN_LINK_TTL + 5)
        if not await self.etcd.create(self.prefix + _digest(code), json.dumps(record).encode(), lease=lease):
            raise errors.Conflict("login link collision; retry")
        return f"{LOGIN_PATH}?code={code}", expires

    async def redeem(self, code: str) -> tuple[str, float, str, str]:
        """(token, expiry, page path, cookie path) for a code, consumed at once."""
        if not code or len(code) > 100:
            raise errors.Unauthenticated(_REFUSED)
        key = self.prefix + _digest(code)
        ok, response = await self.etcd.txn([cmp_present(key)], [op_get(key), op_delete(key)])
        if not ok:
            raise errors.Unauthenticated(_REFUSED)
        record = json.loads(response.responses[0].response_range.kvs[0].value)
        if record["expires"] <= self.clock():
            raise errors.Unauthenticated(_REFUSED)
        key_record = await self.core.store.get_access_key(record["access_key_id"])
        if key_record is None or key_record.revoked or key_record.tenant != record["tenant"]:
            raise errors.Unauthenticated(_REFUSED)
        token, expires = self.core.sign_token(key_record, LOGIN_TOKEN_TTL)
        return token, expires, record["path"], page_of(record["path"])[3]
