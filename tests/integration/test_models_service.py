"""The models service as a real process, with real components around it: a
key namespace of its own on the session's etcd, the real auth service, a real
gateway, and real model-server replicas (`python -m
services.models.model_server`, TensorFlow) on TF Serving's half_plus_two
SavedModel, placed by the local runtime (tests/integration/models_stack.py).
Its CLI: tests/integration/test_models_service_cli.py.

The stack is started once for the module (its own namespace, so no other
test's models service competes for the leadership) and the tests run in file order,
reusing the replicas they start: model servers take seconds to import
TensorFlow. The pytest process itself never imports TensorFlow (the model is
built in a subprocess; Predict uses the project's own TF Serving protos).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.models.v1 import models_service_pb2 as pb

from tests.integration.models_stack import (
    AVAILABLE, END, GiB, LOAD_TIMEOUT, REPLICA, ROOT, S, UNLOADING, Tenant, expect_code, file_uri, open_stack,
    predict, set_replica_quota, wait_for,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server, half_plus_two):
    with open_stack(str(tmp_path_factory.mktemp("models")), etcd_server.endpoint, half_plus_two) as stack:
        yield stack


@pytest.fixture(scope="module")
def team(stack) -> Tenant:
    """The member tenant most tests act as, with half_plus_two and a broken
    SavedModel placed in its own storage (where uploads go)."""
    tenant = stack.new_tenant()
    shutil.copytree(stack.saved_model, stack.storage(tenant.name, "models", "hp", "1"))
    shutil.copytree(stack.broken_model, stack.storage(tenant.name, "models", "broken", "1"))
    return tenant


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


def test_replicas_publish_their_framed_socket_and_the_gateway_calls_it(stack, team, deployed):
    """The reconciler publishes the replica's framed socket (dataplane/frame.h)
    beside its gRPC address; the gateway's data plane then sends repeat calls,
    gRPC and REST, over it."""
    version = stack.wait_version(team, "hp", 1, lambda v: v.state == AVAILABLE, "hp v1 AVAILABLE")
    key = f"/cloudml/models/endpoints/{team.name}/hp/1/{version.replicas[0].id}"
    endpoint = pb.ReplicaEndpoint.FromString(stack.etcd.get_prefix(key)[key])
    assert endpoint.address.endswith(".server.sock")
    assert endpoint.frame_address == endpoint.address[:-len(".server.sock")] + ".frame.sock"
    mode = os.stat(endpoint.frame_address[len("unix:"):]).st_mode
    assert stat.S_ISSOCK(mode) and mode & 0o077 == 0, oct(mode)

    def framed() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{stack.rest_port}/metrics", timeout=5).read().decode()
        found = re.search(r'cloudml_gateway_dataplane_calls_total\{path="framed"\} ([0-9.e+]+)', text)
        return float(found.group(1)) if found else 0.0

    before = framed()
    body = json.dumps({"instances": [1.0, 2.0]}).encode()

    def calls_went_framed() -> bool:
        """A round of gRPC and REST calls; whether the data plane has reported
        6 framed ones since `before` (a token's first call per path, and the
        first after a routing change elsewhere in the tenant, such as v2's
        replica coming up, go through the Python gateway; its figures lag by
        about a second)."""
        for _ in range(3):
            assert predict(stack.gateway.address, "hp", 3.0, metadata=team.md) == pytest.approx(3.5)
            request = urllib.request.Request(f"http://127.0.0.1:{stack.rest_port}/v1/models/hp:predict", data=body,
                                             headers={"Authorization": team.md[0][1]})
            assert json.loads(urllib.request.urlopen(request, timeout=10).read()) == {"predictions": [2.5, 3.0]}
        return framed() >= before + 6

    wait_for(calls_went_framed, 20, "the data plane to report framed calls", interval=0.5)


def test_replica_killed_with_sigkill_is_replaced(stack, team, deployed):
    # v2 (created above) must hold its replica's reservation before the usage
    # below can be 2: under load its first replica may still be starting.
    stack.wait_version(team, "hp", 2, lambda v: v.state == AVAILABLE, "hp v2 AVAILABLE")
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

    def usage():
        return team.client.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage.model_replicas

    # hp v1 and v2, one each: the dead replica's reservation is released.
    wait_for(lambda: usage() == 2, 10, "the tenant's replica usage back at 2")
    assert usage() == 2


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
