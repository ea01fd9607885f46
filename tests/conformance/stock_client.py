"""The stock TensorFlow Serving client, driven from a helper process.

Test processes never import TensorFlow or `tensorflow_serving`: other test
modules import the project's own copies of TF Serving's protos
(`cloudml.tfs`), which define the same protobuf symbols. So a conformance
test file runs itself, or a probe module beside it, as a helper (`python
<file> --probe`), which calls
`serve()` here: it reads JSON commands on stdin, builds requests with
`tf.make_tensor_proto`, calls with the official stubs, and answers JSON lines
marked with MARK. The test side talks to it through `Probe`.

Commands every probe understands: `call` (one RPC), `concurrent` (many RPCs
at once), `latency` (p50/p99 of sequential calls); a test file adds its own
(e.g. building models) through `serve(extra)`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable

MARK = "@@PROBE@@ "


def serve(extra: dict[str, Callable[[dict], object]] | None = None) -> None:  # pragma: no cover - helper process
    import grpc
    import numpy as np
    import tensorflow as tf
    from google.protobuf import json_format
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        inference_pb2,
        model_management_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
        regression_pb2,
    )

    requests = {
        "Predict": predict_pb2.PredictRequest,
        "Classify": classification_pb2.ClassificationRequest,
        "Regress": regression_pb2.RegressionRequest,
        "MultiInference": inference_pb2.MultiInferenceRequest,
        "GetModelMetadata": get_model_metadata_pb2.GetModelMetadataRequest,
        "GetModelStatus": get_model_status_pb2.GetModelStatusRequest,
        "HandleReloadConfigRequest": model_management_pb2.ReloadConfigRequest,
    }
    channels: dict[str, grpc.Channel] = {}

    def stub_method(address: str, method: str):
        if address not in channels:
            channels[address] = grpc.insecure_channel(address)
        channel = channels[address]
        if method in ("GetModelStatus", "HandleReloadConfigRequest"):
            return getattr(model_service_pb2_grpc.ModelServiceStub(channel), method)
        return getattr(prediction_service_pb2_grpc.PredictionServiceStub(channel), method)

    def make_request(cmd):
        request = json_format.ParseDict(cmd.get("request", {}), requests[cmd["method"]]())
        for alias, spec in cmd.get("tensors", {}).items():
            value = spec["value"]
            if spec.get("dtype") == "string":
                value = [v.encode() if isinstance(v, str) else v for v in np.array(value, dtype=object).ravel()]
                value = np.array(value, dtype=object).reshape(np.shape(spec["value"]))
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(value, dtype=getattr(tf, spec["dtype"])))
        for alias, examples in cmd.get("examples", {}).items():
            blobs = []
            for features in examples:
                ex = tf.train.Example()
                for key, val in features.items():
                    ex.features.feature[key].float_list.value.extend(val if isinstance(val, list) else [val])
                blobs.append(ex.SerializeToString())
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string))
        return request

    def describe(method, response):
        out = {"code": "OK", "details": "", "response": json_format.MessageToDict(response)}
        if method == "Predict":
            out["arrays"] = {k: tf.make_ndarray(v).tolist() for k, v in response.outputs.items()}
            out["layout"] = {
                k: ("tensor_content" if v.tensor_content else "float_val" if len(v.float_val) else "other")
                for k, v in response.outputs.items()
            }
        return out

    def metadata_of(cmd):
        return [tuple(kv) for kv in cmd.get("metadata", [])] or None

    def call(cmd):
        request = make_request(cmd)
        try:
            response = stub_method(cmd["address"], cmd["method"])(request, timeout=20, metadata=metadata_of(cmd))
        except grpc.RpcError as err:
            return {"code": err.code().name, "details": err.details()}
        return describe(cmd["method"], response)

    def concurrent(cmd):
        futures = []
        for one in cmd["calls"]:
            request = make_request(one)
            futures.append((one["method"], stub_method(one["address"], one["method"]).future(
                request, timeout=30, metadata=metadata_of(one))))
        results = []
        for method, future in futures:
            try:
                results.append(describe(method, future.result()))
            except grpc.RpcError as err:
                results.append({"code": err.code().name, "details": err.details()})
        return results

    def latency(cmd):
        request = make_request(cmd)
        method = stub_method(cmd["address"], cmd["method"])
        for _ in range(100):
            method(request, timeout=10, metadata=metadata_of(cmd))
        times = []
        for _ in range(cmd.get("n", 1000)):
            start = time.perf_counter()
            method(request, timeout=10, metadata=metadata_of(cmd))
            times.append(time.perf_counter() - start)
        times = np.array(times) * 1e3
        return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}

    handlers = {"call": call, "concurrent": concurrent, "latency": latency, **(extra or {})}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            result = handlers[cmd["cmd"]](cmd)
        except Exception as err:  # noqa: BLE001 - reported to the test
            import traceback

            result = {"probe_error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        sys.stdout.flush()


class Probe:
    """The test side: starts `script --probe` and exchanges JSON lines with it."""

    def __init__(self, script: str, log_path: str, env: dict, cwd: str):
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--probe"], cwd=cwd, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self._lock = threading.Lock()

    def send(self, **cmd):
        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the probe exited (see {self._log.name})")
                if line.startswith(MARK):
                    result = json.loads(line[len(MARK):])
                    if isinstance(result, dict) and "probe_error" in result:
                        raise RuntimeError(result["probe_error"] + "\n" + result["traceback"])
                    return result

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# --- request pieces the tests share -------------------------------------------------

def x_tensor(values, dtype="float32"):
    return {"x": {"value": values, "dtype": dtype}}


def examples(*rows):
    return {"exampleList": {"examples": [
        {"features": {"feature": {k: {"floatList": {"value": [v]}} for k, v in row.items()}}} for row in rows
    ]}}


#: The gateway appends a hint to TF Serving's NOT_FOUND text (services/gateway/predict.py HINT_OPEN).
HINT_OPEN = " (cloudml: "


def tfs_text(details: str) -> str:
    """An error message without the gateway's trailing hint: TF Serving's own words."""
    head, sep, tail = details.partition(HINT_OPEN)
    return head if sep and tail.endswith(")") else details


def assert_error(result, code, details=None, startswith=None):
    """`details` is TF Serving's text, compared exactly (the gateway's hint
    after it, if any, is checked by the tests that are about it)."""
    assert result["code"] == code, result
    if details is not None:
        assert tfs_text(result["details"]) == details, result
    if startswith is not None:
        assert result["details"].startswith(startswith), result
