"""python -m services.gateway --etcd HOST:PORT --listen 127.0.0.1:8500 --rest-listen 127.0.0.1:8501"""
import functools
import os

from services.common.server import parse_settings, run
from services.gateway.server import GatewayApp, GatewaySettings


def _arguments(parser) -> None:
    parser.add_argument("--rest-listen", default=GatewaySettings.rest_listen, help="host:port for the HTTP API")
    parser.add_argument("--dataplane", choices=("auto", "native", "python"),
                        default=os.environ.get("CLOUDML_DATAPLANE", GatewaySettings.dataplane),
                        help="who serves the gRPC port: the native data plane, this process, or native if built "
                             "(see services/gateway/dataplane.py)")
    parser.add_argument("--dataplane-spin-us", type=int,
                        default=int(os.environ["CLOUDML_DATAPLANE_SPIN_US"]) if os.environ.get(
                            "CLOUDML_DATAPLANE_SPIN_US") else None,
                        help="the data plane polls at most this long for a replica's due reply before sleeping "
                             "(default 0: never)")
    parser.add_argument("--dataplane-h2-front", choices=("on", "off"),
                        default=os.environ.get("CLOUDML_DATAPLANE_H2_FRONT", "on"),
                        help="on (default): the data plane speaks HTTP/2 on the public port itself and sends "
                             "model calls with a cached route straight to replicas; off: its gRPC server owns "
                             "the port (one gRPC server and client call per relayed call)")
    parser.add_argument("--dataplane-rest", choices=("on", "off"),
                        default=os.environ.get("CLOUDML_DATAPLANE_REST", "on"),
                        help="on (default): with the native data plane, it owns the REST port too and converts "
                             "repeat predict calls' JSON itself; off: this process serves the REST port")
    parser.add_argument("--dataplane-frames", choices=("on", "off"),
                        default=os.environ.get("CLOUDML_DATAPLANE_FRAMES", "on"),
                        help="on (default): the data plane's HTTP/2 front sends routed model calls to a replica "
                             "over its framed socket where it publishes one (no gRPC hop); off: always gRPC")
    parser.add_argument("--max-request-bytes", type=int,
                        default=int(os.environ.get("CLOUDML_MAX_REQUEST_BYTES") or GatewaySettings.max_request_bytes),
                        help="platform-wide cap on a model call's request size in bytes (default 64 MiB); each "
                             "model's own limit, derived from its replicas' memory, is at most this "
                             "(see services/gateway/predict.py)")


if __name__ == "__main__":
    settings, args = parse_settings("gateway", add_arguments=_arguments)
    run(settings, functools.partial(GatewayApp, settings=GatewaySettings(
        rest_listen=args.rest_listen, dataplane=args.dataplane, dataplane_spin_us=args.dataplane_spin_us,
        dataplane_h2_front=args.dataplane_h2_front == "on", dataplane_rest=args.dataplane_rest == "on",
        dataplane_frames=args.dataplane_frames == "on",
        max_request_bytes=args.max_request_bytes or GatewaySettings.max_request_bytes,
    )))
