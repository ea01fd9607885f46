"""Helpers of the auth service's tests (tests/integration/test_auth_*.py):
calls that expect an error, any RPC by name, tokens taken apart, waits,
quotas and reservations in one line.
"""
from __future__ import annotations

import base64
import time

import grpc
import jwt
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1.resources_pb2 import Resources

Code = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["AuthService"]
ALL_RPCS = sorted(m.name for m in SERVICE.methods)
PUBLIC_RPCS = {"IssueToken", "WatchVerificationKeys", "RedeemLoginLink"}
ADMIN_ONLY_RPCS = ("CreateTenant", "DeleteTenant", "SetQuota", "RotateSigningKey")
FIELDS = ("cpu_millis", "memory_bytes", "gpus", "train_jobs", "model_replicas", "studies", "dev_environments",
          "tensorboards")
BOUNDS = {"cpu_millis": 10**9, "memory_bytes": 2**60, "gpus": 10**5,
          "train_jobs": 10**6, "model_replicas": 10**6, "studies": 10**6, "dev_environments": 10**6,
          "tensorboards": 10**6}


# --- helpers ------------------------------------------------------------------------

def expect_error(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    """Calls fn and asserts it fails with `code`; returns the error."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def invoke(stub, rpc: str, request, metadata=(), timeout: float = 10.0):
    """Calls any AuthService RPC; for a server-streaming one, returns its first message."""
    method = SERVICE.methods_by_name[rpc]
    if method.server_streaming:
        call = getattr(stub, rpc)(request, metadata=metadata, timeout=timeout)
        try:
            return next(call)
        finally:
            call.cancel()
    return getattr(stub, rpc)(request, metadata=metadata, timeout=timeout)


def request_class(rpc: str):
    return getattr(pb, SERVICE.methods_by_name[rpc].input_type.name)


def trailers(err: grpc.RpcError) -> dict:
    return dict(err.trailing_metadata() or ())


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def flip_char(segment: str) -> str:
    """The segment with one base64url character in its middle changed (the
    last character may carry unused bits, so it is never the one flipped)."""
    i = len(segment) // 2
    return segment[:i] + ("A" if segment[i] != "A" else "B") + segment[i + 1:]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def unauthenticated_now(client, rpc="WhoAmI", request=None) -> bool:
    try:
        client.call(rpc, request or pb.WhoAmIRequest(), timeout=5)
    except grpc.RpcError as err:
        assert err.code() == Code.UNAUTHENTICATED, f"{err.code().name}: {err.details()}"
        return True
    return False


def quota(admin, tenant: str) -> pb.GetQuotaResponse:
    return admin.call("GetQuota", pb.GetQuotaRequest(tenant=tenant))


def reserve_request(tenant: str, owner: str, **amounts) -> pb.ReserveRequest:
    return pb.ReserveRequest(tenant=tenant, owner_id=owner, resources=Resources(**amounts))
