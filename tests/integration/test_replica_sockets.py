"""Model-server replicas reachable only by the platform: the models service
starts them on Unix sockets and publishes their endpoints itself (replicas
never reach etcd). A real stack (etcd, auth, models service with the local
runtime, gateway with its native data plane and REST port) and real
half_plus_two replicas (tests/integration/models_stack.py); tests run in file order
on one version with two replicas and batching on (so each replica runs its
native front too).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time
import urllib.request

import grpc
import psutil
import pytest

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import native
from tests.integration.planted_links import planted, reached, tenant_name
from tests.integration.models_stack import AVAILABLE, REPLICA, file_uri, open_stack, predict, wait_for

UNLOADING = pb.MODEL_VERSION_STATE_UNLOADING
MODEL = "sock"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server, half_plus_two):
    with open_stack(str(tmp_path_factory.mktemp("sockets")), etcd_server.endpoint, half_plus_two) as stack:
        yield stack


@pytest.fixture(scope="module")
def team(stack):
    tenant = stack.new_tenant()
    shutil.copytree(stack.saved_model, stack.storage(tenant.name, "models", MODEL, "1"))
    stack.call(tenant, "CreateModel", pb.CreateModelRequest(name=MODEL))
    stack.call(tenant, "CreateVersion", pb.CreateVersionRequest(model=MODEL, model_version=pb.ModelVersion(
        version=1, model_uri=file_uri(stack.storage(tenant.name, "models", MODEL, "1")), resources=REPLICA,
        min_replicas=2, max_replicas=2, batching=pb.BatchingConfig(enabled=True, max_batch_size=8))))
    stack.wait_version(tenant, MODEL, 1, lambda v: [r.state for r in v.replicas] == [AVAILABLE] * 2,
                       "two AVAILABLE replicas")
    return tenant


def endpoints(stack, team) -> dict[str, pb.ReplicaEndpoint]:
    raw = stack.etcd.get_prefix(f"/cloudml/models/endpoints/{team.name}/{MODEL}/1/")
    return {key.rsplit("/", 1)[1]: pb.ReplicaEndpoint.FromString(value) for key, value in raw.items()}


def replica_pid(stack, team, replica_id: str) -> int:
    return stack.replica_port(team.name, MODEL, 1, replica_id)["pid"]


def processes(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def gateway_predict(stack, team, x: float) -> float:
    return predict(stack.gateway.address, MODEL, x, metadata=team.md)


def tenant_socket(endpoint_address: str, team) -> str:
    """The socket in the tenant's directory that a published address (the platform's link to it) names."""
    pinned = endpoint_address[len("unix:"):]
    if not os.path.basename(pinned).startswith(f"{team.name}."):
        return pinned  # (not a link of the platform's)
    return tenant_name(pinned, team.name)


def test_endpoints_are_unix_sockets_in_the_tenants_private_directory(stack, team):
    version = stack.version(team, MODEL, 1)
    found = endpoints(stack, team)
    assert sorted(found) == sorted(r.id for r in version.replicas)
    for replica_id, endpoint in found.items():
        assert endpoint.state == AVAILABLE and endpoint.coalesce_max == 8 * (os.cpu_count() or 1)
        assert endpoint.address.startswith("unix:/"), endpoint
        path = endpoint.address[len("unix:"):]
        assert len(path.encode()) < 100
        # With the native front on the replica's own socket, gateways get the Python server's, beside it.
        name = f"{replica_id}.server.sock" if native.built() else f"{replica_id}.sock"
        # Published as the platform's own link (its 0700 directory) to the socket in the tenant's.
        assert os.path.basename(path) == f"{team.name}.{name}"
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert os.stat(os.path.dirname(path)).st_uid == os.geteuid()
        socket = tenant_socket(endpoint.address, team)
        assert os.path.basename(socket) == name
        assert stat.S_ISSOCK(os.lstat(socket).st_mode) and os.lstat(socket).st_ino == os.lstat(path).st_ino
        directory = os.path.dirname(socket)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.dirname(directory)).st_mode) == 0o711
        assert os.path.basename(directory) == team.name
        # What the API shows is that address too.
        [shown] = [r for r in version.replicas if r.id == replica_id]
        assert shown.address == endpoint.address


def test_replicas_and_their_fronts_listen_on_no_tcp_port_and_never_reach_etcd(stack, team):
    etcd = stack.etcd.endpoint
    for replica_id in endpoints(stack, team):
        procs = processes(replica_pid(stack, team, replica_id))
        if native.built():
            assert [os.path.basename(p.exe()) for p in procs[1:]] == ["cloudml-dataplane"]
        for proc in procs:
            assert "--etcd" not in proc.cmdline()
            assert [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
            peers = {c.raddr for c in proc.net_connections(kind="all") if c.raddr}
            assert not [p for p in peers if str(p) in etcd or (isinstance(p, tuple) and f":{p[1]}" in etcd)], peers


def test_predict_through_the_gateway_grpc_and_rest(stack, team):
    for x in (1.0, 3.0, 5.0):  # the first through the Python gateway, then the data plane's own path
        assert gateway_predict(stack, team, x) == pytest.approx(0.5 * x + 2)
    token = dict(team.md)["authorization"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.rest_port}/v1/models/{MODEL}:predict",
        data=json.dumps({"instances": [[1.0], [3.0]]}).encode(), headers={"Authorization": token}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read()) == {"predictions": [[2.5], [3.5]]}


def test_a_tenant_that_renames_its_replicas_sockets_reaches_nothing_else(stack, team, tmp_path):
    """Anything running as the tenant (a trainer, a notebook) can rename the
    entries of its socket directory: here its replicas' sockets become
    symbolic links to a socket of another user's (a stand-in for another
    tenant's replica, which records who connects). The platform calls the
    replicas by its own links to their sockets: calls are answered by the
    tenant's replicas, and nothing reaches the other socket."""
    names = [tenant_socket(address, team) for endpoint in endpoints(stack, team).values()
             for address in (endpoint.address, endpoint.frame_address)]
    with planted(names, str(tmp_path / "other-tenants-replica.sock")) as decoy:
        # The data plane's calls (framed, and over HTTP/2 to the gRPC server) ...
        for x in (1.0, 2.0, 3.0, 4.0):
            assert gateway_predict(stack, team, x) == pytest.approx(0.5 * x + 2)
        # ... and the Python gateway's (REST metadata goes through it, over gRPC).
        request = urllib.request.Request(f"http://127.0.0.1:{stack.rest_port}/v1/models/{MODEL}/metadata",
                                         headers={"Authorization": dict(team.md)["authorization"]})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["model_spec"]["name"] == MODEL
        time.sleep(0.5)
        assert not reached(decoy), "the platform followed the tenant's symbolic link"


