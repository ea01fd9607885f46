"""The models service as a real process, with real components around it: a
key namespace of its own on the session's etcd, the real auth service, a real
gateway (for the CLI), and real model-server replicas (`python -m
services.models.model_server`, TensorFlow) on TF Serving's half_plus_two
SavedModel, placed by the local runtime.

The stack is started once for the module (its own namespace, so no other
test's models service competes for the leadership) and the tests run in file order,
reusing the replicas they start: model servers take seconds to import
TensorFlow. The pytest process itself never imports TensorFlow (the model is
built in a subprocess; Predict uses the project's own TF Serving protos).
"""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

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


# --- helpers ------------------------------------------------------------------------------

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

    def __init__(self, workdir: str, etcd_endpoint: str):
        self.workdir = workdir
        self.secret = uuid.uuid4().hex
        self.harness = harness.Stack(workdir, etcd_endpoint=etcd_endpoint, admin=(ADMIN_ACCESS_KEY, self.secret),
                                     service=None, lease_ttl=3,
                                     service_flags={"models": ["--stop-grace", "10", "--scale-down-delay", "3"]})
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


def build_models(workdir: str) -> subprocess.Popen:
    """Builds half_plus_two (TF1 SavedModelBuilder export) in a subprocess."""
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "conformance", "half_plus_two.py"),
         os.path.join(workdir, "hp"), "--version", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server):
    workdir = str(tmp_path_factory.mktemp("models"))
    builder = build_models(workdir)
    stack = Stack(workdir, etcd_server.endpoint)
    _, err = builder.communicate(timeout=120)
    assert builder.returncode == 0, err.decode()
    stack.saved_model = os.path.join(workdir, "hp", "1")
    broken = os.path.join(workdir, "broken")
    os.makedirs(os.path.join(broken, "variables"))
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel protobuf \xff\xfe")
    stack.broken_model = broken
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def team(stack) -> Tenant:
    """The member tenant most tests act as, with half_plus_two and a broken
    SavedModel placed in its own storage (where uploads go)."""
    tenant = stack.new_tenant()
    shutil.copytree(stack.saved_model, stack.storage(tenant.name, "models", "hp", "1"))
    shutil.copytree(stack.broken_model, stack.storage(tenant.name, "models", "broken", "1"))
    return tenant


def file_uri(path: str) -> str:
    return "file://" + path


@pytest.fixture(scope="module")
def deployed(stack, team):
    """hp v1 (good) and broken v1 (a garbage saved_model.pb), created together
    so that their replicas load side by side."""
    for name, path in (("hp", stack.storage(team.name, "models", "hp", "1")),
                       ("broken", stack.storage(team.name, "models", "broken", "1"))):
        stack.call(team, "CreateModel", pb.CreateModelRequest(name=name, description=f"{name} model"))
        resp = stack.call(team, "CreateVersion", pb.CreateVersionRequest(
            model=name, model_version=pb.ModelVersion(version=1, model_uri=file_uri(path), resources=REPLICA)))
        assert resp.created
        assert resp.model_version.state == S.MODEL_VERSION_STATE_START
    return {"hp": 1, "broken": 1}


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


# --- the service's shape --------------------------------------------------------------------

