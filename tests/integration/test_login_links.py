"""Browser login links (AuthService.CreateLoginLink / RedeemLoginLink) on the
session's real auth process and etcd: single use (also under a race),
expiry, revocation, bad paths, and no usable code at rest."""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time

import grpc
import jwt
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from services.common.etcd import Etcd

Code = grpc.StatusCode


def code_of(login_path: str) -> str:
    assert login_path.startswith("/login?code=")
    return login_path.split("code=", 1)[1]


def make_link(client, path: str) -> str:
    return code_of(client.call("CreateLoginLink", pb.CreateLoginLinkRequest(path=path)).login_path)


def redeem(auth_service, code: str):
    return auth_service.stub.RedeemLoginLink(pb.RedeemLoginLinkRequest(code=code), timeout=10)


def refused(auth_service, code: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        redeem(auth_service, code)
    assert info.value.code() == Code.UNAUTHENTICATED, info.value.details()
    return info.value


def test_login_link_redeems_once_to_a_token_for_the_maker(auth_service):
    member = auth_service.new_tenant("login")
    path = f"/tensorboard/{member.tenant}/board/"
    response = member.call("CreateLoginLink", pb.CreateLoginLinkRequest(path=path + "data/runs"))
    assert 50 <= response.expire_time.seconds - time.time() <= 61
    redeemed = redeem(auth_service, code_of(response.login_path))
    claims = jwt.decode(redeemed.token, options={"verify_signature": False})
    assert (claims["sub"], claims["akid"]) == (member.tenant, member.access_key_id)
    assert (redeemed.path, redeemed.cookie_path) == (path + "data/runs", path)
    assert 3500 <= redeemed.expire_time.seconds - time.time() <= 3601
    err = refused(auth_service, code_of(response.login_path))
    assert "login link" in err.details()


def test_login_link_race_yields_exactly_one_token(auth_service):
    member = auth_service.new_tenant("login")
    code = make_link(member, f"/dev/{member.tenant}/nb/")
    results, barrier = [], threading.Barrier(8)

    def attempt():
        barrier.wait()
        try:
            results.append(redeem(auth_service, code).token)
        except grpc.RpcError as err:
            results.append(err.code())

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, str) for r in results) == 1
    assert results.count(Code.UNAUTHENTICATED) == 7


def test_login_link_of_revoked_key_is_refused(auth_service):
    member = auth_service.new_tenant("login")
    code = make_link(member, f"/tensorboard/{member.tenant}/board/")
    auth_service.admin.call("RevokeAccessKey", pb.RevokeAccessKeyRequest(
        tenant=member.tenant, access_key_id=member.access_key_id))
    refused(auth_service, code)


def test_expired_login_link_is_refused(auth_service, etcd_server):
    member = auth_service.new_tenant("login")
    code = make_link(member, f"/tensorboard/{member.tenant}/board/")
    key = "/cloudml/auth/login/" + hashlib.sha256(code.encode()).hexdigest()

    async def age():
        etcd = await Etcd.connect(etcd_server.endpoint)
        try:
            record = json.loads((await etcd.get(key)).value)
            assert code not in json.dumps(record)  # only the digest names it
            record["expires"] = time.time() - 1
            await etcd.put(key, json.dumps(record).encode())
        finally:
            await etcd.close()

    asyncio.run(age())
    refused(auth_service, code)


@pytest.mark.parametrize("path", [
    "", "/", "/v1/models/x", "/tensorboard/", "/tensorboard/{t}", "/tensorboard/{t}/",
    "/tensorboard/{t}/b/../../dev/{t}/x/", "/tensorboard/{t}/b/./x", "/tensorboard/{t}/b//x",
    "/tensorboard/{t}/b/?next=http://evil", "/tensorboard/{t}/B/", "/tensorboard/{t}/b/\\x",
    "https://evil.example/tensorboard/{t}/b/", "/console/{t}/b/",
])
def test_create_login_link_for_a_non_page_returns_invalid_argument(auth_service, path):
    member = auth_service.new_tenant("login")
    with pytest.raises(grpc.RpcError) as info:
        member.call("CreateLoginLink", pb.CreateLoginLinkRequest(path=path.format(t=member.tenant)))
    assert info.value.code() == Code.INVALID_ARGUMENT


def test_an_admin_gets_no_link_to_another_tenants_page_but_one_to_its_own_and_the_console(auth_service):
    """The gateway serves a page only to its own tenant's members (a page runs
    tenant script where the cookie goes), so an admin's link would 404."""
    member = auth_service.new_tenant("login")
    with pytest.raises(grpc.RpcError) as info:
        auth_service.admin.call("CreateLoginLink", pb.CreateLoginLinkRequest(path=f"/tensorboard/{member.tenant}/board/"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "own members" in info.value.details()
    for path in ("/tensorboard/admin/board/", "/ui/"):
        code = make_link(auth_service.admin, path)
        assert jwt.decode(redeem(auth_service, code).token, options={"verify_signature": False})["sub"] == "admin"


@pytest.mark.parametrize("code", ["", "x", "A" * 27, "A" * 200])
def test_redeem_unknown_code_returns_unauthenticated(auth_service, code):
    refused(auth_service, code)