def test_killed_replica_leaves_the_registry_within_two_seconds(stack, team):
    before = endpoints(stack, team)
    victim = sorted(before)[0]
    procs = processes(replica_pid(stack, team, victim))
    os.kill(procs[0].pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: victim not in endpoints(stack, team), 2.0, "the killed replica's endpoint to go", interval=0.02)
    print(f"endpoint removed {time.monotonic() - killed:.3f}s after kill -9")
    assert gateway_predict(stack, team, 2.0) == pytest.approx(3.0)
    stack.wait_version(team, MODEL, 1, lambda v: [r.state for r in v.replicas] == [AVAILABLE] * 2
                       and victim not in [r.id for r in v.replicas], "the killed replica replaced")
    # Its sockets went with it; its front died with it.
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    socket_dir = os.path.dirname(tenant_socket(before[victim].address, team))
    assert not [n for n in os.listdir(socket_dir) if n.startswith(victim)]
    pinned_dir = os.path.dirname(before[victim].address[len("unix:"):])
    assert not [n for n in os.listdir(pinned_dir) if n.startswith(f"{team.name}.{victim}")]


def test_stopped_replica_is_unloading_before_it_is_signalled(stack, team):
    """Scale-down: the endpoint turns UNLOADING while the replica still runs
    and serves (gateways stop routing there first), then goes."""
    before = endpoints(stack, team)
    pids = {replica_id: replica_pid(stack, team, replica_id) for replica_id in before}
    seen: list[tuple[str, bool]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            for replica_id, endpoint in endpoints(stack, team).items():
                if endpoint.state == UNLOADING:
                    seen.append((replica_id, psutil.pid_exists(pids[replica_id])))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stack.call(team, "ScaleVersion", pb.ScaleVersionRequest(model=MODEL, version=1, min_replicas=1,
                                                                max_replicas=1))
        wait_for(lambda: len(endpoints(stack, team)) == 1, 30, "one endpoint left")
    finally:
        done.set()
        watcher.join(5)
    [gone] = set(before) - set(endpoints(stack, team))
    assert (gone, True) in seen, seen
    assert gateway_predict(stack, team, 4.0) == pytest.approx(4.0)
    stack.call(team, "ScaleVersion", pb.ScaleVersionRequest(model=MODEL, version=1, min_replicas=2, max_replicas=2))
    stack.wait_version(team, MODEL, 1, lambda v: [r.state for r in v.replicas] == [AVAILABLE] * 2,
                       "two AVAILABLE replicas again")


def test_kill_9_of_the_models_service_keeps_endpoints_and_predicts(stack, team):
    before = endpoints(stack, team)
    stack.models.kill()
    # No models service at all: endpoints carry no lease, so nothing expires and Predicts go on.
    deadline = time.monotonic() + 8  # beyond the service's own lease (3 s in this stack)
    while time.monotonic() < deadline:
        assert gateway_predict(stack, team, 6.0) == pytest.approx(5.0)
        time.sleep(0.05)
    assert endpoints(stack, team) == before
    stack.start_models()

    def leads() -> bool:
        raw = stack.etcd.get_prefix("/cloudml/models/election/")
        return bool(raw) and f"-{stack.models.process.pid}-" in raw[min(raw)].decode()

    wait_for(leads, 20, "the restarted service to lead")
    # The new leader adopts the replicas and leaves their endpoints as they are
    # (not even rewritten), pass after pass (one every 2 s at least).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert endpoints(stack, team) == before
        assert gateway_predict(stack, team, 8.0) == pytest.approx(6.0)
        time.sleep(0.1)
