"""The auth service as a real process against a real etcd, when things fail:
kill -9 during a burst of reservations, etcd going away and coming back, and
health NOT_SERVING until etcd is reachable.

Each test starts its own auth (`auth_launcher`) on a key namespace of its own
on the session etcd (`etcd_space`), or on an etcd of its own when it stops
etcd (`own_etcd`).
"""
from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1.resources_pb2 import Resources
from deploy.local.etcd import EtcdProcess, free_port
from deploy.local.service_process import health_status, read_port_file

from tests.integration.auth_helpers import (
    FIELDS, Code, expect_error, quota, reserve_request, wait_until,
)

SERVING, NOT_SERVING = 1, 2


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd of this test's own, to stop and start again."""
    server = EtcdProcess(str(tmp_path / "etcd")).start()
    yield server
    server.stop()


# --- failures: kill -9, etcd restarts ---------------------------------------------------

def test_kill_9_during_reservation_burst_loses_nothing_acknowledged(etcd_space, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    # Several tenants, so that several quota transactions are in flight at
    # the kill (each process serializes one tenant's reservations).
    members = [service.new_tenant("burst") for _ in range(3)]
    for member in members:
        service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=member.tenant, limits=Resources(
            cpu_millis=10**8, memory_bytes=2**50, train_jobs=10**6, model_replicas=10**6, studies=10**6)))

    # (tenant, owner) -> (state, amounts); state is "reserved" (acknowledged,
    # no release tried), "released" (release acknowledged) or "unknown" (a
    # call on it got no answer).
    ledger: dict[tuple[str, str], tuple[str, Resources]] = {}
    acked = [0]
    errors_seen: list[grpc.RpcError] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        member = members[n % len(members)]
        rng = random.Random(n)
        for i in range(10**6):
            owner = f"jobs/w{n}/o{i}"
            amounts = Resources(cpu_millis=rng.randint(1, 500), memory_bytes=rng.randint(1, 2**30),
                                train_jobs=1, studies=rng.randint(0, 2))
            entry = (member.tenant, owner)
            try:
                ledger[entry] = ("unknown", amounts)
                response = member.call("Reserve", pb.ReserveRequest(
                    tenant=member.tenant, owner_id=owner, resources=amounts), timeout=10)
                assert response.created
                ledger[entry] = ("reserved", amounts)
                if rng.random() < 0.5:
                    ledger[entry] = ("unknown", amounts)
                    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id=owner),
                                       timeout=10).released
                    ledger[entry] = ("released", amounts)
            except grpc.RpcError as err:
                with lock:
                    errors_seen.append(err)
                return
            with lock:
                acked[0] += 1

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(9)]
    for t in threads:
        t.start()
    wait_until(lambda: acked[0] >= 200, 20, what="a burst of acknowledged reservations")
    first = service.process
    first.kill()  # SIGKILL, mid-burst
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert len(errors_seen) == len(threads)  # every worker was still calling when it died
    assert {e.code() for e in errors_seen} <= {Code.UNAVAILABLE}, [(e.code(), e.details()) for e in errors_seen]

    restarted = auth_launcher.connect(auth_launcher.start(etcd_space))
    assert restarted.process.process.pid != first.process.pid
    # The signing key lives in etcd: a token issued before the crash still works.
    members[0].stub = restarted.stub
    assert members[0].call("WhoAmI", pb.WhoAmIRequest()).tenant == members[0].tenant

    states = {state for state, _ in ledger.values()}
    assert {"reserved", "released"} <= states
    for member in members:
        tenant = member.tenant
        q = quota(restarted.admin, tenant)
        listed = restarted.admin.call("ListReservations", pb.ListReservationsRequest(tenant=tenant)).reservations
        present = {r.owner_id: r.resources for r in listed}
        for field in FIELDS:
            used = getattr(q.usage, field)
            assert used >= 0, f"usage of {field} is negative"
            assert used == sum(getattr(r, field) for r in present.values()), \
                f"{tenant}: usage of {field} {used} != sum of its reservations"
        for (owner_tenant, owner), (state, amounts) in ledger.items():
            if owner_tenant != tenant:
                continue
            if state == "reserved":
                assert present.get(owner) == amounts, f"acknowledged reservation {owner} lost"
            elif state == "released":
                assert owner not in present, f"acknowledged release of {owner} undone"
            elif owner in present:
                assert present[owner] == amounts
        assert {(tenant, o) for o in present} <= set(ledger), "a reservation nobody asked for"

        # Nothing leaked: releasing everything brings usage back to zero.
        for owner in present:
            assert restarted.admin.call("Release", pb.ReleaseRequest(tenant=tenant, owner_id=owner)).released
        assert quota(restarted.admin, tenant).usage == Resources()


