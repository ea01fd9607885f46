"""python -m services.models --etcd HOST:PORT --listen 127.0.0.1:0 --port-file F --data-dir DIR --credentials-file C"""
from cloudml import units
from services.common.server import parse_settings, run
from services.models.server import ModelsApp


def _arguments(parser) -> None:
    parser.add_argument("--runtime", default="local", choices=("local",), help="where replicas run")
    parser.add_argument("--storage-dir", help="the platform's storage root (default DIR/storage)")
    parser.add_argument("--default-cpu", dest="default_cpu_millis", type=units.parse_cpu, default=500,
                        help="cpu per replica when a version names none (default 500m)")
    parser.add_argument("--default-memory", dest="default_memory_bytes", type=units.parse_memory,
                        default=2 * 2**30, help="memory per replica when a version names none (default 2Gi)")
    parser.add_argument("--capacity-cpu", type=units.parse_cpu, default=None,
                        help="the local runtime's CPU capacity (default: the machine's cores)")
    parser.add_argument("--capacity-memory", type=units.parse_memory, default=None,
                        help="the local runtime's memory capacity (default: physical memory - 1Gi)")
    parser.add_argument("--stop-grace", type=float, default=30.0,
                        help="seconds a stopping replica may drain before it is killed")
    parser.add_argument("--target-inflight", type=float, default=4.0,
                        help="autoscaling: in-flight requests per replica to aim for")
    parser.add_argument("--scale-down-delay", type=float, default=60.0,
                        help="autoscaling: seconds of lower demand before replicas are removed")


if __name__ == "__main__":
    run(parse_settings("models", add_arguments=_arguments), ModelsApp)
