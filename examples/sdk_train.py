#!/usr/bin/env python3
"""Train with the Python SDK: submit the linear example trainer as a job,
follow its logs, wait for it, print its loss curve and where the SavedModel is.

    python examples/build_packages.py pkgs --only linear
    python examples/sdk_train.py pkgs/trainer-1.0.tar.gz --name linear --epochs 10

Credentials as for the CLI (CLOUDML_ENDPOINT / CLOUDML_ACCESS_KEY /
CLOUDML_SECRET_KEY, or `cloudml configure`). The last line printed is the
SavedModel directory (for examples/sdk_deploy_predict.py). Exit code 0 when
the job succeeded, 1 otherwise, with one line on stderr for any error.
"""
from __future__ import annotations

import argparse
import sys

import cloudml
from cloudml import errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="the trainer package (.tar.gz) on this machine, or a URI")
    parser.add_argument("--name", default="linear")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    try:
        with cloudml.Client() as client:
            job = client.jobs.submit(args.name, module="trainer.task", package=args.package,
                                     args=["--max_epochs", str(args.epochs)], cpu="0.5", memory="1Gi")
            print(f"job {job.name}: {job.state}" + ("" if job.created else " (submitted before)"))
            for line in client.jobs.logs(job.name, follow=True):
                print(line)
            job = client.jobs.wait(job.name)
            print(f"job {job.name}: {job.state} {job.reason} {job.message}".rstrip())
            if not job.succeeded:
                return 1
            for series in client.jobs.metrics(job.name).series("loss"):
                print(f"loss ({series.replica}): " + " ".join(f"{v:.3f}" for v in series.values))
            output = job.output_path.removeprefix("file://").rstrip("/")
            print(f"{output}/model/1")
            return 0
    except errors.CloudMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
