#!/usr/bin/env python3
"""Deploy and call a model with the Python SDK: upload a SavedModel, wait
until its replicas are ready, label the version, and call Predict with numpy.

    python examples/sdk_deploy_predict.py ./.demo/storage/team-a/.../model/1 --name linear

It prints the predictions of y = 2x + 10 for x = 10 and 30 (the linear
example's model), then shows what a mistyped model name answers. Exit code
0 on success, 1 with one line on stderr for any error.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import cloudml
from cloudml import errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved_model", help="a SavedModel directory on this machine (or a URI)")
    parser.add_argument("--name", default="linear")
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()

    try:
        with cloudml.Client() as client:
            version = client.models.create(
                args.name, args.saved_model, version=1, replicas=args.replicas, cpu="0.5", memory="1Gi",
                wait=True, timeout=300,
                progress=lambda ready, wanted, state: print(f"  {state.lower()}: {ready}/{wanted} replicas ready"))
            print(f"model {version.model} v{version.version}: {version.state}, "
                  f"{version.ready_replicas}/{version.desired_replicas} replicas ready")
            client.models.label(args.name, "stable", version.version)

            x = np.array([[10.0], [30.0]], dtype=np.float32)
            outputs = client.models.predict(args.name, {"keys": np.array([[1], [2]]), "X": x}, label="stable")
            for name, values in sorted(outputs.items()):
                print(f"{name}: {values.ravel().tolist()}")

            try:
                client.models.predict(args.name + "-typo", [[1.0]])
            except errors.NotFound as err:
                print(f"a mistyped name: {err.code}: {err.message}")
            return 0
    except errors.CloudMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