def test_models_service_never_imports_tensorflow():
    code = (
        "import sys\n"
        "import services.models.__main__, services.models.server, services.models.core, "
        "services.models.reconciler, services.models.store, services.models.servicer, "
        "services.models.autoscaler, cloudml.cli.commands.models, cloudml.serving\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving', 'keras'))\n"
        "assert not bad, bad\n"
        "assert not any(m.startswith('services.models.model_server') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_running_models_service_has_no_tensorflow_loaded(stack):
    with open(f"/proc/{stack.models.process.pid}/maps") as f:
        maps = f.read()
    assert "tensorflow" not in maps


# --- deploy ----------------------------------------------------------------------------------

def test_create_version_becomes_available_with_endpoint_and_route(stack, team, deployed):
    version = stack.wait_version(team, "hp", 1, lambda v: v.state == AVAILABLE, "hp v1 AVAILABLE")
    assert version.desired_replicas == 1 and len(version.replicas) == 1
    replica = version.replicas[0]
    assert replica.state == AVAILABLE and replica.address and replica.start_time.seconds

    endpoints = stack.etcd.get_prefix(f"/cloudml/models/endpoints/{team.name}/hp/1/")
    assert list(endpoints) == [f"/cloudml/models/endpoints/{team.name}/hp/1/{replica.id}"]
    endpoint = pb.ReplicaEndpoint.FromString(next(iter(endpoints.values())))
    assert (endpoint.tenant, endpoint.model, endpoint.version, endpoint.state) == (team.name, "hp", 1, AVAILABLE)
    assert endpoint.address == replica.address

    def route_available():
        raw = stack.etcd.get_prefix(f"/cloudml/models/routes/{team.name}/hp")
        route = pb.ModelRoute.FromString(raw[f"/cloudml/models/routes/{team.name}/hp"])
        return route if [(v.version, v.state) for v in route.versions] == [(1, AVAILABLE)] else None

    route = wait_for(route_available, 10, "the route to show v1 AVAILABLE")
    assert (route.tenant, route.model, route.public) == (team.name, "hp", False)

    # The replica serves the model: y = 0.5 x + 2.
    assert predict(replica.address, "hp", 3.0) == pytest.approx(3.5)

    # Its quota is held: one replica's resources, plus one model_replicas.
    reservations = team.client.call("ListReservations", auth_pb.ListReservationsRequest(tenant=team.name))
    [held] = [r for r in reservations.reservations if r.owner_id == f"models/hp/1/{replica.id}"]
    assert (held.resources.model_replicas, held.resources.cpu_millis, held.resources.memory_bytes) == (1, 100, GiB)


def test_broken_saved_model_ends_with_its_load_error(stack, team, deployed):
    version = stack.wait_version(team, "broken", 1, lambda v: v.state == END, "broken v1 END")
    assert version.status.code != 0
    assert version.status.message, version
    assert not [r for r in version.replicas if r.state != END]
    raw = stack.etcd.get_prefix(f"/cloudml/models/routes/{team.name}/broken")
    route = pb.ModelRoute.FromString(raw[f"/cloudml/models/routes/{team.name}/broken"])
    assert route.versions[0].state == END and route.versions[0].status.message == version.status.message

    # It gave up: its replica is stopped and its quota released; describe shows why.
    def released():
        v = stack.version(team, "broken", 1)
        return not v.replicas and v
    wait_for(released, 20, "the failed version's replicas to go")
    reservations = team.client.call("ListReservations", auth_pb.ListReservationsRequest(tenant=team.name))
    assert [r.owner_id for r in reservations.reservations if r.owner_id.startswith("models/broken/")] == []


def test_create_version_validates_its_spec(stack, team, deployed):
    path = file_uri(stack.storage(team.name, "models", "hp", "1"))
    bad = [
        (pb.ModelVersion(version=-1, model_uri=path), "version"),
        (pb.ModelVersion(model_uri=""), "model_uri"),
        (pb.ModelVersion(model_uri="relative/dir"), "absolute"),
        (pb.ModelVersion(model_uri="nosuchscheme://bucket/x"), "scheme"),
        (pb.ModelVersion(model_uri=file_uri(stack.storage(team.name, "missing"))), "no such directory"),
        (pb.ModelVersion(model_uri=path, min_replicas=3, max_replicas=2), "min_replicas"),
        (pb.ModelVersion(model_uri=path, resources={"cpu_millis": -1}), "cpu_millis"),
        (pb.ModelVersion(model_uri=path, batching={"enabled": True, "max_batch_size": 10**6}), "max_batch_size"),
    ]
    for spec, word in bad:
        details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stack.call, team, "CreateVersion",
                              pb.CreateVersionRequest(model="hp", model_version=spec))
        assert word in details, (spec, details)
    # A path outside the tenant's storage: refused outright (PERMISSION_DENIED), one line naming the field.
    details = expect_code(grpc.StatusCode.PERMISSION_DENIED, stack.call, team, "CreateVersion",
                          pb.CreateVersionRequest(model="hp", model_version=pb.ModelVersion(
                              model_uri=file_uri(stack.saved_model))))
    assert "model_version.model_uri" in details and "own storage" in details and "\n" not in details
    details = expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, stack.call, team, "CreateVersion",
                          pb.CreateVersionRequest(model="hp", model_version=pb.ModelVersion(
                              model_uri=path, resources={"cpu_millis": 64_000})))
    assert "cpu" in details
    expect_code(grpc.StatusCode.NOT_FOUND, stack.call, team, "CreateVersion",
                pb.CreateVersionRequest(model="nope", model_version=pb.ModelVersion(model_uri=path)))
    expect_code(grpc.StatusCode.ALREADY_EXISTS, stack.call, team, "CreateModel", pb.CreateModelRequest(name="hp"))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stack.call, team, "CreateModel", pb.CreateModelRequest(name="Bad_Name"))


