"""python -m services.gateway --etcd HOST:PORT --listen 127.0.0.1:8500 --rest-listen 127.0.0.1:8501"""
from services.common.server import parse_settings, run
from services.gateway.server import GatewayApp


def _arguments(parser) -> None:
    parser.add_argument("--rest-listen", default="127.0.0.1:8501", help="host:port for the HTTP API")


if __name__ == "__main__":
    run(parse_settings("gateway", add_arguments=_arguments), GatewayApp)
