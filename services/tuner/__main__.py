"""python -m services.tuner --etcd HOST:PORT --data-dir DIR --credentials-file C
[--listen 127.0.0.1:0] [--port-file F] [--poll-seconds S]

The tuner service never imports TensorFlow. It calls the jobs service (trial
jobs) and the auth service (the `studies` quota) with the service key in C.
Trials write under DIR/storage/<tenant>/studies/<study>/<n> unless the trial
template names an output_path.
"""
import functools

from services.common.server import parse_settings, run
from services.tuner.server import TunerApp, TunerSettings


def _arguments(parser) -> None:
    parser.add_argument("--poll-seconds", type=float, default=TunerSettings.poll_seconds,
                        help="how often the driver reads running trials' metrics for early stopping")


if __name__ == "__main__":
    settings, args = parse_settings("tuner", add_arguments=_arguments)
    run(settings, functools.partial(TunerApp, settings=TunerSettings(poll_seconds=args.poll_seconds)))