def test_create_version_is_idempotent_and_zero_means_next(stack, team, deployed):
    path = file_uri(stack.storage(team.name, "models", "hp", "1"))
    again = stack.call(team, "CreateVersion", pb.CreateVersionRequest(
        model="hp", model_version=pb.ModelVersion(version=1, model_uri=path, resources=REPLICA)))
    assert not again.created and again.model_version.version == 1
    details = expect_code(grpc.StatusCode.ALREADY_EXISTS, stack.call, team, "CreateVersion", pb.CreateVersionRequest(
        model="hp", model_version=pb.ModelVersion(version=1, model_uri=path, resources=REPLICA, description="x")))
    assert "different spec" in details
    # Version 0: one above the highest. v2 stays for the tests below.
    second = stack.call(team, "CreateVersion", pb.CreateVersionRequest(
        model="hp", model_version=pb.ModelVersion(model_uri=path, resources=REPLICA)))
    assert second.created and second.model_version.version == 2
    listed = stack.call(team, "ListVersions", pb.ListVersionsRequest(model="hp", page_size=1))
    assert [v.version for v in listed.model_versions] == [1] and listed.next_page_token
    rest = stack.call(team, "ListVersions", pb.ListVersionsRequest(model="hp", page_token=listed.next_page_token))
    assert [v.version for v in rest.model_versions] == [2] and not rest.next_page_token


def test_labels_default_version_and_traffic_split_rules(stack, team, deployed):
    stack.wait_version(team, "hp", 1, lambda v: v.state == AVAILABLE, "hp v1 AVAILABLE")
    model = stack.call(team, "SetLabel", pb.SetLabelRequest(model="hp", label="stable", version=1)).model
    assert dict(model.labels) == {"stable": 1}
    # A label needs an AVAILABLE version (unless allowed), an existing one, and a sane name.
    broken = stack.version(team, "broken", 1)
    assert broken.state == END
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "SetLabel",
                pb.SetLabelRequest(model="broken", label="stable", version=1))
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "SetLabel",
                pb.SetLabelRequest(model="hp", label="canary", version=9))
    for label in ("123", "", "a" * 64, "bad label"):
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, stack.call, team, "SetLabel",
                    pb.SetLabelRequest(model="hp", label=label, version=1))
    allowed = stack.call(team, "SetLabel", pb.SetLabelRequest(model="hp", label="canary", version=2,
                                                              allow_unavailable=True)).model
    assert dict(allowed.labels) == {"stable": 1, "canary": 2}

    def update(paths, **fields):
        return stack.call(team, "UpdateModel", pb.UpdateModelRequest(
            name="hp", model=pb.Model(**fields), update_mask=FieldMask(paths=paths)))

    for split in ([(1, 90)], [(1, 50), (1, 50)], [(1, 0), (2, 100)], [(1, 101)]):
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, update, ["traffic_split"],
                    traffic_split=[pb.TrafficTarget(version=v, percent=p) for v, p in split])
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, update, ["traffic_split"],
                traffic_split=[pb.TrafficTarget(version=1, percent=50), pb.TrafficTarget(version=7, percent=50)])
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, update, ["default_version"], default_version=7)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, update, ["labels"])
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, update, [])
    model = update(["traffic_split", "default_version", "public"], default_version=1, public=True,
                   traffic_split=[pb.TrafficTarget(version=1, percent=90), pb.TrafficTarget(version=2, percent=10)]).model
    assert [(t.version, t.percent) for t in model.traffic_split] == [(1, 90), (2, 10)]

    def route_has_split():
        raw = stack.etcd.get_prefix(f"/cloudml/models/routes/{team.name}/hp")
        route = pb.ModelRoute.FromString(raw[f"/cloudml/models/routes/{team.name}/hp"])
        return route if route.public and len(route.traffic_split) == 2 else None

    route = wait_for(route_has_split, 5, "the route to carry the split")
    assert dict(route.labels) == {"stable": 1, "canary": 2} and route.default_version == 1

    # A version a label, the default or the split still names cannot be deleted.
    details = expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "DeleteVersion",
                          pb.DeleteVersionRequest(model="hp", version=2))
    assert "canary" in details and "traffic split" in details
    update(["traffic_split", "public"], public=False)
    stack.call(team, "DeleteLabel", pb.DeleteLabelRequest(model="hp", label="canary"))
    stack.call(team, "DeleteLabel", pb.DeleteLabelRequest(model="hp", label="never-was"))
    model = stack.call(team, "GetModel", pb.GetModelRequest(name="hp")).model
    assert dict(model.labels) == {"stable": 1} and not model.traffic_split and model.default_version == 1


