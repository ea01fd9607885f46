#!/usr/bin/env python3
"""Calls a model deployed on Cloud-ML through the gateway with the stock
TensorFlow Serving gRPC client, unmodified, as any app would (the seed's
client, with a bearer token added).

    python examples/predict_client.py --endpoint 127.0.0.1:8500 --model linear \
        --token "$(cloudml auth print-access-token)" \
        --input keys:int32:1,2 --input X:float32:10,30

Each --input is NAME:DTYPE:comma-separated values, sent as a column [n, 1].
On an error it prints one line, `error: <STATUS_CODE>: <message>`, on stderr
and exits 1 (2 for a malformed --input).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _quiet_native_stderr() -> None:
    """TensorFlow's C++ side prints CUDA probing and absl notices on file
    descriptor 2, some before its logging starts (so TF_CPP_MIN_LOG_LEVEL
    cannot stop them). Unless TF_CPP_MIN_LOG_LEVEL=0 asks for them, fd 2 goes
    to /dev/null and Python's own stderr (this script's error line, a
    traceback) keeps the real one."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(real, "w", buffering=1)


_quiet_native_stderr()

import grpc  # noqa: E402
import numpy as np  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="127.0.0.1:8500")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=int)
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument("--token", default="", help="bearer token (omit for a public model)")
    parser.add_argument("--input", action="append", required=True, help="NAME:DTYPE:v1,v2,...")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    columns = {}
    for item in args.input:
        try:
            name, dtype, values = item.split(":", 2)
            columns[name] = np.array([float(v) for v in values.split(",")], dtype=dtype).reshape(-1, 1)
        except (ValueError, TypeError) as err:
            print(f"error: --input {item!r}: expected NAME:DTYPE:v1,v2,... ({err})", file=sys.stderr)
            return 2

    import tensorflow as tf  # noqa: PLC0415 - seconds to import: only once the arguments are good
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: PLC0415

    request = predict_pb2.PredictRequest()
    request.model_spec.name = args.model
    request.model_spec.signature_name = args.signature
    if args.version:
        request.model_spec.version.value = args.version
    for name, column in columns.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(column))

    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        with grpc.insecure_channel(args.endpoint) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(request, args.timeout, metadata=metadata)
    except grpc.RpcError as err:
        details = " ".join((err.details() or "").split())
        print(f"error: {err.code().name}: {details}", file=sys.stderr)
        return 1
    result = {name: tf.make_ndarray(tensor).tolist() for name, tensor in response.outputs.items()}
    print(json.dumps({"model_spec": {"name": response.model_spec.name,
                                     "version": response.model_spec.version.value,
                                     "signature_name": response.model_spec.signature_name},
                      "outputs": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
