"""The auth service as a real process against a real etcd: bad input to every
RPC (tenant names, quotas, reservations, paging) is refused with
INVALID_ARGUMENT naming the field, and the bounds themselves are accepted.

The tests share the session's auth process (`auth_service`) and keep apart
with unique tenant names.
"""
from __future__ import annotations

import random

import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1.resources_pb2 import Resources

from tests.integration.auth_helpers import (
    BOUNDS, FIELDS, Code, expect_error, quota, reserve_request,
)


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Team-a", "TEAM", "-team", "team-", "a" * 64, "", "te_am", "te.am", "tëam", "a b"],
                         ids=["upper", "all-upper", "leading-dash", "trailing-dash", "64-chars", "empty",
                              "underscore", "dot", "non-ascii", "space"])
def test_create_tenant_invalid_name_returns_invalid_argument(auth_service, name):
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, "CreateTenant", pb.CreateTenantRequest(name=name))
    assert "name" in err.details()


def test_create_tenant_63_char_name_is_accepted_and_duplicate_returns_already_exists(auth_service):
    name = ("n" + random.randbytes(16).hex() + "x" * 63)[:63]
    created = auth_service.admin.call("CreateTenant", pb.CreateTenantRequest(name=name)).tenant
    assert created.name == name and created.create_time.seconds > 0
    expect_error(Code.ALREADY_EXISTS, auth_service.admin.call, "CreateTenant", pb.CreateTenantRequest(name=name))
    auth_service.admin.call("DeleteTenant", pb.DeleteTenantRequest(name=name))


@pytest.mark.parametrize("rpc,request_", [
    ("GetTenant", pb.GetTenantRequest(name="Bad")),
    ("DeleteTenant", pb.DeleteTenantRequest(name="-bad")),
    ("CreateAccessKey", pb.CreateAccessKeyRequest(tenant="BAD")),
    ("GetQuota", pb.GetQuotaRequest(tenant="")),
    ("ListReservations", pb.ListReservationsRequest(tenant="x" * 64)),
], ids=["get", "delete", "create-key", "get-quota", "list-reservations"])
def test_invalid_tenant_name_in_any_rpc_returns_invalid_argument(auth_service, rpc, request_):
    expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, rpc, request_)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", ["negative", "absurd"])
def test_set_quota_negative_or_absurd_returns_invalid_argument_naming_field(auth_service, field, kind):
    tenant = auth_service.new_tenant("badquota").tenant
    before = quota(auth_service.admin, tenant)
    value = -1 if kind == "negative" else BOUNDS[field] + 1
    limits = Resources(cpu_millis=1000, memory_bytes=2**30, train_jobs=1)
    setattr(limits, field, value)
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, "SetQuota",
                       pb.SetQuotaRequest(tenant=tenant, limits=limits))
    assert f"limits.{field}" in err.details()
    assert quota(auth_service.admin, tenant) == before


def test_set_quota_at_bounds_is_accepted(auth_service):
    tenant = auth_service.new_tenant("maxquota").tenant
    limits = Resources(**BOUNDS)
    response = auth_service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=tenant, limits=limits))
    assert response.limits == limits and quota(auth_service.admin, tenant).limits == limits


@pytest.mark.parametrize("amounts,field", [
    ({"cpu_millis": -100}, "resources.cpu_millis"),
    ({"memory_bytes": 2**61}, "resources.memory_bytes"),
    ({"gpus": -1}, "resources.gpus"),
])
def test_reserve_negative_or_absurd_amount_returns_invalid_argument_naming_field(auth_service, amounts, field):
    member = auth_service.new_tenant("badres")
    err = expect_error(Code.INVALID_ARGUMENT, member.call, "Reserve", reserve_request(member.tenant, "job", **amounts))
    assert field in err.details()
    assert quota(auth_service.admin, member.tenant).usage == Resources()


@pytest.mark.parametrize("owner", ["", "has space", "x" * 254, "tab\tid", "ünï"], ids=["empty", "space", "254", "tab", "non-ascii"])
def test_reserve_invalid_owner_id_returns_invalid_argument(auth_service, owner):
    member = auth_service.new_tenant("badowner")
    err = expect_error(Code.INVALID_ARGUMENT, member.call, "Reserve", reserve_request(member.tenant, owner, cpu_millis=1))
    assert "owner_id" in err.details()


@pytest.mark.parametrize("request_", [
    pb.ListTenantsRequest(page_size=-1),
    pb.ListTenantsRequest(page_token="!!"),
    pb.ListTenantsRequest(page_token="QUJD"),  # base64 of "ABC", not a tenant name
    pb.ListTenantsRequest(page_token="not base64 at all"),
], ids=["negative-page-size", "garbage-page-token", "non-name-page-token", "spaces-page-token"])
def test_list_tenants_bad_paging_returns_invalid_argument(auth_service, request_):
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, "ListTenants", request_)
    assert "page_" in err.details()


def test_list_tenants_pages_through_every_tenant_once(auth_service):
    created = {auth_service.new_tenant("page").tenant for _ in range(5)}
    everything = auth_service.admin.call("ListTenants", pb.ListTenantsRequest(page_size=1000))
    assert not everything.next_page_token
    names, token, pages = [], "", 0
    while True:
        page = auth_service.admin.call("ListTenants", pb.ListTenantsRequest(page_size=3, page_token=token))
        assert len(page.tenants) <= 3
        names += [t.name for t in page.tenants]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert names == [t.name for t in everything.tenants] == sorted(names)
    assert created <= set(names) and "admin" in names and pages > 1