def test_predict_through_the_gateway_follows_routes_and_tenancy(stack, team, deployed):
    """The real gateway routes Predict by the routes this service publishes."""
    gateway = stack.gateway.address

    def answers(**kwargs):
        try:
            return predict(gateway, kwargs.pop("model", "hp"), 3.0, **kwargs)
        except grpc.RpcError as err:
            return err.code()

    # default_version 1 and label stable -> 1 (set by the test above)
    assert wait_for(lambda: answers(metadata=team.md) == pytest.approx(3.5), 10, "gateway predict")
    assert answers(version=1, metadata=team.md) == pytest.approx(3.5)
    other = stack.new_tenant()
    assert answers(metadata=other.md) == grpc.StatusCode.NOT_FOUND
    assert answers(model=f"{team.name}.hp", metadata=other.md) == grpc.StatusCode.NOT_FOUND
    # (A public model named <tenant>.hp by others, and Predict by label, need the
    # gateway to hand the replica the version it resolved, x-cloudml-resolved-version;
    # the gateway's own routing tests cover them.)


def test_replica_killed_with_sigkill_is_replaced(stack, team, deployed):
    version = stack.wait_version(team, "hp", 1, lambda v: v.state == AVAILABLE, "hp v1 AVAILABLE")
    old = version.replicas[0]
    pid = stack.replica_port(team.name, "hp", 1, old.id)["pid"]
    os.kill(pid, signal.SIGKILL)
    replaced = stack.wait_version(
        team, "hp", 1,
        lambda v: [(r.id != old.id, r.state) for r in v.replicas] == [(True, AVAILABLE)],
        "a new replica to replace the killed one")
    assert replaced.state == AVAILABLE
    endpoints = stack.etcd.get_prefix(f"/cloudml/models/endpoints/{team.name}/hp/1/")
    assert list(endpoints) == [f"/cloudml/models/endpoints/{team.name}/hp/1/{replaced.replicas[0].id}"]
    usage = team.client.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage
    assert usage.model_replicas == 2  # hp v1 and v2, one each: the dead replica's quota is back


def set_replica_quota(stack, tenant: str, count: int) -> None:
    admin = stack.auth.admin
    limits = admin.call("GetQuota", auth_pb.GetQuotaRequest(tenant=tenant)).limits
    limits.model_replicas = count
    admin.call("SetQuota", auth_pb.SetQuotaRequest(tenant=tenant, limits=limits))


