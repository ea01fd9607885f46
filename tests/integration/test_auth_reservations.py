"""The auth service as a real process against a real etcd: concurrent and
idempotent reservations (exactly as many succeed as fit, across two auth
processes too), who may release a reservation, and the store's transactions
under a key root of their own.

Most tests share the session's auth process (`auth_service`) and keep apart
with unique tenant names; the two-process test starts its own auths
(`auth_launcher`) on a key namespace of its own (`etcd_space`).
"""
from __future__ import annotations

import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1.resources_pb2 import Resources
from services.common.etcd import Etcd

from tests.integration.auth_helpers import (
    FIELDS, Code, expect_error, quota, reserve_request, trailers,
)


# --- reservations ---------------------------------------------------------------------

def _tenant_with_room_for_ten(auth_service):
    member = auth_service.new_tenant("room")
    auth_service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=member.tenant, limits=Resources(
        cpu_millis=10 * 100, memory_bytes=2**30, gpus=0, train_jobs=100, model_replicas=100, studies=100)))
    return member


def test_fifty_parallel_reserves_against_room_for_ten_exactly_ten_succeed(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    one = dict(cpu_millis=100, memory_bytes=2**20, train_jobs=1)
    futures = {
        f"jobs/train/j{i:02d}": member.stub.Reserve.future(
            reserve_request(member.tenant, f"jobs/train/j{i:02d}", **one), metadata=member.md, timeout=30)
        for i in range(50)
    }
    won, busy = [], []
    for owner, future in futures.items():
        err = future.exception()
        if err is None:
            response = future.result()
            assert response.created and response.reservation.owner_id == owner
            won.append(owner)
        else:
            assert err.code() == Code.FAILED_PRECONDITION, f"{err.code().name}: {err.details()}"
            assert trailers(err).get("cloudml-retry") == "quota"
            assert "cpu" in err.details()
            busy.append(owner)
    assert len(won) == 10 and len(busy) == 40

    q = quota(auth_service.admin, member.tenant)
    assert q.usage == Resources(cpu_millis=1000, memory_bytes=10 * 2**20, train_jobs=10)
    reservations = member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations
    assert sorted(r.owner_id for r in reservations) == sorted(won)
    for field in FIELDS:
        assert getattr(q.usage, field) == sum(getattr(r.resources, field) for r in reservations)

    # Full now: one more is a "queue and retry" answer, not an error.
    err = expect_error(Code.FAILED_PRECONDITION, member.call, "Reserve", reserve_request(member.tenant, "late", **one))
    assert trailers(err).get("cloudml-retry") == "quota"

    releases = [member.stub.Release.future(pb.ReleaseRequest(tenant=member.tenant, owner_id=o),
                                           metadata=member.md, timeout=30) for o in won]
    assert all(f.result().released for f in releases)
    assert quota(auth_service.admin, member.tenant).usage == Resources()
    assert not member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations
    # After a release the queued request fits.
    assert member.call("Reserve", reserve_request(member.tenant, "late", **one)).created


def test_fifty_parallel_reserves_across_two_auth_processes_exactly_ten_succeed(etcd_space, auth_launcher):
    """Two auth processes on one etcd: only the etcd transaction (not a
    process-local lock) keeps them from overbooking."""
    first = auth_launcher.connect(auth_launcher.start(etcd_space))
    second = auth_launcher.connect(auth_launcher.start(etcd_space))
    member = _tenant_with_room_for_ten(first)
    stubs = [first.stub, second.stub]
    for stub in stubs:  # warm both connections so that the burst really races
        assert stub.WhoAmI(pb.WhoAmIRequest(), metadata=member.md, timeout=10).tenant == member.tenant
    futures = [
        stubs[i % 2].Reserve.future(reserve_request(member.tenant, f"o{i}", cpu_millis=100), metadata=member.md, timeout=30)
        for i in range(50)
    ]
    outcomes = []
    for future in futures:
        err = future.exception()
        outcomes.append(Code.OK if err is None else err.code())
        if err is not None:
            assert err.code() == Code.FAILED_PRECONDITION and trailers(err).get("cloudml-retry") == "quota", \
                f"{err.code().name}: {err.details()}"
    assert outcomes.count(Code.OK) == 10
    won = {f"o{i}" for i, code in enumerate(outcomes) if code == Code.OK}
    for service in (first, second):
        q = quota(service.admin, member.tenant)
        assert q.usage.cpu_millis == 1000
        listed = service.admin.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant))
        assert {r.owner_id for r in listed.reservations} == won


