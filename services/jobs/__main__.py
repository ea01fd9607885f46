"""python -m services.jobs --etcd HOST:PORT --data-dir DIR --credentials-file C
[--listen 127.0.0.1:0] [--port-file F] [--runtime local|kubernetes]
[--kubeconfig FILE] [--namespace NS] [--image IMAGE] [--storage-claim PVC] [--package-cache-claim PVC]
[--default-cpu 0.5] [--default-memory 2Gi] [--default-gpus 0]
[--capacity-cpu N] [--capacity-memory M] [--stop-grace S] [--envs-dir D] [--install-arg ARG ...]
[--max-tensorboards 5] [--tensorboard-idle-seconds 14400] [--tensorboard-cpu 0.5] [--tensorboard-memory 1Gi]
[--dev-idle-seconds 14400] [--dev-cpu 1] [--dev-memory 2Gi] [--gateway-endpoint HOST:PORT]
[--etcd-compact-seconds 300] [--etcd-keep-revisions 10000] [--etcd-defrag-bytes 128Mi] [--etcd-stats-seconds 30]
(and the common flags, --archive-uri, --retention-seconds and --archive-seconds among them)

The jobs service never imports TensorFlow (tests/unit/test_jobs_no_tensorflow.py).
Files under DIR: jobs/<tenant>/<job>/ (logs, metrics files, package, work
dir), envs/ (trainer environments by package hash), runtime/local/ (the local
runtime's replica records and capacity, shared with other services),
storage/<tenant>/jobs/<job>/ (the default output_path), tensorboards/<tenant>/<name>.<uid>/
(a TensorBoard replica's work dir and log), devenvs/<tenant>/<name>.<uid>/ (a dev
environment's config, log and home; its notebooks live in storage/<tenant>/).
"""
import functools

from cloudml import units
from services.common.etcd_maintenance import EtcdMaintenanceSettings
from services.common.runtime.factory import RUNTIMES
from services.common.server import parse_settings, run
from services.jobs.core import Defaults
from services.jobs.server import JobsApp, JobsSettings
from services.jobs.devenvs import DevEnvSettings
from services.jobs.tensorboards import TensorBoardSettings