def test_scale_up_waits_for_quota_then_scales_down(stack, team, deployed):
    stack.wait_version(team, "hp", 2, lambda v: v.state == AVAILABLE, "hp v2 AVAILABLE")
    set_replica_quota(stack, team.name, 2)  # hp v1 and v2 hold both
    try:
        scaled = stack.call(team, "ScaleVersion", pb.ScaleVersionRequest(model="hp", version=2, min_replicas=2,
                                                                         max_replicas=3)).model_version
        assert (scaled.min_replicas, scaled.max_replicas, scaled.desired_replicas) == (2, 3, 2)
        waiting = stack.wait_version(
            team, "hp", 2,
            lambda v: sorted(r.state for r in v.replicas) == [S.MODEL_VERSION_STATE_START, AVAILABLE],
            "the new replica to wait in START for quota", timeout=10)
        [pending] = [r for r in waiting.replicas if r.state == S.MODEL_VERSION_STATE_START]
        assert "waiting for quota" in pending.status.message and pending.status.code == 0
        assert waiting.state == AVAILABLE
    finally:
        set_replica_quota(stack, team.name, 10)
    version = stack.wait_version(team, "hp", 2, lambda v: [r.state for r in v.replicas] == [AVAILABLE] * 2,
                                 "two AVAILABLE replicas once quota is free")
    assert len(stack.etcd.get_prefix(f"/cloudml/models/endpoints/{team.name}/hp/2/")) == 2
    assert team.client.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage.model_replicas == 3
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stack.call, team, "ScaleVersion",
                pb.ScaleVersionRequest(model="hp", version=2, min_replicas=0, max_replicas=1))
    expect_code(grpc.StatusCode.NOT_FOUND, stack.call, team, "ScaleVersion",
                pb.ScaleVersionRequest(model="hp", version=9, min_replicas=1, max_replicas=1))

    stack.call(team, "ScaleVersion", pb.ScaleVersionRequest(model="hp", version=2, min_replicas=1, max_replicas=1))
    version = stack.wait_version(team, "hp", 2, lambda v: len(v.replicas) == 1 and v.desired_replicas == 1,
                                 "one replica left", timeout=30)
    assert version.state == AVAILABLE and version.replicas[0].state == AVAILABLE
    wait_for(lambda: team.client.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage.model_replicas == 2,
             10, "the drained replica's quota to be released")


def test_autoscaling_on_inflight_requests(stack, team, deployed):
    """8 requests held in flight (batching with a 1 s batch timeout) against a
    target of 4 per replica: the version scales to 2, then back to 1 once the
    load stops (scale-down delay 3 s in this stack)."""
    path = stack.storage(team.name, "models", "auto", "1")
    shutil.copytree(stack.saved_model, path)
    stack.call(team, "CreateModel", pb.CreateModelRequest(name="auto"))
    stack.call(team, "CreateVersion", pb.CreateVersionRequest(model="auto", model_version=pb.ModelVersion(
        version=1, model_uri=file_uri(path), resources=REPLICA, min_replicas=1, max_replicas=2,
        batching=pb.BatchingConfig(enabled=True, max_batch_size=64, batch_timeout_micros=1_000_000))))
    version = stack.wait_version(team, "auto", 1, lambda v: v.state == AVAILABLE, "auto v1 AVAILABLE")
    assert version.desired_replicas == 1
    address = version.replicas[0].address
    stop = threading.Event()
    failures: list = []

    def load():
        while not stop.is_set():
            try:
                predict(address, "auto", 1.0)
            except grpc.RpcError as err:  # noqa: PERF203
                failures.append(err.code())

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        scaled = stack.wait_version(team, "auto", 1,
                                    lambda v: v.desired_replicas == 2 and [r.state for r in v.replicas] == [AVAILABLE] * 2,
                                    "a second replica under load", timeout=LOAD_TIMEOUT)
        assert scaled.state == AVAILABLE
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not failures, failures[:3]
    stack.wait_version(team, "auto", 1, lambda v: v.desired_replicas == 1 and len(v.replicas) == 1,
                       "back to one replica once idle", timeout=30)
    stack.call(team, "DeleteModel", pb.DeleteModelRequest(name="auto"))


def test_killed_models_service_restarts_and_adopts_its_replicas(stack, team, deployed):
    before = {v: stack.wait_version(team, "hp", v, lambda x: x.state == AVAILABLE, f"hp v{v} AVAILABLE")
              for v in (1, 2)}
    ids = {v: [r.id for r in version.replicas] for v, version in before.items()}
    pids = {stack.replica_port(team.name, "hp", v, rid)["pid"] for v in ids for rid in ids[v]}
    old_pid = stack.models.process.pid
    stack.models.kill()
    stack.start_models()
    assert stack.models.process.pid != old_pid

    def new_leader():
        async def read():
            etcd = await stack.etcd.connect()
            try:
                kvs, _, _ = await etcd.get_prefix("/cloudml/models/election/")
            finally:
                await etcd.close()
            return kvs

        kvs = asyncio.run(read())  # the lowest create_revision leads
        return kvs and f"-{stack.models.process.pid}-" in min(kvs, key=lambda kv: kv.create_revision).value.decode()

    wait_for(new_leader, 20, "the restarted service to lead")
    time.sleep(3)  # a few passes of the new leader
    for v in (1, 2):
        version = stack.version(team, "hp", v)
        assert [r.id for r in version.replicas] == ids[v] and version.state == AVAILABLE, version
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    running = [r for r in stack.runtime_records() if r.get("replica_id", "").startswith(f"models.{team.name}.hp.")
               and r.get("phase", r.get("state")) == "RUNNING"]
    assert len(running) == 2, running
    assert team.client.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage.model_replicas == 2