@pytest.mark.parametrize("amounts,label", [
    ({"cpu_millis": 1001}, "cpu"),
    ({"memory_bytes": 2**30 + 1}, "memory"),
    ({"gpus": 1}, "gpus"),
    ({"cpu_millis": 100, "train_jobs": 101}, "train jobs"),
])
def test_reserve_larger_than_limit_returns_resource_exhausted_naming_resource(auth_service, amounts, label):
    member = _tenant_with_room_for_ten(auth_service)
    err = expect_error(Code.RESOURCE_EXHAUSTED, member.call, "Reserve", reserve_request(member.tenant, "huge", **amounts))
    assert label in err.details()
    assert "cloudml-retry" not in trailers(err)
    assert quota(auth_service.admin, member.tenant).usage == Resources()
    assert not member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations


def test_reserve_same_owner_twice_is_idempotent(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    request = reserve_request(member.tenant, "models/m/1/replica-0", cpu_millis=300, model_replicas=1)
    first = member.call("Reserve", request)
    second = member.call("Reserve", request)
    assert first.created and not second.created
    assert second.reservation == first.reservation
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=300, model_replicas=1)
    # Idempotent even when the quota is full now.
    member.call("Reserve", reserve_request(member.tenant, "filler", cpu_millis=700))
    assert not member.call("Reserve", request).created
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=1000, model_replicas=1)


def test_reserve_same_owner_different_amounts_returns_already_exists(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=100))
    err = expect_error(Code.ALREADY_EXISTS, member.call, "Reserve", reserve_request(member.tenant, "job", cpu_millis=200))
    assert "job" in err.details()
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=100)


def test_release_unknown_owner_reports_not_released(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    assert not member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="never-reserved")).released
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=100))
    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job")).released
    assert not member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


# --- who may release a reservation ------------------------------------------------------

def service_key(auth_service):
    """A logged-in client of a new admin-tenant key, like the platform services' key."""
    return auth_service.member_of("admin", description="platform services (test)")


def test_member_cannot_release_reservation_made_by_service_key(auth_service):
    member = auth_service.new_tenant("heldby")
    service = service_key(auth_service)
    auth_service.admin.call("SetQuota", pb.SetQuotaRequest(
        tenant=member.tenant, limits=Resources(cpu_millis=200, memory_bytes=2**30, train_jobs=5)))
    made = service.call("Reserve", reserve_request(member.tenant, "jobs/train/a", cpu_millis=200, train_jobs=1))
    assert made.created and made.reservation.creator_access_key_id == service.access_key_id
    before = quota(auth_service.admin, member.tenant).usage

    err = expect_error(Code.PERMISSION_DENIED, member.call, "Release",
                       pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/a"))
    assert "\n" not in err.details() and "only it or an admin may release it" in err.details()
    assert service.access_key_id not in err.details()
    assert quota(auth_service.admin, member.tenant).usage == before
    # The freed room was not handed out: a second 200m job still does not fit.
    expect_error(Code.FAILED_PRECONDITION, member.call, "Reserve",
                 reserve_request(member.tenant, "mine", cpu_millis=200))
    # Still there, and the member is not told which key made it.
    listed = member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations
    assert [(r.owner_id, r.creator_access_key_id) for r in listed] == [("jobs/train/a", "")]
    again = member.call("Reserve", reserve_request(member.tenant, "jobs/train/a", cpu_millis=200, train_jobs=1))
    assert not again.created and again.reservation.creator_access_key_id == ""
    admin_view = auth_service.admin.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant))
    assert [r.creator_access_key_id for r in admin_view.reservations] == [service.access_key_id]

    # The key that made it releases it.
    assert service.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/a")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


def test_admin_may_release_reservation_made_by_another_key(auth_service):
    member = auth_service.new_tenant("adminrel")
    service = service_key(auth_service)
    service.call("Reserve", reserve_request(member.tenant, "models/m/1/replica-0", cpu_millis=100, model_replicas=1))
    mine = member.call("Reserve", reserve_request(member.tenant, "mine", cpu_millis=50))
    assert mine.reservation.creator_access_key_id == member.access_key_id
    for owner in ("models/m/1/replica-0", "mine"):
        assert auth_service.admin.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id=owner)).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