def _type(parse):
    import argparse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _arguments(parser) -> None:
    parser.add_argument("--runtime", default=JobsSettings.runtime, choices=RUNTIMES, help="where replicas run")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubernetes runtime: the API server and credentials (default: in-cluster service account)")
    parser.add_argument("--namespace", default=None,
                        help="kubernetes runtime: the namespace of the replicas' Pods (default: the service account's)")
    parser.add_argument("--image", default=None,
                        help="kubernetes runtime: the trainer image of jobs that name none")
    parser.add_argument("--storage-claim", default=None,
                        help="kubernetes runtime: the PersistentVolumeClaim of DIR/storage (a Pod mounts its "
                             "tenant's directory of it at the same path)")
    parser.add_argument("--package-cache-claim", default=None,
                        help="kubernetes runtime: a PersistentVolumeClaim for trainer environments (per tenant)")
    parser.add_argument("--default-cpu", type=_type(units.parse_cpu), default=None,
                        help="per-replica CPU when a spec gives none (default 0.5)")
    parser.add_argument("--default-memory", type=_type(units.parse_memory), default=None,
                        help="per-replica memory limit when a spec gives none (default 2Gi)")
    parser.add_argument("--default-gpus", type=int, default=None, help="per-replica GPUs by default (0)")
    parser.add_argument("--capacity-cpu", type=_type(units.parse_cpu), default=None,
                        help="the local runtime's CPU capacity (default: the machine's cores)")
    parser.add_argument("--capacity-memory", type=_type(units.parse_memory), default=None,
                        help="the local runtime's memory capacity (default: physical memory - 1Gi)")
    parser.add_argument("--stop-grace", type=float, default=JobsSettings.stop_grace,
                        help="seconds between SIGTERM and SIGKILL when replicas are stopped")
    parser.add_argument("--base-python", default=None,
                        help="the interpreter trainer environments are built on (default: this one)")
    parser.add_argument("--envs-dir", default=None,
                        help="where trainer environments are cached (default DIR/envs)")
    parser.add_argument("--install-arg", action="append", default=[],
                        help="extra `uv pip install` argument for trainer packages (repeatable)")
    parser.add_argument("--max-tensorboards", type=int, default=TensorBoardSettings.max_per_tenant,
                        help="TensorBoards a tenant may have at once")
    parser.add_argument("--tensorboard-idle-seconds", type=float, default=TensorBoardSettings.idle_seconds,
                        help="a TensorBoard with no page request for this long is deleted")
    parser.add_argument("--tensorboard-cpu", type=_type(units.parse_cpu), default=TensorBoardSettings.cpu_millis,
                        help="CPU a TensorBoard holds of its tenant's quota (default 0.5)")
    parser.add_argument("--tensorboard-memory", type=_type(units.parse_memory),
                        default=TensorBoardSettings.memory_bytes,
                        help="memory limit of a TensorBoard, held of its tenant's quota (default 1Gi)")
    parser.add_argument("--dev-idle-seconds", type=float, default=DevEnvSettings.idle_seconds,
                        help="a dev environment with no page request and no kernel activity for this long "
                             "is stopped (default 4 h)")
    parser.add_argument("--dev-cpu", type=_type(units.parse_cpu), default=DevEnvSettings.cpu_millis,
                        help="CPU of a dev environment that asks for none (default 1)")
    parser.add_argument("--dev-memory", type=_type(units.parse_memory), default=DevEnvSettings.memory_bytes,
                        help="memory limit of a dev environment that asks for none (default 2Gi)")
    parser.add_argument("--dev-port", type=int, default=DevEnvSettings.port,
                        help="kubernetes runtime: the port of a dev environment's notebook server in its Pod")
    parser.add_argument("--gateway-endpoint", default=None,
                        help="the gateway's gRPC address written into dev environments' kernels "
                             "(default: DIR/credentials.json's endpoint)")
    maintenance = EtcdMaintenanceSettings
    parser.add_argument("--etcd-compact-seconds", type=float, default=maintenance.compact_seconds,
                        help="the leader compacts etcd's history this often (default 300)")
    parser.add_argument("--etcd-keep-revisions", type=int, default=maintenance.keep_revisions,
                        help="revisions of history kept at each compaction (default 10000)")
    parser.add_argument("--etcd-defrag-bytes", type=_type(units.parse_memory), default=maintenance.defrag_bytes,
                        help="etcd is defragmented once its file is this large and a quarter of it, or half of "
                             "this, is free (default 128Mi)")
    parser.add_argument("--etcd-stats-seconds", type=float, default=maintenance.stats_seconds,
                        help="how often etcd's size and key counts are exported as metrics (default 30)")


def _jobs_settings(args) -> JobsSettings:
    return JobsSettings(
        runtime=args.runtime, kubeconfig=args.kubeconfig, namespace=args.namespace, image=args.image,
        storage_claim=args.storage_claim, package_cache_claim=args.package_cache_claim,
        defaults=Defaults(cpu_millis=args.default_cpu or Defaults.cpu_millis,
                          memory_bytes=args.default_memory or Defaults.memory_bytes,
                          gpus=args.default_gpus or Defaults.gpus),
        capacity_cpu=args.capacity_cpu, capacity_memory=args.capacity_memory,
        stop_grace=args.stop_grace, base_python=args.base_python, envs_dir=args.envs_dir,
        install_args=tuple(args.install_arg or ()),
        max_tensorboards=args.max_tensorboards, tensorboard_idle_seconds=args.tensorboard_idle_seconds,
        tensorboard_cpu=args.tensorboard_cpu, tensorboard_memory=args.tensorboard_memory,
        dev_idle_seconds=args.dev_idle_seconds, dev_cpu=args.dev_cpu, dev_memory=args.dev_memory,
        dev_port=args.dev_port,
        gateway_endpoint=args.gateway_endpoint,
        etcd_maintenance=EtcdMaintenanceSettings(
            compact_seconds=args.etcd_compact_seconds, keep_revisions=args.etcd_keep_revisions,
            defrag_bytes=args.etcd_defrag_bytes, stats_seconds=args.etcd_stats_seconds),
    )


if __name__ == "__main__":
    settings, args = parse_settings("jobs", add_arguments=_arguments)
    run(settings, functools.partial(JobsApp, settings=_jobs_settings(args)))