def test_other_tenants_get_not_found(stack, team, deployed):
    other = stack.new_tenant()
    for request, method in (
        (pb.GetModelRequest(tenant=team.name, name="hp"), "GetModel"),
        (pb.GetModelRequest(name="hp"), "GetModel"),
        (pb.ListModelsRequest(tenant=team.name), "ListModels"),
        (pb.GetVersionRequest(tenant=team.name, model="hp", version=1), "GetVersion"),
        (pb.DeleteModelRequest(tenant=team.name, name="hp"), "DeleteModel"),
        (pb.SetLabelRequest(tenant=team.name, model="hp", label="x", version=1), "SetLabel"),
        (pb.ScaleVersionRequest(tenant=team.name, model="hp", version=1, min_replicas=1, max_replicas=1),
         "ScaleVersion"),
        (pb.CreateVersionRequest(tenant=team.name, model="hp", model_version=pb.ModelVersion(
            model_uri=file_uri(stack.storage(team.name, "models", "hp", "1")))), "CreateVersion"),
    ):
        expect_code(grpc.StatusCode.NOT_FOUND, stack.call, other, method, request)
    assert stack.call(other, "ListModels", pb.ListModelsRequest()).models == []
    # The admin sees every tenant's models.
    admin = stack.auth.admin
    assert stack.call(admin, "GetModel", pb.GetModelRequest(tenant=team.name, name="hp")).model.name == "hp"
    expect_code(grpc.StatusCode.NOT_FOUND, stack.call, admin, "CreateModel",
                pb.CreateModelRequest(tenant="no-such-tenant", name="x"))
    expect_code(grpc.StatusCode.UNAUTHENTICATED, stack.stub.GetModel, pb.GetModelRequest(name="hp"))


def test_watch_model_streams_snapshots(stack, team, deployed):
    call = stack.stub.WatchModel(pb.WatchModelRequest(name="hp"), metadata=team.md, timeout=10)
    first = next(call)
    assert first.model.name == "hp" and [v.version for v in first.model_versions] == [1, 2]
    stack.call(team, "UpdateModel", pb.UpdateModelRequest(name="hp", model=pb.Model(description="watched"),
                                                          update_mask=FieldMask(paths=["description"])))
    for message in call:
        if message.model.description == "watched":
            break
    call.cancel()


def test_delete_version_drains_and_releases_quota(stack, team, deployed):
    deleting = stack.call(team, "DeleteVersion", pb.DeleteVersionRequest(model="hp", version=2)).model_version
    assert deleting.state == UNLOADING and deleting.HasField("delete_time")
    # Deleting again changes nothing; a deleting version takes no labels or scaling.
    assert stack.call(team, "DeleteVersion", pb.DeleteVersionRequest(model="hp", version=2)).model_version.state == UNLOADING
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "SetLabel",
                pb.SetLabelRequest(model="hp", label="x", version=2, allow_unavailable=True))
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "ScaleVersion",
                pb.ScaleVersionRequest(model="hp", version=2, min_replicas=1, max_replicas=1))
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "CreateVersion", pb.CreateVersionRequest(
        model="hp", model_version=pb.ModelVersion(version=2, model_uri=file_uri(
            stack.storage(team.name, "models", "hp", "1")), resources=REPLICA)))

    def gone():
        try:
            stack.version(team, "hp", 2)
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND
        return False

    wait_for(gone, 30, "hp v2 to drain and disappear")
    assert stack.etcd.get_prefix(f"/cloudml/models/endpoints/{team.name}/hp/2/") == {}

    # Then the whole models: every version drains, then the model goes.
    for name in ("hp", "broken"):
        marked = stack.call(team, "DeleteModel", pb.DeleteModelRequest(name=name)).model
        assert marked.HasField("delete_time")
    assert stack.etcd.get_prefix(f"/cloudml/models/routes/{team.name}/") == {}  # at once
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "CreateVersion", pb.CreateVersionRequest(
        model="hp", model_version=pb.ModelVersion(model_uri=file_uri(stack.storage(team.name, "models", "hp", "1")))))

    def all_gone():
        try:
            stack.call(team, "GetModel", pb.GetModelRequest(name="hp"))
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND and not stack.call(
                team, "ListModels", pb.ListModelsRequest()).models
        return False

    wait_for(all_gone, 30, "both models to be deleted")
    usage = team.client.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage
    assert (usage.model_replicas, usage.cpu_millis, usage.memory_bytes) == (0, 0, 0)
    assert not team.client.call("ListReservations", auth_pb.ListReservationsRequest(tenant=team.name)).reservations
    assert stack.etcd.get_prefix(f"/cloudml/models/endpoints/{team.name}/") == {}
    assert stack.etcd.get_prefix(f"/cloudml/models/replicas/{team.name}/") == {}
    assert not [r for r in stack.runtime_records() if r.get("replica_id", "").startswith(f"models.{team.name}.")]
    replicas_dir = os.path.join(stack.data_dir, "models", "replicas")
    assert not [n for n in os.listdir(replicas_dir) if n.startswith(f"models.{team.name}.")]  # logs kept until now
    # The name is free again, numbering starts over.
    stack.call(team, "CreateModel", pb.CreateModelRequest(name="hp"))
    stack.call(team, "DeleteModel", pb.DeleteModelRequest(name="hp"))