def test_member_may_release_its_own_reservation_but_not_another_keys(auth_service):
    member = auth_service.new_tenant("ownrel")
    other_key = auth_service.member_of(member.tenant)
    member.call("Reserve", reserve_request(member.tenant, "mine", cpu_millis=300, studies=1))
    expect_error(Code.PERMISSION_DENIED, other_key.call, "Release",
                 pb.ReleaseRequest(tenant=member.tenant, owner_id="mine"))
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=300, studies=1)
    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="mine")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()
    # Idempotent as before: nothing left to release.
    assert not member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="mine")).released


async def test_reservation_stored_without_creator_only_admin_may_release(auth_service, etcd_server):
    member = auth_service.new_tenant("legacy")
    held = Resources(cpu_millis=250, train_jobs=1)
    # As an older version stored it: no creator recorded.
    old = pb.Reservation(tenant=member.tenant, owner_id="jobs/train/old", resources=held)
    etcd = await Etcd.connect(etcd_server.endpoint)
    try:
        await etcd.put(f"/cloudml/auth/reservations/{member.tenant}/jobs/train/old", old.SerializeToString())
        await etcd.put(f"/cloudml/auth/usage/{member.tenant}", held.SerializeToString())
    finally:
        await etcd.close()
    expect_error(Code.PERMISSION_DENIED, member.call, "Release",
                 pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/old"))
    assert quota(auth_service.admin, member.tenant).usage == held
    assert auth_service.admin.call(
        "Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/old")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


def test_delete_tenant_holding_reservations_returns_failed_precondition(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=100))
    expect_error(Code.FAILED_PRECONDITION, auth_service.admin.call, "DeleteTenant",
                 pb.DeleteTenantRequest(name=member.tenant))
    expect_error(Code.FAILED_PRECONDITION, auth_service.admin.call, "DeleteTenant", pb.DeleteTenantRequest(name="admin"))
    member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job"))
    auth_service.admin.call("DeleteTenant", pb.DeleteTenantRequest(name=member.tenant))


def test_lowering_limit_below_usage_keeps_reservations_and_refuses_new_ones(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=500))
    auth_service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=member.tenant, limits=Resources(cpu_millis=600)))
    q = quota(auth_service.admin, member.tenant)
    assert q.usage.cpu_millis == 500 and q.limits.cpu_millis == 600
    err = expect_error(Code.FAILED_PRECONDITION, member.call, "Reserve", reserve_request(member.tenant, "j2", cpu_millis=200))
    assert trailers(err).get("cloudml-retry") == "quota"
    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job")).released


async def test_auth_store_under_its_own_root_reserves_and_releases_atomically(etcd_endpoint, etcd_prefix):
    from services.auth.store import AuthStore

    etcd = await Etcd.connect(etcd_endpoint)
    try:
        store = AuthStore(etcd, etcd_prefix + "auth")
        tenant = pb.Tenant(name="team-a")
        assert await store.create_tenant(tenant, Resources(cpu_millis=1000))
        assert not await store.create_tenant(tenant, Resources(cpu_millis=1))
        snap = await store.quota_snapshot("team-a", "job-1")
        assert snap.limits.cpu_millis == 1000 and snap.reservation is None
        reservation = pb.Reservation(tenant="team-a", owner_id="job-1", resources=Resources(cpu_millis=300))
        assert await store.commit_reservation(snap, reservation, Resources(cpu_millis=300))
        assert not await store.commit_reservation(snap, reservation, Resources(cpu_millis=300))  # stale snapshot
        limits, usage = await store.quota_and_usage("team-a")
        assert (limits.cpu_millis, usage.cpu_millis) == (1000, 300)
        assert await store.count_reservations("team-a") == 1
        snap = await store.quota_snapshot("team-a", "job-1", with_limits=False)
        assert snap.limits is None and snap.reservation == reservation
        assert await store.commit_release("team-a", "job-1", snap, Resources())
        assert await store.list_reservations("team-a") == []
        kvs, _, _ = await etcd.get_prefix(etcd_prefix)
        assert kvs and all(kv.key.startswith(etcd_prefix + "auth/") for kv in kvs)
    finally:
        await etcd.close()
