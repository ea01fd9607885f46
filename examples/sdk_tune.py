#!/usr/bin/env python3
"""Tune with the Python SDK: submit a study from a spec file, watch its
progress, print the best trial.

    python examples/build_packages.py pkgs --only plain
    python examples/sdk_tune.py examples/studies/plain_space.json --package pkgs/plain_trainer-1.0.tar.gz

The spec is a study in the seed's layout (examples/studies/*.json); --package
replaces its trainer_uri (a local package is uploaded). Exit code 0 when the
study succeeded, 1 otherwise, with one line on stderr for any error.
"""
from __future__ import annotations

import argparse
import sys

import cloudml
from cloudml import errors


def show(study) -> None:
    counts = study.counts
    done = counts["succeeded"] + counts["failed"] + counts["early_stopped"] + counts["cancelled"]
    best = study.best_trial
    best_text = f", best {study.metric}={best.objective:.4g} (trial {best.number})" if best else ""
    print(f"  {done}/{study.max_trials} done, {counts['running']} running, {counts['pending']} queued{best_text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a study spec file (examples/studies/*.json)")
    parser.add_argument("--package", help="the trainer package (replaces the file's trainer_uri)")
    parser.add_argument("--name", help="the study's name (default: the file's job_name)")
    args = parser.parse_args()

    try:
        with cloudml.Client() as client:
            study = client.studies.submit(args.spec, name=args.name, package=args.package)
            print(f"study {study.name}: {study.goal} {study.metric}, {study.max_trials} trials")
            study = client.studies.wait(study.name, progress=show, poll=0.5)
            print(f"study {study.name}: {study.state}")
            for trial in client.studies.trials(study.name):
                print(f"  trial {trial.number}: {trial.state} {study.metric}={trial.objective} {trial.params}")
            best = client.studies.best(study.name)
            if best is not None:
                print(f"best: trial {best.number} {best.params} {study.metric}={best.objective:.6g}")
            return 0 if study.succeeded else 1
    except errors.CloudMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
