"""python -m services.auth --etcd HOST:PORT --key-encryption-key-file F [--listen HOST:PORT] [--bootstrap-file F]"""
import functools
import os

from services.auth.server import AuthApp, AuthSettings
from services.common.server import parse_settings, run

KEK_ENV = "CLOUDML_KEY_ENCRYPTION_KEY_FILE"


def _arguments(parser) -> None:
    parser.add_argument(
        "--bootstrap-file",
        help="JSON {keys: [{access_key, secret_key, tenant, description}]} registered on start if absent "
        "(the launcher writes the admin's and the services' keys here)",
    )
    parser.add_argument(
        "--key-encryption-key-file", default=os.environ.get(KEK_ENV),
        help="file holding the 32-byte key that encrypts the token signing keys at rest in etcd (mode 0600, "
        "outside etcd); created if absent, unless etcd already holds keys encrypted with another one. "
        f"Required (default ${KEK_ENV})",
    )


if __name__ == "__main__":
    settings, args = parse_settings("auth", add_arguments=_arguments)
    if not args.key_encryption_key_file:
        raise SystemExit(f"error: --key-encryption-key-file (or ${KEK_ENV}) is required: the token signing "
                         "keys are stored in etcd only encrypted with that key")
    auth = AuthSettings(key_encryption_key_file=os.path.abspath(args.key_encryption_key_file),
                        bootstrap_file=args.bootstrap_file)
    run(settings, functools.partial(AuthApp, settings=auth))
