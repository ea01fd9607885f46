"""python -m services.gateway --etcd HOST:PORT --listen 127.0.0.1:8500 --rest-listen 127.0.0.1:8501"""
import os

from services.common.server import parse_settings, run
from services.gateway.server import GatewayApp


def _arguments(parser) -> None:
    parser.add_argument("--rest-listen", default="127.0.0.1:8501", help="host:port for the HTTP API")
    parser.add_argument("--dataplane", choices=("auto", "native", "python"),
                        default=os.environ.get("CLOUDML_DATAPLANE", "auto"),
                        help="who serves the gRPC port: the native data plane, this process, or native if built "
                             "(see services/gateway/dataplane.py)")
    parser.add_argument("--dataplane-spin-us", type=int,
                        default=int(os.environ["CLOUDML_DATAPLANE_SPIN_US"]) if os.environ.get(
                            "CLOUDML_DATAPLANE_SPIN_US") else None,
                        help="the data plane polls this long after each event before sleeping (default 1000; 0: never)")
    parser.add_argument("--max-request-bytes", type=int,
                        default=int(os.environ.get("CLOUDML_MAX_REQUEST_BYTES") or 64 * 1024 * 1024),
                        help="platform-wide cap on a model call's request size in bytes (default 64 MiB); each "
                             "model's own limit, derived from its replicas' memory, is at most this "
                             "(see services/gateway/predict.py)")


if __name__ == "__main__":
    run(parse_settings("gateway", add_arguments=_arguments), GatewayApp)
