"""Serving under failure and change, with steady Predict load through the gateway.

One platform (`cloudml-platform up --detach`) for the module, half_plus_two
deployed with the CLI:

- replica failover: a version with 2 replicas; while client threads send
  Predicts, one replica's model-server process is killed with SIGKILL. Not
  one Predict may fail (the gateway retries once, on another replica, a
  request that failed UNAVAILABLE), and the models service replaces the
  replica (a new id, AVAILABLE again).
- version rollout: v1 labelled `stable` serves a stream of requests by label
  and another naming no version; v2 is deployed, `stable` moves to v2, v1 is
  deleted. Not one Predict may fail (in particular no NOT_FOUND window), and
  both streams end up on v2.

The load runs in this process with raw gRPC and the project's own TF Serving
protos (`cloudml.tfs`), never TensorFlow.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from cloudml.tfs.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tests.e2e.serving_platform import CLOUDML_CLI, ROOT, clean_env, wait_until

pytestmark = pytest.mark.slow

REPLICA_FLAGS = ("--cpu", "200m", "--memory", "1Gi")
AVAILABLE = "MODEL_VERSION_STATE_AVAILABLE"


def create(platform, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLOUDML_CLI, *args, *REPLICA_FLAGS, "--wait", "--timeout", "180", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(CLOUDML_CONFIG=platform.credentials_path))


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err


@pytest.fixture(scope="module")
def platform(tmp_path_factory, serving_platform):
    workdir = tmp_path_factory.mktemp("serving_resilience")
    platform = serving_platform(str(workdir / "data")).start()
    try:
        build = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "conformance", "half_plus_two.py"),
                                str(workdir / "models"), "--version", "1"],
                               capture_output=True, text=True, timeout=120, env=clean_env())
        assert build.returncode == 0, build.stderr
        platform.saved_model = build.stdout.strip().splitlines()[-1]
        platform.wait_up()
        # Both test models load side by side.
        procs = [create(platform, "models", "create", "-n", "failover", "-v", "1", "-u", platform.saved_model,
                        "--replicas", "2"),
                 create(platform, "models", "create", "-n", "rollout", "-v", "1", "-u", platform.saved_model)]
        for proc in procs:
            finish(proc)
        platform.cli("models", "label", "rollout", "stable", "1")
        yield platform
    finally:
        platform.down()


def tensor(values: list[float]) -> tensor_pb2.TensorProto:
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values)),
                                                   tensor_shape_pb2.TensorShapeProto.Dim(size=1)])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=values)


class Load:
    """`threads` clients, each sending Predicts back to back (with a short
    pause) until stopped; every outcome is recorded."""

    def __init__(self, endpoint: str, token: str, model: str, *, label: str = "", threads: int = 3,
                 pause: float = 0.005):
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.model, self.label, self.pause = model, label, pause
        self.results: list[tuple[float, str, int, str]] = []  # (time, code, version, details)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self.channel.close()

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            x = float(index * 1000 + n % 1000)
            n += 1
            request = predict_pb2.PredictRequest()
            request.model_spec.name = self.model
            if self.label:
                request.model_spec.version_label = self.label
            request.inputs["x"].CopyFrom(tensor([x]))
            try:
                response = self.stub.Predict(request, timeout=10, metadata=self.metadata)
                y = response.outputs["y"].float_val[0]
                code, version, details = "OK", response.model_spec.version.value, ""
                if abs(y - (0.5 * x + 2)) > 1e-3:
                    code, details = "WRONG_ANSWER", f"f({x}) = {y}"
            except grpc.RpcError as err:
                code, version, details = err.code().name, 0, err.details() or ""
            with self._lock:
                self.results.append((time.monotonic(), code, version, details))
            time.sleep(self.pause)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def snapshot(self) -> list[tuple[float, str, int, str]]:
        with self._lock:
            return list(self.results)

    def failures(self) -> list[tuple[float, str, int, str]]:
        return [r for r in self.snapshot() if r[1] != "OK"]

    def wait_for(self, count: int, timeout: float = 30) -> None:
        start = self.count()
        wait_until(lambda: self.count() >= start + count, timeout, f"{count} more responses")


def version_info(platform, model: str, version: int) -> dict:
    return platform.cli_json("models", "versions", "describe", model, str(version))


def summary(results) -> str:
    codes = collections.Counter(r[1] for r in results)
    first = [r for r in results if r[1] != "OK"][:5]
    return f"{len(results)} requests, codes {dict(codes)}, first failures {first}"


@pytest.mark.needs_local_platform  # kills a model-server process and reads the gateway's log
def test_kill_9_one_of_two_replicas_under_load(platform):
    before = version_info(platform, "failover", 1)
    assert before["state"] == AVAILABLE and len(before["replicas"]) == 2, before
    victim = before["replicas"][0]["id"]
    [process] = platform.replica_processes(victim)

    with Load(platform.endpoint, platform.token(), "failover", threads=4) as load:
        load.wait_for(200)
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        process.wait(10)

        def replaced():
            info = version_info(platform, "failover", 1)
            ids = {r["id"] for r in info["replicas"] if r["state"] == AVAILABLE}
            return info if len(ids) == 2 and victim not in ids else None

        after = wait_until(replaced, 120, "the killed replica to be replaced", interval=0.5)
        replaced_at = time.monotonic()
        # Keep the load on a little longer: the replacement serves too.
        load.wait_for(200)
    results = load.snapshot()
    assert load.failures() == [], summary(results)
    during = [r for r in results if killed_at <= r[0] <= replaced_at]
    assert len(during) > 50, summary(results)
    assert {r[2] for r in results} == {1}
    new_ids = {r["id"] for r in after["replicas"]}
    assert len(new_ids) == 2 and victim not in new_ids
    assert len(platform.replica_processes()) >= 2
    assert platform.replica_processes(victim) == []
    # The kill hit live traffic: the gateway had to retry (it logs each retry).
    assert "retrying on" in platform.log("gateway")
    print(f"failover: {summary(results)}; replaced in {replaced_at - killed_at:.1f}s")


def test_rollout_v2_move_label_delete_v1_under_load(platform):
    token = platform.token()
    with Load(platform.endpoint, token, "rollout", label="stable", threads=2) as by_label, \
            Load(platform.endpoint, token, "rollout", threads=2) as latest:
        by_label.wait_for(100)
        latest.wait_for(100)
        assert {r[2] for r in by_label.snapshot()} == {1}

        created = platform.cli_json("models", "versions", "create", "rollout", "-v", "2", "-u", platform.saved_model,
                                    *REPLICA_FLAGS, "--wait", "--timeout", "180")
        assert created["model_version"]["state"] == AVAILABLE, created
        platform.cli("models", "label", "rollout", "stable", "2")
        moved_at = time.monotonic()
        wait_until(lambda: any(r[2] == 2 and r[0] > moved_at for r in by_label.snapshot()), 10,
                   "label requests on v2")
        settled_at = time.monotonic()

        deleted = platform.cli_json("models", "versions", "delete", "rollout", "1", "--wait", "--timeout", "120")
        assert deleted["deleted"], deleted
        deleted_at = time.monotonic()
        by_label.wait_for(100)
        latest.wait_for(100)

    for load in (by_label, latest):
        results = load.snapshot()
        assert load.failures() == [], summary(results)
        # Nothing answered by v1 once the label had moved and v1 was gone.
        assert [r for r in results if r[0] > deleted_at and r[2] != 2] == [], summary(results)
        assert results[-1][2] == 2
    # (A second of slack for requests resolved just before the gateway saw the move.)
    assert [r for r in by_label.snapshot() if r[0] > settled_at + 1.0 and r[2] != 2] == []
    versions = [v["version"] for v in platform.cli_json("models", "versions", "list", "rollout")]
    assert versions == ["2"], versions
    print(f"rollout: by label {summary(by_label.snapshot())}; no version {summary(latest.snapshot())}")
