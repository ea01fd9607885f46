"""The interceptor chain on a real grpc.aio server on 127.0.0.1:0: typed errors
become status codes, anything else INTERNAL with a request id, auth is
enforced except on public methods, and metrics count every call."""
import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pbg
from services.common import errors
from services.common.interceptors import ServerMetrics, ServerPipeline
from services.common.tokens import TokenVerifier, principal


class Fake(pbg.AuthServiceServicer):
    async def GetTenant(self, request, context):
        if request.name == "boom":
            raise RuntimeError("secret internals")
        if request.name == "busy":
            raise errors.QuotaBusy("not now")
        if request.name == "missing":
            raise errors.NotFound("tenant 'missing' not found")
        return pb.GetTenantResponse(tenant=pb.Tenant(name=principal().tenant))

    async def IssueToken(self, request, context):
        return pb.IssueTokenResponse(token="public")

    async def WatchVerificationKeys(self, request, context):
        yield pb.VerificationKeys(issuer="a")
        raise errors.Unavailable("stream broke")


@pytest.fixture
async def server():
    import time

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier()
    verifier.update({"k": key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()}, set())
    registry = CollectorRegistry()
    svc = "/cloudml.auth.v1.AuthService/"
    srv = grpc.aio.server(interceptors=[
        ServerPipeline(ServerMetrics(registry), verifier, frozenset({svc + "IssueToken", svc + "WatchVerificationKeys"})),
    ])
    pbg.add_AuthServiceServicer_to_server(Fake(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    now = int(time.time())
    token = jwt.encode({"iss": "cloudml-auth", "aud": "cloudml", "sub": "team-a", "role": 1, "akid": "AK",
                        "iat": now, "exp": now + 60}, key, algorithm="EdDSA", headers={"kid": "k"})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pbg.AuthServiceStub(channel)
    stub.channel = channel
    yield stub, (("authorization", f"Bearer {token}"),), registry
    await channel.close()
    await srv.stop(0)


async def test_authenticated_call_sees_principal(server):
    stub, md, _ = server
    assert (await stub.GetTenant(pb.GetTenantRequest(name="x"), metadata=md)).tenant.name == "team-a"


async def test_missing_token_is_unauthenticated(server):
    stub, _, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetTenant(pb.GetTenantRequest(name="x"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_public_method_needs_no_token(server):
    stub, _, _ = server
    assert (await stub.IssueToken(pb.IssueTokenRequest())).token == "public"


async def test_typed_error_maps_to_code(server):
    stub, md, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetTenant(pb.GetTenantRequest(name="missing"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "tenant 'missing' not found"


async def test_quota_busy_carries_retry_trailer(server):
    stub, md, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetTenant(pb.GetTenantRequest(name="busy"), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("cloudml-retry", "quota") in tuple(err.value.trailing_metadata())
    assert isinstance(errors.from_rpc_error(err.value), errors.QuotaBusy)


async def test_unexpected_error_is_internal_with_request_id_and_no_details(server):
    stub, md, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetTenant(pb.GetTenantRequest(name="boom"), metadata=md + (("x-request-id", "rid-7"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "rid-7" in err.value.details() and "secret internals" not in err.value.details()


async def test_streaming_error_after_messages(server):
    stub, _, _ = server
    call = stub.WatchVerificationKeys(pb.WatchVerificationKeysRequest())
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for item in call:
            got.append(item)
    assert len(got) == 1 and err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_metrics_count_calls_by_code(server):
    stub, md, registry = server
    await stub.GetTenant(pb.GetTenantRequest(name="x"), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetTenant(pb.GetTenantRequest(name="missing"), metadata=md)
    labels = {"grpc_service": "cloudml.auth.v1.AuthService", "grpc_method": "GetTenant"}

    def handled(code):
        return registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code})

    # An aborted call's status reaches the client before the server's handler
    # unwinds (and counts it), so the NOT_FOUND sample may land a moment later.
    deadline = asyncio.get_running_loop().time() + 5
    while handled("NOT_FOUND") is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert handled("OK") == 1
    assert handled("NOT_FOUND") == 1


async def test_undecodable_request_is_invalid_argument_after_authentication(server):
    stub, md, _ = server
    raw = stub.channel.unary_unary("/cloudml.auth.v1.AuthService/GetTenant")
    garbage = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no message parses from it
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(garbage, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(garbage)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A public method too (no token needed): INVALID_ARGUMENT, never UNKNOWN/INTERNAL.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.channel.unary_unary("/cloudml.auth.v1.AuthService/IssueToken")(garbage)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
