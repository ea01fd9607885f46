"""python -m services.jobs --etcd HOST:PORT --data-dir DIR --credentials-file C
[--listen 127.0.0.1:0] [--port-file F] [--runtime local]
[--default-cpu 0.5] [--default-memory 2Gi] [--default-gpus 0]
[--capacity-cpu N] [--capacity-memory M] [--stop-grace S] [--envs-dir D] [--install-arg ARG ...]

The jobs service never imports TensorFlow (tests/unit/test_jobs_no_tensorflow.py).
Files under DIR: jobs/<tenant>/<job>/ (logs, metrics files, package, work
dir), envs/ (trainer environments by package hash), runtime/local/ (the local
runtime's replica records and capacity, shared with other services),
storage/<tenant>/jobs/<job>/ (the default output_path).
"""
from cloudml import units
from services.common.server import parse_settings, run
from services.jobs.server import JobsApp


def _type(parse):
    import argparse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _arguments(parser) -> None:
    parser.add_argument("--runtime", default="local", choices=("local",), help="where replicas run")
    parser.add_argument("--default-cpu", type=_type(units.parse_cpu), default=None,
                        help="per-replica CPU when a spec gives none (default 0.5)")
    parser.add_argument("--default-memory", type=_type(units.parse_memory), default=None,
                        help="per-replica memory limit when a spec gives none (default 2Gi)")
    parser.add_argument("--default-gpus", type=int, default=None, help="per-replica GPUs by default (0)")
    parser.add_argument("--capacity-cpu", type=_type(units.parse_cpu), default=None,
                        help="the local runtime's CPU capacity (default: the machine's cores)")
    parser.add_argument("--capacity-memory", type=_type(units.parse_memory), default=None,
                        help="the local runtime's memory capacity (default: physical memory - 1Gi)")
    parser.add_argument("--stop-grace", type=float, default=3.0,
                        help="seconds between SIGTERM and SIGKILL when replicas are stopped")
    parser.add_argument("--base-python", default=None,
                        help="the interpreter trainer environments are built on (default: this one)")
    parser.add_argument("--envs-dir", default=None,
                        help="where trainer environments are cached (default DIR/envs)")
    parser.add_argument("--install-arg", action="append", default=[],
                        help="extra `uv pip install` argument for trainer packages (repeatable)")


if __name__ == "__main__":
    run(parse_settings("jobs", add_arguments=_arguments), JobsApp)