# --- the CLI ------------------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        assert self.code == 0, self.err
        return json.loads(self.out)


def cli(stack, tenant: Tenant, *argv: str, rest_endpoint: str = "", timeout: float = 120) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
    env.update(CLOUDML_ENDPOINT=stack.gateway.address, CLOUDML_ACCESS_KEY=tenant.client.access_key_id,
               CLOUDML_SECRET_KEY=tenant.client.secret_key, CLOUDML_CONFIG=os.path.join(stack.workdir, "none.json"),
               CLOUDML_REST_ENDPOINT=rest_endpoint or f"http://127.0.0.1:{stack.rest_port}")
    proc = subprocess.run([sys.executable, "-m", "cloudml.cli.main", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_cli_create_wait_exits_1_short_of_the_requested_replicas(stack):
    """`models create --replicas 2 --wait` with quota for one replica: it shows
    replicas becoming ready and fails when the timeout passes at 1 of 2, rather
    than reporting success with half the replicas."""
    tenant = stack.new_tenant()
    set_replica_quota(stack, tenant.name, 1)
    waited = cli(stack, tenant, "models", "create", "-n", "half", "-v", "v1", "-u", stack.saved_model,
                 "--cpu", "100m", "--memory", "1Gi", "--replicas", "2", "--wait", "--timeout", "20")
    assert waited.code == 1, (waited.out, waited.err)
    assert "0/2 replicas ready" in waited.err and "1/2 replicas ready" in waited.err, waited.err
    assert "DEADLINE_EXCEEDED" in waited.err and "1 of 2 replicas ready" in waited.err, waited.err
    set_replica_quota(stack, tenant.name, 2)
    again = cli(stack, tenant, "models", "create", "-n", "half", "-v", "v1", "-u", stack.saved_model,
                "--cpu", "100m", "--memory", "1Gi", "--replicas", "2", "--wait", "--timeout", str(LOAD_TIMEOUT))
    assert again.code == 0 and "2/2 replicas ready" in again.err, (again.out, again.err)


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                "body": json.loads(body)})
        answer = json.dumps({"outputs": [[7.0], [17.0]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_cli_create_list_describe_label_scale_predict_delete(stack, tmp_path):
    tenant = stack.new_tenant()
    # A local directory: the CLI uploads it into the tenant's storage.
    created = cli(stack, tenant, "models", "create", "-n", "linear", "-v", "v1", "-u", stack.saved_model,
                  "--cpu", "100m", "--memory", "1Gi", "--wait", "--timeout", str(LOAD_TIMEOUT), "-o", "json")
    data = created.json()
    assert data["created"] is True
    version = data["model_version"]
    assert version["state"] == "MODEL_VERSION_STATE_AVAILABLE" and version["version"] == "1"
    # Uploaded through the API (ModelsService.UploadModel), stored by content hash in the tenant's storage.
    models_dir = stack.storage(tenant.name, "models", "linear")
    stored = version["model_uri"][len("file://"):].rstrip("/")
    assert version["model_uri"].startswith(f"file://{models_dir}/") and os.path.dirname(stored) == models_dir
    assert os.path.isfile(os.path.join(stored, "saved_model.pb"))
    # Again: same upload, same spec -> the existing version.
    again = cli(stack, tenant, "models", "create", "-n", "linear", "-v", "1", "-u", stack.saved_model,
                "--cpu", "100m", "--memory", "1Gi", "-o", "json").json()
    assert again["created"] is False

    listed = cli(stack, tenant, "models", "list", "-o", "json").json()
    assert [m["name"] for m in listed] == ["linear"]
    table = cli(stack, tenant, "models", "list")
    assert table.code == 0 and table.out.splitlines()[0].split()[:2] == ["NAME", "PUBLIC"]
    assert "v1 AVAILABLE 1/1" in table.out.splitlines()[1], table.out  # each model's state, not "-"

    labelled = cli(stack, tenant, "models", "label", "linear", "stable", "v1", "-o", "json").json()
    assert labelled["labels"] == {"stable": "1"}
    bad = cli(stack, tenant, "models", "label", "linear", "canary", "5")
    assert bad.code == 1 and bad.err.startswith("error: FAILED_PRECONDITION")

    scaled = cli(stack, tenant, "models", "scale", "linear", "1", "--min", "1", "--max", "2", "-o", "json").json()
    assert (scaled["min_replicas"], scaled["max_replicas"]) == (1, 2)

    described = cli(stack, tenant, "models", "describe", "linear", "-o", "json").json()
    assert described["model"]["labels"] == {"stable": "1"}
    assert [(v["version"], v["state"]) for v in described["model_versions"]] == [("1", "MODEL_VERSION_STATE_AVAILABLE")]
    text = cli(stack, tenant, "models", "describe", "linear")
    assert text.code == 0 and "stable=1" in text.out and "AVAILABLE" in text.out
    versions = cli(stack, tenant, "models", "versions", "list", "linear", "-o", "json").json()
    assert [v["version"] for v in versions] == ["1"]

    # predict: the seed's format becomes TF Serving's columnar JSON, POSTed with the token.
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps({"keys_dtype": "int32", "keys": [[1], [2]], "X_dtype": "float32",
                                     "X": [[10], [30.0]]}))
    _RecordingHandler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        answer = cli(stack, tenant, "models", "predict", "linear", "v1", "-d", str(data_file), "-o", "json",
                     rest_endpoint=f"http://127.0.0.1:{server.server_address[1]}").json()
    finally:
        server.shutdown()
    assert answer == {"outputs": [[7.0], [17.0]]}
    [seen] = _RecordingHandler.seen
    assert seen["path"] == "/v1/models/linear/versions/1:predict"
    assert seen["auth"].startswith("Bearer ") and seen["auth"].count(".") == 2
    assert seen["body"] == {"inputs": {"keys": [[1], [2]], "X": [[10.0], [30.0]]}}

    deleted = cli(stack, tenant, "models", "delete", "linear", "--wait", "--timeout", "60", "-o", "json").json()
    assert deleted["deleted"] is True
    assert cli(stack, tenant, "models", "list", "-o", "json").json() == []
    missing = cli(stack, tenant, "models", "describe", "linear")
    assert missing.code == 1 and missing.err.startswith("error: NOT_FOUND")


def test_cli_predict_through_the_gateway(stack, tmp_path):
    """Predict over the gateway's REST API, end to end (needs the gateway's
    TF Serving REST side)."""
    tenant = stack.new_tenant()
    cli(stack, tenant, "models", "create", "-n", "hp", "-u", stack.saved_model, "--cpu", "100m", "--memory", "1Gi",
        "--wait", "--timeout", str(LOAD_TIMEOUT), "-o", "json").json()
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps({"X_dtype": "float32", "x": [[1.0], [2.0]]}).replace('"X_dtype"', '"x_dtype"'))
    try:
        result = cli(stack, tenant, "models", "predict", "hp", "-d", str(data_file), "-o", "json")
        assert result.code == 0, result.err
        assert result.json() == {"outputs": [[2.5], [3.0]]}
    finally:
        cli(stack, tenant, "models", "delete", "hp", "--wait", "--timeout", "60")
