"""The models service's test stack (tests/integration/test_models_service*.py):
the models service as a real process with real components around it, a key
namespace of its own on the session's etcd, the real auth service, a real
gateway (for the CLI), and real model-server replicas (`python -m
services.models.model_server`, TensorFlow) on TF Serving's half_plus_two
SavedModel, placed by the local runtime; built on deploy/local/stack.py.
The pytest process itself never imports TensorFlow (the model is built in a
subprocess; Predict uses the project's own TF Serving protos).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.models.v1 import models_service_pb2 as pb
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc
from deploy.local import stack as harness
from deploy.local.service_process import ServiceProcess

from tests.integration.conftest import ADMIN_ACCESS_KEY, AuthService, Client, connect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = pb.ModelVersionState
AVAILABLE, END, UNLOADING = S.MODEL_VERSION_STATE_AVAILABLE, S.MODEL_VERSION_STATE_END, S.MODEL_VERSION_STATE_UNLOADING
GiB = 2**30
REPLICA = {"cpu_millis": 100, "memory_bytes": 1 * GiB}
LOAD_TIMEOUT = 90


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def state_name(value: int) -> str:
    return S.Name(value)[len("MODEL_VERSION_STATE_"):]


@dataclass
class Tenant:
    name: str
    client: Client

    @property
    def md(self):
        return self.client.md


class Stack:
    """The models service with auth and a gateway, under a key namespace of
    their own on the session's etcd (the harness of deploy/local/stack.py),
    the admin's key the services' own."""

    def __init__(self, workdir: str, etcd_endpoint: str, models_flags: tuple[str, ...] = ()):
        self.workdir = workdir
        self.secret = uuid.uuid4().hex
        self.harness = harness.Stack(workdir, etcd_endpoint=etcd_endpoint, admin=(ADMIN_ACCESS_KEY, self.secret),
                                     service=None, lease_ttl=3,
                                     service_flags={"models": ["--stop-grace", "10", "--scale-down-delay", "3",
                                                               *models_flags]})
        self.harness.start()
        self.data_dir = self.harness.data_dir
        self.etcd = self.harness.etcd
        self.auth: AuthService = connect(self.harness.auth, self.secret)
        self.models: ServiceProcess | None = None
        self.channel: grpc.Channel | None = None
        self.start_models()
        self.gateway, self.rest_port = self.harness.start_gateway()

    def start_models(self) -> ServiceProcess:
        self.models = self.harness.start_service("models", "models")
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(self.models.address)
        self.stub = pb_grpc.ModelsServiceStub(self.channel)
        return self.models

    def call(self, who, method: str, request, timeout: float = 10.0):
        return getattr(self.stub, method)(request, metadata=who.md, timeout=timeout)

    def new_tenant(self) -> Tenant:
        client = self.auth.new_tenant("m")
        return Tenant(client.tenant, client)

    def storage(self, tenant: str, *parts: str) -> str:
        return os.path.join(self.data_dir, "storage", tenant, *parts)

    def version(self, who, model: str, number: int, tenant: str = "") -> pb.ModelVersion:
        return self.call(who, "GetVersion", pb.GetVersionRequest(tenant=tenant, model=model,
                                                                 version=number)).model_version

    def wait_version(self, who, model: str, number: int, predicate, what: str, timeout: float = LOAD_TIMEOUT):
        def check():
            version = self.version(who, model, number)
            return version if predicate(version) else None

        try:
            return wait_for(check, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}: {self.version(who, model, number)}\n{self.log_tail()}") from None

    def log_tail(self, n: int = 4000) -> str:
        with open(os.path.join(self.workdir, "models.log"), "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def replica_port(self, tenant: str, model: str, number: int, replica_id: str) -> dict:
        path = os.path.join(self.data_dir, "models", "replicas", f"models.{tenant}.{model}.{number}.{replica_id}",
                            "port.json")
        with open(path) as f:
            return json.load(f)

    def runtime_records(self) -> list[dict]:
        state_dir = os.path.join(self.data_dir, "runtime", "local")
        records = []
        for name in os.listdir(state_dir):
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(state_dir, name)) as f:
                    records.append(json.load(f))
        return records

    def close(self) -> None:
        self.channel.close()
        self.auth.channel.close()
        # Stops every replica the runtime still runs too (the service leaves them running by design).
        self.harness.stop(replica_grace=2.0)


def build_half_plus_two(workdir: str) -> str:
    """Builds half_plus_two v1 (TF1 SavedModelBuilder export) in a subprocess
    (the pytest process never imports TensorFlow); returns its directory."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "conformance", "half_plus_two.py"),
         os.path.join(workdir, "hp"), "--version", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return os.path.join(workdir, "hp", "1")


@contextlib.contextmanager
def open_stack(workdir: str, etcd_endpoint: str, saved_model: str,
               models_flags: tuple[str, ...] = ()) -> Iterator[Stack]:
    """A started `Stack` in `workdir` on the etcd at `etcd_endpoint`, with
    half_plus_two at `saved_model` (the session's `half_plus_two`: read
    only, tests copy or upload it) and a garbage SavedModel (`broken_model`)
    in `workdir`; closed on leaving. `models_flags`: more flags for the
    models service (e.g. a short --retention-seconds)."""
    stack = Stack(workdir, etcd_endpoint, models_flags)
    try:
        stack.saved_model = saved_model
        broken = os.path.join(workdir, "broken")
        os.makedirs(os.path.join(broken, "variables"))
        with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
            f.write(b"this is not a SavedModel protobuf \xff\xfe")
        stack.broken_model = broken
        yield stack
    finally:
        stack.close()


def file_uri(path: str) -> str:
    return "file://" + path


def predict(address: str, model: str, x: float, version: int = 0, label: str = "", metadata=()) -> float:
    from cloudml.tfs.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, float_val=[x],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1),
                                                            tensor_shape_pb2.TensorShapeProto.Dim(size=1)])))
    with grpc.insecure_channel(address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10,
                                                                                      metadata=metadata)
    return response.outputs["y"].float_val[0]


def expect_code(code: grpc.StatusCode, fn, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def set_replica_quota(stack, tenant: str, count: int) -> None:
    admin = stack.auth.admin
    limits = admin.call("GetQuota", auth_pb.GetQuotaRequest(tenant=tenant)).limits
    limits.model_replicas = count
    admin.call("SetQuota", auth_pb.SetQuotaRequest(tenant=tenant, limits=limits))