def test_etcd_restart_under_load_goes_not_serving_and_recovers_without_restart(own_etcd, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(own_etcd.endpoint))
    member = service.new_tenant("etcdgone")
    pid = service.process.process.pid
    endpoint = own_etcd.endpoint

    results: list[tuple[str, grpc.StatusCode]] = []  # (phase, code) of each GetQuota
    phase = ["up"]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            current = phase[0]
            try:
                member.call("GetQuota", pb.GetQuotaRequest(tenant=member.tenant), timeout=4)
                code = Code.OK
            except grpc.RpcError as err:
                code = err.code()
            results.append((current, code))
            time.sleep(0.01)

    def seen(wanted_phase, wanted_code) -> bool:
        return any(p == wanted_phase and c == wanted_code for p, c in list(results))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_until(lambda: seen("up", Code.OK), 5, what="GetQuota OK before the outage")

        own_etcd.stop()
        phase[0] = "down"
        wait_until(lambda: health_status(service.address) == NOT_SERVING, 5, what="health NOT_SERVING")
        wait_until(lambda: seen("down", Code.UNAVAILABLE), 5, what="GetQuota UNAVAILABLE while etcd is down")
        assert health_status(service.address, service="cloudml.auth.v1.AuthService") == NOT_SERVING

        own_etcd.start()
        assert own_etcd.endpoint == endpoint  # same ports, same data dir
        phase[0] = "back"
        wait_until(lambda: health_status(service.address) == SERVING, 15, interval=0.1, what="health SERVING again")
        wait_until(lambda: seen("back", Code.OK), 5, what="GetQuota OK after etcd came back")
    finally:
        stop.set()
        loader.join(10)

    assert service.process.alive() and service.process.process.pid == pid  # recovered without a restart
    unexpected = [(p, c.name) for p, c in results if c not in (Code.OK, Code.UNAVAILABLE)]
    assert not unexpected, unexpected
    # Writes work again, on state that survived the restart.
    assert member.call("Reserve", reserve_request(member.tenant, "after", cpu_millis=100)).created
    assert quota(service.admin, member.tenant).usage.cpu_millis == 100


def test_health_not_serving_until_etcd_reachable(tmp_path, auth_launcher):
    client_port = free_port()
    peer_port = free_port()
    while peer_port == client_port:
        peer_port = free_port()
    endpoint = f"127.0.0.1:{client_port}"
    process = auth_launcher.start(endpoint, wait=False)  # nothing listens there yet

    def address():
        ports = read_port_file(process.port_file)
        return ports["address"] if ports and ports.get("pid") == process.process.pid else ""

    addr = process.address = wait_until(address, 15, what="auth's port file")
    for _ in range(5):
        assert health_status(addr) == NOT_SERVING
        assert health_status(addr, service="cloudml.auth.v1.AuthService") == NOT_SERVING
        time.sleep(0.1)
    expect_error(Code.UNAVAILABLE, auth_launcher.connect, process)  # IssueToken needs etcd

    etcd = EtcdProcess(str(tmp_path / "etcd"), client_port=client_port, peer_port=peer_port)
    try:
        etcd.start()
        assert etcd.endpoint == endpoint
        process.wait_serving(20)
        assert process.address == addr and health_status(addr) == SERVING
        service = auth_launcher.connect(process)
        assert service.admin.call("WhoAmI", pb.WhoAmIRequest()).role == pb.ROLE_ADMIN
    finally:
        etcd.stop()


# --- upgrades ---------------------------------------------------------------------------


def test_quotas_from_before_the_dev_environment_and_tensorboard_counts_get_the_defaults_once(
        etcd_space, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    old, kept = service.new_tenant("old").tenant, service.new_tenant("kept").tenant
    service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=kept, limits=Resources(
        cpu_millis=1000, memory_bytes=2**30, train_jobs=1, dev_environments=1, tensorboards=0)))
    auth_launcher.close()
    # As a version without the two counts left them: its quota record has neither, and no marker.
    key = next(k for k in etcd_space.get_prefix("/cloudml/auth/quotas/") if k.endswith("/" + old))
    etcd_space.put(key, Resources(cpu_millis=3000, memory_bytes=2**30, train_jobs=4).SerializeToString())
    assert etcd_space.delete_prefix("/cloudml/auth/quota-counts-v2") == 1

    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    limits = quota(service.admin, old).limits
    assert (limits.dev_environments, limits.tensorboards, limits.cpu_millis, limits.train_jobs) == (2, 5, 3000, 4)
    assert quota(service.admin, kept).limits.dev_environments == 1  # had counts: left alone
    # Once: an admin's 0 after the upgrade stays 0 through restarts.
    service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=old, limits=Resources(cpu_millis=3000)))
    auth_launcher.close()
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    assert quota(service.admin, old).limits.dev_environments == 0
