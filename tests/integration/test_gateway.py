"""The gateway as a real process in front of the real auth service and, for the
APIs whose services are built later, a stand-in jobs backend (a real gRPC
server registered in etcd that echoes what it receives)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc
from deploy.local.stack import AuthGatewayStack, EtcdTarget
from services.common.etcd import Etcd
from services.common.etcd_concurrency import Session
from services.common.registry import register

ADMIN = ("AKGWTESTADMIN0000000", "gw-admin-secret")
SERVICE = ("AKGWTESTSERVICE00000", "gw-service-secret")


class EchoJobsBackend:
    """A JobsService stand-in: records metadata and deadlines, echoes names."""

    def __init__(self, etcd: EtcdTarget):
        self.etcd = etcd
        self.seen: list[dict] = []
        self.ready = threading.Event()
        self._stop = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self):
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        backend = self

        class Servicer(jobs_grpc.JobsServiceServicer):
            async def GetJob(self, request, context):
                backend.seen.append({"metadata": dict(context.invocation_metadata()),
                                     "time_remaining": context.time_remaining()})
                if request.name == "slow":
                    await asyncio.sleep(3)
                if request.name == "missing":
                    await context.abort(grpc.StatusCode.NOT_FOUND, "job 'missing' not found",
                                        trailing_metadata=(("x-backend", "said-no"),))
                context.set_trailing_metadata((("x-backend", "echo"),))
                return jobs_pb.GetJobResponse(job=jobs_pb.TrainJob(name=request.name))

            async def StreamLogs(self, request, context):
                for i in range(3):
                    yield jobs_pb.StreamLogsResponse()
                await context.abort(grpc.StatusCode.DATA_LOSS, "log file truncated")

        server = grpc.aio.server()
        jobs_grpc.add_JobsServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        etcd = await self.etcd.connect()
        session = await Session(etcd, ttl=5).start()
        await register(session, "jobs", "echo", f"127.0.0.1:{port}")
        self.ready.set()
        await self._stop.wait()
        await session.close()
        await server.stop(0)
        await etcd.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory, etcd_server):
    stack = AuthGatewayStack(tmp_path_factory.mktemp("gw"), etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
    backend = EchoJobsBackend(stack.etcd).start()
    channel = grpc.insecure_channel(stack.gateway.address)
    token = auth_grpc.AuthServiceStub(channel).IssueToken(
        auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token
    yield {"gateway": stack.gateway, "rest": stack.rest, "auth": stack.auth, "channel": channel, "backend": backend,
           "md": (("authorization", f"Bearer {token}"),)}
    channel.close()
    backend.stop()
    stack.stop()


def _jobs(platform):
    return jobs_grpc.JobsServiceStub(platform["channel"])


def test_issue_token_needs_no_token_through_gateway(platform):
    resp = auth_grpc.AuthServiceStub(platform["channel"]).IssueToken(
        auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1]))
    assert resp.token.count(".") == 2


def test_unary_rpc_reaches_auth_service(platform):
    who = auth_grpc.AuthServiceStub(platform["channel"]).WhoAmI(auth_pb.WhoAmIRequest(), metadata=platform["md"])
    assert who.tenant == "admin"


def test_missing_token_is_refused_at_gateway_without_reaching_backend(platform):
    before = len(platform["backend"].seen)
    with pytest.raises(grpc.RpcError) as err:
        _jobs(platform).GetJob(jobs_pb.GetJobRequest(name="x"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(platform["backend"].seen) == before


def test_garbage_token_is_unauthenticated(platform):
    with pytest.raises(grpc.RpcError) as err:
        _jobs(platform).GetJob(jobs_pb.GetJobRequest(name="x"), metadata=(("authorization", "Bearer abc.def.ghi"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_status_code_message_and_trailers_are_preserved(platform):
    stub = auth_grpc.AuthServiceStub(platform["channel"])
    with pytest.raises(grpc.RpcError) as err:
        stub.Reserve(auth_pb.ReserveRequest(tenant="admin", owner_id="gw/too-big",
                                            resources={"cpu_millis": 10**8}), metadata=platform["md"])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cpu" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        _jobs(platform).GetJob(jobs_pb.GetJobRequest(name="missing"), metadata=platform["md"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "job 'missing' not found"
    assert ("x-backend", "said-no") in tuple(err.value.trailing_metadata())


def test_quota_busy_trailer_survives_the_hop(platform):
    stub = auth_grpc.AuthServiceStub(platform["channel"])
    md = platform["md"]
    stub.CreateTenant(auth_pb.CreateTenantRequest(name="gw-busy"), metadata=md)
    stub.SetQuota(auth_pb.SetQuotaRequest(tenant="gw-busy", limits={"cpu_millis": 100}), metadata=md)
    stub.Reserve(auth_pb.ReserveRequest(tenant="gw-busy", owner_id="a", resources={"cpu_millis": 100}), metadata=md)
    with pytest.raises(grpc.RpcError) as err:
        stub.Reserve(auth_pb.ReserveRequest(tenant="gw-busy", owner_id="b", resources={"cpu_millis": 100}),
                     metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("cloudml-retry", "quota") in tuple(err.value.trailing_metadata())


def test_metadata_and_trailers_forwarded(platform):
    response, call = _jobs(platform).GetJob.with_call(
        jobs_pb.GetJobRequest(name="echo"),
        metadata=platform["md"] + (("x-request-id", "rid-123"), ("x-custom", "v")),
    )
    assert response.job.name == "echo"
    seen = platform["backend"].seen[-1]["metadata"]
    assert seen["x-request-id"] == "rid-123" and seen["x-custom"] == "v"
    assert seen["authorization"].startswith("Bearer ")
    assert ("x-backend", "echo") in tuple(call.trailing_metadata())


def test_deadline_propagates_to_backend(platform):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _jobs(platform).GetJob(jobs_pb.GetJobRequest(name="slow"), metadata=platform["md"], timeout=0.4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 1.5
    remaining = platform["backend"].seen[-1]["time_remaining"]
    assert remaining is not None and remaining < 0.5  # the client deadline, not none


def test_server_streaming_relays_messages_then_status(platform):
    call = _jobs(platform).StreamLogs(jobs_pb.StreamLogsRequest(name="x"), metadata=platform["md"])
    received = 0
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            received += 1
    assert received == 3
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert err.value.details() == "log file truncated"


def test_server_streaming_from_auth(platform):
    call = auth_grpc.AuthServiceStub(platform["channel"]).WatchVerificationKeys(
        auth_pb.WatchVerificationKeysRequest())
    first = next(call)
    call.cancel()
    assert first.public_keys and first.audience == "cloudml"


def test_service_not_running_is_unavailable(platform):
    from cloudml.tuner.v1 import tuner_service_pb2 as tuner_pb
    from cloudml.tuner.v1 import tuner_service_pb2_grpc as tuner_grpc
    with pytest.raises(grpc.RpcError) as err:
        tuner_grpc.TunerServiceStub(platform["channel"]).ListStudies(
            tuner_pb.ListStudiesRequest(), metadata=platform["md"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tuner" in err.value.details()


def test_unknown_method_is_unimplemented(platform):
    call = platform["channel"].unary_unary("/cloudml.nope.v1.Nope/Do")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", metadata=platform["md"])
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED



def test_models_download_and_export_rpcs_are_routed_with_their_shapes():
    """The device RPCs (issue 16) are proxied to the models service like every
    platform API: DownloadVersion as a server stream, the others unary."""
    from services.gateway.routes import platform_routes
    routes = platform_routes()
    shapes = {name: (routes[f"/cloudml.models.v1.ModelsService/{name}"].owner,
                     routes[f"/cloudml.models.v1.ModelsService/{name}"].client_streaming,
                     routes[f"/cloudml.models.v1.ModelsService/{name}"].server_streaming)
              for name in ("ExportVersion", "GetExport", "ListExports", "DownloadVersion", "UploadModel")}
    assert shapes == {"ExportVersion": ("models", False, False), "GetExport": ("models", False, False),
                      "ListExports": ("models", False, False), "DownloadVersion": ("models", False, True),
                      "UploadModel": ("models", True, False)}


def test_internal_services_are_neither_routed_nor_listed(platform):
    """ReplicaService (replicas' PredictBatch) and Dataplane (the gateway's own
    attach stream) are internal: the gateway does not relay them to any
    service, and reflection lists only the public APIs."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from services.gateway.routes import platform_routes
    public = {"cloudml.auth.v1.AuthService", "cloudml.jobs.v1.JobsService", "cloudml.jobs.v1.DevEnvironmentService",
              "cloudml.models.v1.ModelsService", "cloudml.tuner.v1.TunerService"}
    assert {m.split("/")[1] for m in platform_routes()} == public
    for method in ("/cloudml.internal.v1.ReplicaService/PredictBatch", "/cloudml.internal.v1.Dataplane/Attach"):
        call = platform["channel"].unary_unary(method)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", metadata=platform["md"], timeout=5)
        assert err.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED), method
    stub = reflection_pb2_grpc.ServerReflectionStub(platform["channel"])
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            metadata=platform["md"], timeout=5))
    listed = {s.name for s in answer.list_services_response.service}
    assert listed == public | {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                               "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}, listed

def test_rest_probes_and_metrics(platform):
    import urllib.error
    import urllib.request
    base = platform["rest"]
    assert json.load(urllib.request.urlopen(base + "/healthz")) == {"status": "ok"}
    assert json.load(urllib.request.urlopen(base + "/readyz")) == {"status": "ready"}
    metrics = urllib.request.urlopen(base + "/monitoring/prometheus/metrics").read().decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="WhoAmI"' in metrics
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/nope")
    assert err.value.code == 404 and "error" in json.load(err.value)


async def test_client_and_bidi_streaming_are_forwarded_as_bytes(etcd_endpoint, etcd_prefix):
    """No platform RPC streams requests yet; the proxy supports it, checked
    here with a synthetic route against a byte-echo backend."""
    from services.common.registry import Directory
    from services.gateway.proxy import Proxy
    from services.gateway.routes import Route

    async def upload(request_iterator, context):
        return b"|".join([chunk async for chunk in request_iterator])

    async def chat(request_iterator, context):
        async for chunk in request_iterator:
            yield chunk.upper()

    class Backend(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method.endswith("/Upload"):
                return grpc.stream_unary_rpc_method_handler(upload)
            return grpc.stream_stream_rpc_method_handler(chat)

    backend = grpc.aio.server()
    backend.add_generic_rpc_handlers((Backend(),))
    bport = backend.add_insecure_port("127.0.0.1:0")
    await backend.start()
    etcd = await Etcd.connect(etcd_endpoint)
    session = await Session(etcd, ttl=5).start()
    await register(session, "streamtest", "one", f"127.0.0.1:{bport}")
    directory = Directory(etcd).start()
    await directory.wait_synced(5)
    routes = {
        "/cloudml.streamtest.v1.S/Upload": Route("/cloudml.streamtest.v1.S/Upload", "streamtest", True, False),
        "/cloudml.streamtest.v1.S/Chat": Route("/cloudml.streamtest.v1.S/Chat", "streamtest", True, True),
    }
    front = grpc.aio.server()
    front.add_generic_rpc_handlers((Proxy(routes, directory),))
    fport = front.add_insecure_port("127.0.0.1:0")
    await front.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fport}") as channel:
        async def chunks():
            for c in (b"a", b"b", b"c"):
                yield c
        assert await channel.stream_unary("/cloudml.streamtest.v1.S/Upload")(chunks()) == b"a|b|c"
        replies = [r async for r in channel.stream_stream("/cloudml.streamtest.v1.S/Chat")(chunks())]
        assert replies == [b"A", b"B", b"C"]
    await front.stop(0)
    await backend.stop(0)
    await directory.close()
    await session.close()
    await etcd.close()
