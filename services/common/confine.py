"""Confinement of every path and URI a tenant gives, and the platform's own
safe reads inside a tenant's tree.

Tenants are hostile. A path or URI that names where a job writes, where its
trainer package is, where a SavedModel is, or where TensorBoard events are,
must stay inside the tenant's storage, `<storage root>/<tenant>/`
(`DATA_DIR/storage/<tenant>/` on the local platform), or use a remote scheme
the platform is configured to allow (`--allowed-uri-schemes`, environment
`CLOUDML_ALLOWED_URI_SCHEMES`, comma-separated; default: none besides file).

    confiner = Confiner(storage_root, allowed_schemes=("s3",))
    where = confiner.check(tenant, spec.output_path, "spec.output_path")
    where.uri        # the normalized form to store
    where.relative   # for local paths: relative to where.root (the tenant's real root)

Rules of `Confiner.check` (each refusal is a typed error whose one-line
message names the field):

- control characters, NUL, more than 4096 characters: INVALID_ARGUMENT;
- chained URIs (anything containing `::`, e.g. `zip://m::file:///x.zip`): INVALID_ARGUMENT,
  since fsspec would open the inner URI with no check;
- a `..` component: INVALID_ARGUMENT, whatever it would resolve to;
- a plain path must be absolute; `file://` URIs must be `file:///absolute/path`
  (`file://localhost/...` too): INVALID_ARGUMENT otherwise;
- a local path must resolve (realpath: `..` normalized, every existing
  symlink resolved) inside the tenant's storage: PERMISSION_DENIED otherwise;
- any other scheme must be in the allow-list: INVALID_ARGUMENT otherwise;
- `http`/`https` (when allowed) must name a host whose every resolved address
  is public: loopback, link-local, private, shared, multicast, unspecified
  and reserved addresses are PERMISSION_DENIED (server-side request forgery).

DNS rebinding: a name may resolve to a public address when checked and to
127.0.0.1 a moment later. `Location.addresses` keeps what the check saw, and
`fetch_http` connects to one of those addresses (the name is only sent as
`Host` and TLS server name) and never follows redirects, so a fetch cannot be
steered elsewhere. fsspec-based fetches of other allowed schemes go to the
platform-configured endpoint of that scheme.

A check is repeated when the path is used (a stored job re-checked by the
scheduler, a symlink planted after the check): `check` is cheap. For reads
the platform does itself as root inside a tenant's tree, `open_beneath` opens
relative to the tenant's root with openat2(RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS), falling back to one
`O_NOFOLLOW` open per component where openat2 is missing; `walk_beneath`
lists a tree through it. Neither ever follows a symlink, so a symlink planted
at any moment makes the open fail (ELOOP/EXDEV) instead of reading another
tenant's files.
"""
from __future__ import annotations

import ctypes
import errno
import http.client
import ipaddress
import os
import re
import socket
import ssl
import stat
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from services.common import errors, validation

MAX_URI = 4096
LOCAL_SCHEMES = ("file", "local")
HTTP_SCHEMES = ("http", "https")
SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_BRACKETED_HOST = re.compile(r"://\[[0-9A-Za-z:.%]*\]")
#: the environment variable the launcher's services read the allow-list from
ALLOWED_SCHEMES_ENV = "CLOUDML_ALLOWED_URI_SCHEMES"


