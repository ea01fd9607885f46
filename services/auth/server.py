"""The auth service's app: the servicer plus bootstrap of the first start."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc
from services.auth.core import AuthCore
from services.auth.kek import KeyEncryptionError
from services.auth.login import LoginLinks
from services.auth.servicer import AuthServicer
from services.common.server import Platform, ServiceApp

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["AuthService"].full_name
#: exit status when the key-encryption key file is unusable or wrong
EXIT_KEY_ENCRYPTION = 78  # EX_CONFIG


@dataclass(frozen=True)
class AuthSettings:
    """The auth service's own flags (`python -m services.auth --help`), built in its __main__."""

    #: the file holding the key that encrypts the token signing keys at rest (absolute)
    key_encryption_key_file: str
    #: JSON {keys: [...]} registered on start if absent
    bootstrap_file: str | None = None


class AuthApp(ServiceApp):
    grpc_services = (SERVICE,)
    public_methods = frozenset({f"/{SERVICE}/IssueToken", f"/{SERVICE}/WatchVerificationKeys",
                                f"/{SERVICE}/RedeemLoginLink"})
    provides_verification_keys = True

    def __init__(self, platform: Platform, settings: AuthSettings):
        super().__init__(platform)
        self.core = AuthCore(platform.etcd, platform.verifier, settings.key_encryption_key_file)
        self.bootstrap_file = settings.bootstrap_file
        self.login = LoginLinks(self.core, platform.etcd, self.core.keys.login, self.core.clock)

    def add_to_server(self, server) -> None:
        pb_grpc.add_AuthServiceServicer_to_server(AuthServicer(self.core, self.login), server)

    async def start(self) -> None:
        keys = []
        if self.bootstrap_file:
            with open(self.bootstrap_file) as f:
                keys = json.load(f).get("keys", [])
        try:
            await self.core.start(keys)
        except KeyEncryptionError as err:
            # Not worth a retry, and starting with new signing keys would
            # invalidate every token: stop the process with the reason.
            log.critical("cannot start: %s", err)
            raise SystemExit(EXIT_KEY_ENCRYPTION) from None

    def ready(self) -> bool:
        return self.core.ready()

    async def stop(self) -> None:
        await self.core.stop()
