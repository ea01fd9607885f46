"""python -m services.auth --etcd HOST:PORT [--listen HOST:PORT] [--bootstrap-file F]"""
from services.auth.server import AuthApp
from services.common.server import parse_settings, run


def _arguments(parser) -> None:
    parser.add_argument(
        "--bootstrap-file",
        help="JSON {keys: [{access_key, secret_key, tenant, description}]} registered on start if absent "
        "(the launcher writes the admin's and the services' keys here)",
    )


if __name__ == "__main__":
    run(parse_settings("auth", add_arguments=_arguments), AuthApp)