def parse_schemes(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """"s3, https" -> ("https", "s3"); `file` is always allowed and not listed.
    Raises ValueError on a malformed or chained scheme name."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        scheme = item.strip().lower()
        if not scheme or scheme in LOCAL_SCHEMES:
            continue
        if not SCHEME_RE.fullmatch(scheme):
            raise ValueError(f"allowed URI scheme {item!r} is not a scheme name")
        out.add(scheme)
    return tuple(sorted(out))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def address_refusal(text: str) -> str | None:
    """Why the platform must not connect to this IP address, or None."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None):
            if embedded is not None:
                reason = address_refusal(str(embedded))
                if reason:
                    return reason
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if not ip.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Location:
    """A checked path or URI."""

    uri: str                 # the normalized form to store and use
    scheme: str              # "file" for local paths
    path: str = ""           # local: the absolute path as given (normalized)
    root: str = ""           # local: the tenant's storage root, real path
    relative: str = ""       # local: the real path relative to `root` ("" for the root itself)
    host: str = ""           # http(s): the host name
    port: int = 0            # http(s): the port
    addresses: tuple[str, ...] = field(default=())  # http(s): the addresses the check saw

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    @property
    def real_path(self) -> str:
        return os.path.join(self.root, self.relative) if self.relative else self.root


Resolver = Callable[..., list]


class Confiner:
    """The checks of one platform: its storage root and allowed schemes."""

    def __init__(self, storage_root: str, allowed_schemes: Iterable[str] | str = (), *,
                 resolver: Resolver = socket.getaddrinfo):
        self.storage_root = os.path.abspath(storage_root)
        self.allowed = parse_schemes(allowed_schemes)
        self._resolve = resolver

    def tenant_root(self, tenant: str) -> str:
        validation.check_name(tenant, "tenant")
        return os.path.join(self.storage_root, tenant)

    def check(self, tenant: str, value: str, field: str, *, keep_plain: bool = True) -> Location:
        """The checked form of `value` for `field`, or a typed error.
        `keep_plain`: a plain path stays a plain path in `uri` (else file://)."""
        bad = errors.InvalidArgument
        if not value:
            raise bad(f"{field} is required")
        if len(value) > MAX_URI or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise bad(f"{field} is not a valid path or URI (control characters, or over {MAX_URI} characters)")
        if "::" in _BRACKETED_HOST.sub("://host", value, count=1):
            raise bad(f"{field} {value!r}: chained URIs ('::') are not allowed")
        if "://" not in value:
            if not value.startswith("/"):
                raise bad(f"{field} {value!r} must be an absolute path or a URI")
            return self._local(tenant, value, value, field, plain=keep_plain)
        scheme, rest = value.split("://", 1)
        scheme = scheme.lower()
        if not SCHEME_RE.fullmatch(scheme):
            raise bad(f"{field} {value!r}: {scheme!r} is not a URI scheme")
        if scheme in LOCAL_SCHEMES:
            if rest.startswith("localhost/"):
                rest = rest[len("localhost"):]
            if not rest.startswith("/"):
                raise bad(f"{field} {value!r}: a file URI must be file:///absolute/path")
            return self._local(tenant, value, rest, field, plain=False)
        if scheme not in self.allowed:
            allowed = ", ".join(("file",) + self.allowed)
            raise bad(f"{field} {value!r}: the scheme {scheme!r} is not allowed on this platform (allowed: {allowed})")
        self._known_to_fsspec(scheme, value, field)
        if scheme in HTTP_SCHEMES:
            return self._http(value, scheme, field)
        return Location(uri=value, scheme=scheme)

    # --- local -------------------------------------------------------------------------

    def _local(self, tenant: str, value: str, path: str, field: str, *, plain: bool) -> Location:
        if ".." in path.split("/"):
            raise errors.InvalidArgument(f"{field} {value!r}: '..' is not allowed in paths")
        normalized = os.path.normpath("/" + path.lstrip("/"))
        root = self.tenant_root(tenant)
        real_root = os.path.realpath(root)
        real = os.path.realpath(normalized)
        if not _within(real, real_root):
            raise errors.PermissionDenied(
                f"{field} {value!r} is outside tenant {tenant!r}'s own storage ({root}/); local paths must lie "
                "there (upload files with the CLI, which does it for you) or use an allowed remote URI")
        relative = os.path.relpath(real, real_root)
        return Location(uri=normalized if plain else "file://" + normalized, scheme="file", path=normalized,
                        root=real_root, relative="" if relative == "." else relative)

    # --- remote ------------------------------------------------------------------------

    @staticmethod
    def _known_to_fsspec(scheme: str, value: str, field: str) -> None:
        import fsspec  # noqa: PLC0415 - only for remote URIs

        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as err:
            raise errors.InvalidArgument(f"{field} {value!r}: the scheme {scheme!r} is not supported here ({err})") from None

    def _http(self, value: str, scheme: str, field: str) -> Location:
        try:
            parts = urllib.parse.urlsplit(value)
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as err:
            raise errors.InvalidArgument(f"{field} {value!r} is not a valid URL: {err}") from None
        if "@" in parts.netloc:
            raise errors.InvalidArgument(f"{field} {value!r}: credentials in URLs are not allowed")
        host = parts.hostname or ""
        if not host:
            raise errors.InvalidArgument(f"{field} {value!r} names no host")
        try:
            infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as err:
            raise errors.InvalidArgument(f"{field} {value!r}: cannot resolve {host!r}: {err}") from None
        addresses = sorted({info[4][0] for info in infos})
        if not addresses:
            raise errors.InvalidArgument(f"{field} {value!r}: {host!r} has no address")
        for address in addresses:
            reason = address_refusal(address)
            if reason:
                raise errors.PermissionDenied(
                    f"{field} {value!r}: {host} resolves to {address}, {reason}; the platform fetches only from "
                    "public addresses")
        return Location(uri=value, scheme=scheme, host=host, port=port, addresses=tuple(addresses))


def recheck_remote_model(uri: str, allowed_schemes: str | Iterable[str] | None = None) -> Location:
    """A stored version's remote model URI checked again right before the
    platform copies it (services.models.reconciler._fetch), where neither
    the tenant nor the service's settings are at hand: local schemes are not
    fetched at all (replicas read them in place), chained URIs and schemes
    outside the allow-list (`allowed_schemes`, else the
    CLOUDML_ALLOWED_URI_SCHEMES the launcher gave the service) are refused,
    and http(s) too: copying a directory over http means following the links
    of a page the tenant wrote, to any host."""
    if allowed_schemes is None:
        allowed_schemes = os.environ.get(ALLOWED_SCHEMES_ENV, "")
    field = "model_version.model_uri"
    if "://" not in uri or uri.split("://", 1)[0].lower() in LOCAL_SCHEMES:
        raise errors.InvalidArgument(f"{field} {uri!r} is local; it is never fetched")
    refuse_http_directory(uri, field)
    # No local path gets here, so the storage root is never consulted.
    return Confiner("/nonexistent", allowed_schemes).check("fetch", uri, field)


def refuse_http_directory(uri: str, field: str) -> None:
    if uri.split("://", 1)[0].lower() in HTTP_SCHEMES:
        raise errors.InvalidArgument(
            f"{field} {uri!r}: SavedModel directories are not fetched over http(s) (a listing page could send "
            "the platform anywhere); upload the directory (cloudml models create -u DIR) or use object storage")


# --- fetching over http(s), pinned to the checked address ---------------------------------


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def fetch_http(where: Location, out, *, max_bytes: int, timeout: float = 60.0) -> int:
    """GETs a checked http(s) Location into the binary file `out`, connecting
    to the address the check saw; redirects are refused. Returns the size."""
    parts = urllib.parse.urlsplit(where.uri)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    cls = _PinnedHTTPS if where.scheme == "https" else _PinnedHTTP
    conn = cls(where.host, where.addresses[0], where.port, timeout)
    try:
        conn.request("GET", target, headers={"User-Agent": "cloudml-platform", "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if response.status != 200:
            if response.status == 404:
                raise FileNotFoundError(where.uri)
            raise OSError(f"HTTP {response.status} {response.reason} from {where.uri} (redirects are not followed)")
        size = 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                return size
            size += len(chunk)
            if size > max_bytes:
                raise OSError(f"{where.uri} is larger than {max_bytes} bytes")
            out.write(chunk)
    finally:
        conn.close()


# --- safe opens inside a tenant's tree ------------------------------------------------------

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64 (and every arch since Linux 5.6)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    tmpfile = getattr(os, "O_TMPFILE", 0)
    creates = flags & os.O_CREAT or (tmpfile and flags & tmpfile == tmpfile)
    how = _OpenHow(flags, mode if creates else 0, resolve)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _probe_openat2() -> bool:
    try:
        fd = _openat2(-100, "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_NO_MAGICLINKS)
    except OSError as err:
        return err.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL)
    os.close(fd)
    return True


HAVE_OPENAT2 = _probe_openat2()


def _components(relative: str) -> list[str]:
    if "\0" in relative:
        raise OSError(errno.EINVAL, "NUL in path", relative)
    if relative.startswith("/"):
        raise OSError(errno.EXDEV, "absolute path where a relative one is needed", relative)
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, "'..' in a path that must stay beneath its root", relative)
    return parts


def open_root(root: str) -> int:
    """An O_PATH descriptor of a tenant's root directory (never a symlink)."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def open_beneath(root: str | int, relative: str, flags: int = os.O_RDONLY, mode: int = 0o600, *,
                 use_openat2: bool | None = None) -> int:
    """Opens `relative` beneath `root` (a path, or a directory descriptor)
    without following any symlink, and never leaving `root`. Raises OSError
    (ELOOP or EXDEV for a symlink or an escape)."""
    parts = _components(relative)
    own = isinstance(root, str)
    dirfd = open_root(root) if own else root
    flags |= os.O_CLOEXEC
    try:
        if use_openat2 if use_openat2 is not None else HAVE_OPENAT2:
            return _openat2(dirfd, "/".join(parts) or ".", flags, mode,
                            RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
        if not parts:
            return os.open(".", flags, mode, dir_fd=dirfd)
        current = dirfd
        try:
            for part in parts[:-1]:
                step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
                if current != dirfd:
                    os.close(current)
                current = step
            return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=current)
        finally:
            if current != dirfd:
                os.close(current)
    finally:
        if own:
            os.close(dirfd)


def read_beneath(root: str | int, relative: str, max_bytes: int) -> bytes:
    """The content of a regular file beneath `root` (see `open_beneath`)."""
    fd = open_beneath(root, relative, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", relative)
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", relative)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    relative: str        # relative to the walk's root
    size: int
    mtime_ns: int


def walk_beneath(root: str | int, relative: str = "", *, max_entries: int = 100_000) -> Iterator[tuple[str, list[Entry], list[str]]]:
    """Walks the tree at `relative` beneath `root` top-down, never following
    a symlink: yields (directory relative to `root`, its regular files,
    its subdirectory names). Symlinks and special files are skipped;
    directories that cannot be opened (swapped for a symlink meanwhile) are
    skipped. Stops after `max_entries` entries."""
    own = isinstance(root, str)
    rootfd = open_root(root) if own else root
    seen = 0
    try:
        pending = [relative.strip("/")]
        while pending:
            rel = pending.pop()
            try:
                fd = open_beneath(rootfd, rel, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                files, dirs = [], []
                with os.scandir(fd) as it:
                    for entry in it:
                        seen += 1
                        if seen > max_entries:
                            return
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        child = f"{rel}/{entry.name}" if rel else entry.name
                        if stat.S_ISDIR(st.st_mode):
                            dirs.append(entry.name)
                        elif stat.S_ISREG(st.st_mode):
                            files.append(Entry(child, st.st_size, st.st_mtime_ns))
            finally:
                os.close(fd)
            dirs.sort()
            files.sort(key=lambda e: e.relative)
            yield rel, files, dirs
            pending.extend(f"{rel}/{d}" if rel else d for d in reversed(dirs))
    finally:
        if own:
            os.close(rootfd)


def tree_bytes(root: str, *, max_entries: int = 1_000_000) -> int:
    """Bytes of the regular files under `root` (0 if it does not exist)."""
    if not os.path.isdir(root):
        return 0
    return sum(e.size for _, files, _ in walk_beneath(root, max_entries=max_entries) for e in files)
