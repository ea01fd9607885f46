"""python -m services.models --etcd HOST:PORT --listen 127.0.0.1:0 --port-file F --data-dir DIR --credentials-file C
[--runtime local|kubernetes] [--kubeconfig FILE] [--namespace NS] [--model-image IMAGE] [--storage-claim PVC]
[--replica-port 8500]"""
import functools

from cloudml import units
from services.common.runtime.factory import RUNTIMES
from services.common.server import parse_settings, run
from services.models.rules import Defaults
from services.models.server import ModelsApp, ModelsSettings


def _arguments(parser) -> None:
    parser.add_argument("--runtime", default=ModelsSettings.runtime, choices=RUNTIMES, help="where replicas run")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubernetes runtime: the API server and credentials (default: in-cluster service account)")
    parser.add_argument("--namespace", default=None,
                        help="kubernetes runtime: the namespace of the replicas' Pods (default: the service account's)")
    parser.add_argument("--model-image", default=ModelsSettings.model_image,
                        help=f"kubernetes runtime: the model-server image (default {ModelsSettings.model_image})")
    parser.add_argument("--storage-claim", default=None,
                        help="kubernetes runtime: the PersistentVolumeClaim of the storage (a Pod mounts its "
                             "tenant's directory of it at the same path)")
    parser.add_argument("--replica-port", type=int, default=ModelsSettings.replica_port,
                        help="kubernetes runtime: the port model servers listen on in their Pods")
    parser.add_argument("--storage-dir", help="the platform's storage root (default DIR/storage)")
    parser.add_argument("--default-cpu", dest="default_cpu_millis", type=units.parse_cpu, default=Defaults.cpu_millis,
                        help="cpu per replica when a version names none (default 500m)")
    parser.add_argument("--default-memory", dest="default_memory_bytes", type=units.parse_memory,
                        default=Defaults.memory_bytes, help="memory per replica when a version names none (default 2Gi)")
    parser.add_argument("--capacity-cpu", type=units.parse_cpu, default=None,
                        help="the local runtime's CPU capacity (default: the machine's cores)")
    parser.add_argument("--capacity-memory", type=units.parse_memory, default=None,
                        help="the local runtime's memory capacity (default: physical memory - 1Gi)")
    parser.add_argument("--stop-grace", type=float, default=ModelsSettings.stop_grace,
                        help="seconds a stopping replica may drain before it is killed")
    parser.add_argument("--target-inflight", type=float, default=ModelsSettings.target_inflight,
                        help="autoscaling: in-flight requests per replica to aim for")
    parser.add_argument("--scale-down-delay", type=float, default=ModelsSettings.scale_down_delay,
                        help="autoscaling: seconds of lower demand before replicas are removed")


if __name__ == "__main__":
    settings, args = parse_settings("models", add_arguments=_arguments)
    run(settings, functools.partial(ModelsApp, settings=ModelsSettings(
        runtime=args.runtime, storage_dir=args.storage_dir, kubeconfig=args.kubeconfig, namespace=args.namespace,
        model_image=args.model_image, storage_claim=args.storage_claim, replica_port=args.replica_port,
        defaults=Defaults(cpu_millis=args.default_cpu_millis, memory_bytes=args.default_memory_bytes),
        capacity_cpu=args.capacity_cpu, capacity_memory=args.capacity_memory, stop_grace=args.stop_grace,
        target_inflight=args.target_inflight, scale_down_delay=args.scale_down_delay,
    )))
