"""The console's JSON endpoints: each calls the owning service's gRPC API
with the session's token (the same authorization as the APIs), for the
session's tenant (`?tenant=`, admins only for another one).

    GET  /ui/api/session                      who is logged in, the CSRF token, tenants (admins)
    GET  /ui/api/jobs                         ListJobs
    GET  /ui/api/jobs/{name}                  GetJob (+ its TensorBoard, if any)
    GET  /ui/api/jobs/{name}/metrics          GetJobMetrics
    GET  /ui/api/jobs/{name}/logs             StreamLogs as NDJSON (?replica=worker-0&tail=N&follow=1)
    POST /ui/api/jobs/{name}/cancel           CancelJob
    GET  /ui/api/models                       ListModels + ListVersions + ListExports (artifacts) + request
                                              figures per version
    GET  /ui/api/models/{name}/versions/{version}/artifacts/{artifact}
                                              the artifact's file (DownloadVersion), as an attachment
    POST /ui/api/models/{name}/predict        TF Serving REST JSON in and out (?version=N)
    GET  /ui/api/studies                      ListStudies
    GET  /ui/api/studies/{name}               GetStudy + ListTrials
    GET  /ui/api/quota                        GetQuota
    POST /ui/api/tensorboards/{name}/open     a one-time login link to the TensorBoard (CreateLoginLink)

Errors: `{"error": "..."}` with the HTTP status of the gRPC code (404 for
another tenant's resources, as the APIs answer).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc
from aiohttp import web
from google.protobuf.json_format import MessageToDict

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc
from cloudml.jobs.v1 import tensorboards_pb2 as boards_pb
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.models.v1 import models_service_pb2_grpc as models_grpc
from cloudml.tuner.v1 import tuner_service_pb2 as tuner_pb
from cloudml.tuner.v1 import tuner_service_pb2_grpc as tuner_grpc
from services.common import errors
from services.gateway.console.app import CALL_TIMEOUT, PATH, SECURITY_HEADERS, Refused, Session, csrf_of
from services.gateway.tfs_json import http_status_for_grpc

log = logging.getLogger(__name__)

API = PATH + "api/"
#: pages fetched at most per list (the console shows the newest/first ones)
MAX_PAGES = 20
#: the longest a followed log stream stays open (the page reconnects)
MAX_FOLLOW_SECONDS = 3600
#: seconds between checks that the browser is still there while following
WATCHDOG_SECONDS = 2.0


def to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def ok(body) -> web.Response:
    return web.json_response(body, headers=SECURITY_HEADERS)


def parse_replica(text: str) -> jobs_pb.ReplicaId:
    role, _, index = text.rpartition("-")
    types = jobs_pb.ReplicaType.DESCRIPTOR.values_by_name
    found = types.get("REPLICA_TYPE_" + role.upper()) if role.isalpha() else None
    value = found.number if found is not None else 0
    if not value or not index.isdigit() or int(index) > 10_000:
        raise Refused(400, f"invalid replica {text!r}: <role>-<index>, e.g. worker-0")
    return jobs_pb.ReplicaId(type=value, index=int(index))


def replica_name(replica: jobs_pb.ReplicaId) -> str:
    """"worker-0"; "job" for the job's own lines (installation, platform notes)."""
    if not replica.type:
        return "job"
    return f"{jobs_pb.ReplicaType.Name(replica.type).removeprefix('REPLICA_TYPE_').lower()}-{replica.index}"


class ConsoleApi:
    def __init__(self, console):
        self.console = console

    def add_routes(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        get(API + "session", self._wrap(self.session))
        get(API + "jobs", self._wrap(self.jobs))
        get(API + "jobs/{name}", self._wrap(self.job))
        get(API + "jobs/{name}/metrics", self._wrap(self.metrics))
        get(API + "jobs/{name}/logs", self._wrap(self.logs))
        post(API + "jobs/{name}/cancel", self._wrap(self.cancel, mutating=True))
        get(API + "models", self._wrap(self.models))
        post(API + "models/{name}/predict", self._wrap(self.predict, mutating=True))
        get(API + "models/{name}/versions/{version}/artifacts/{artifact}", self._wrap(self.artifact))
        get(API + "studies", self._wrap(self.studies))
        get(API + "studies/{name}", self._wrap(self.study))
        get(API + "quota", self._wrap(self.quota))
        post(API + "tensorboards/{name}/open", self._wrap(self.open_tensorboard, mutating=True))

    def _wrap(self, handler, mutating: bool = False):
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                session = self.console.mutating(request) if mutating else self.console.session(request)
                return await handler(request, session)
            except Refused as refused:
                return refused.response
            except grpc.aio.AioRpcError as err:
                return web.json_response({"error": err.details() or err.code().name, "code": err.code().name},
                                         status=http_status_for_grpc(err.code()), headers=SECURITY_HEADERS)
            except errors.CloudMLError as err:
                return web.json_response({"error": err.message, "code": err.code.name},
                                         status=http_status_for_grpc(err.code), headers=SECURITY_HEADERS)
        return handle

    def _stub(self, service: str, cls):
        return cls(self.console.directory.channel(service))

    async def _call(self, service: str, cls, method: str, request, session: Session, timeout: float = CALL_TIMEOUT):
        return await getattr(self._stub(service, cls), method)(request, metadata=session.metadata, timeout=timeout)

    async def _pages(self, service, cls, method, request, field, session) -> list:
        items = []
        for _ in range(MAX_PAGES):
            response = await self._call(service, cls, method, request, session)
            items.extend(getattr(response, field))
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        return items

    # --- session --------------------------------------------------------------------------

    async def session(self, request, session: Session):
        body = {"tenant": session.principal.tenant, "admin": session.principal.is_admin,
                "csrf": csrf_of(session.token), "expires": session.principal.expires_at, "tenants": []}
        if session.principal.is_admin:
            tenants = await self._pages("auth", auth_grpc.AuthServiceStub, "ListTenants",
                                        auth_pb.ListTenantsRequest(), "tenants", session)
            body["tenants"] = [t.name for t in tenants]
        return ok(body)

    # --- jobs -----------------------------------------------------------------------------

    async def jobs(self, request, session: Session):
        jobs = await self._pages("jobs", jobs_grpc.JobsServiceStub, "ListJobs",
                                 jobs_pb.ListJobsRequest(tenant=session.tenant), "jobs", session)
        return ok({"tenant": session.tenant, "jobs": [to_dict(job) for job in jobs]})

    async def job(self, request, session: Session):
        name = request.match_info["name"]
        job = (await self._call("jobs", jobs_grpc.JobsServiceStub, "GetJob",
                                jobs_pb.GetJobRequest(tenant=session.tenant, name=name), session)).job
        boards = (await self._call("jobs", jobs_grpc.JobsServiceStub, "ListTensorBoards",
                                   boards_pb.ListTensorBoardsRequest(tenant=session.tenant), session)).tensorboards
        board = next((b for b in boards if b.job == name or any(r.job == name for r in b.runs)), None)
        return ok({"job": to_dict(job), "tensorboard": to_dict(board) if board is not None else None})

    async def metrics(self, request, session: Session):
        response = await self._call("jobs", jobs_grpc.JobsServiceStub, "GetJobMetrics",
                                    jobs_pb.GetJobMetricsRequest(tenant=session.tenant,
                                                                 name=request.match_info["name"]), session)
        series = []
        for s in response.series:
            series.append({"name": s.name, "replica": replica_name(s.replica),
                           "points": [[p.step, p.value, p.attempt] for p in s.points]})
        return ok({"series": series})

    async def cancel(self, request, session: Session):
        job = (await self._call("jobs", jobs_grpc.JobsServiceStub, "CancelJob",
                                jobs_pb.CancelJobRequest(tenant=session.tenant, name=request.match_info["name"]),
                                session)).job
        return ok({"job": to_dict(job)})

    async def logs(self, request, session: Session):
        """Log lines as NDJSON, streamed; with follow=1 the stream stays open
        while the job runs (and the browser listens), at most MAX_FOLLOW_SECONDS
        and never past the session's token."""
        name = request.match_info["name"]
        replicas = [parse_replica(r) for r in request.query.getall("replica", []) if r]
        try:
            tail = int(request.query.get("tail", "0") or 0)
        except ValueError:
            raise Refused(400, "tail must be a number of lines") from None
        follow = request.query.get("follow") in ("1", "true")
        # An existence and authorization check with a proper status before the stream starts.
        await self._call("jobs", jobs_grpc.JobsServiceStub, "GetJob",
                         jobs_pb.GetJobRequest(tenant=session.tenant, name=name), session)
        timeout = CALL_TIMEOUT * 6
        if follow:
            timeout = max(1.0, min(MAX_FOLLOW_SECONDS, session.principal.expires_at - time.time()))
        call = self._stub("jobs", jobs_grpc.JobsServiceStub).StreamLogs(
            jobs_pb.StreamLogsRequest(tenant=session.tenant, name=name, replicas=replicas, follow=follow,
                                      tail_lines=max(0, tail)),
            metadata=session.metadata, timeout=timeout)
        response = web.StreamResponse(headers={**SECURITY_HEADERS, "Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def watchdog():
            while True:
                await asyncio.sleep(WATCHDOG_SECONDS)
                if request.transport is None or request.transport.is_closing():
                    call.cancel()
                    return

        watcher = asyncio.create_task(watchdog())
        try:
            async for chunk in call:
                out = [json.dumps({"replica": replica_name(line.replica), "attempt": line.attempt,
                                   "time": line.time.seconds + line.time.nanos / 1e9, "text": line.text})
                       for line in chunk.lines]
                if out:
                    await response.write(("\n".join(out) + "\n").encode())
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                await response.write((json.dumps({"error": err.details() or err.code().name}) + "\n").encode())
        except (ConnectionResetError, asyncio.CancelledError):
            call.cancel()
            raise
        finally:
            watcher.cancel()
        await response.write_eof()
        return response

    # --- models ---------------------------------------------------------------------------

    async def models(self, request, session: Session):
        models = await self._pages("models", models_grpc.ModelsServiceStub, "ListModels",
                                   models_pb.ListModelsRequest(tenant=session.tenant), "models", session)
        out = []
        for model in models:
            versions = await self._pages("models", models_grpc.ModelsServiceStub, "ListVersions",
                                         models_pb.ListVersionsRequest(tenant=session.tenant, model=model.name),
                                         "model_versions", session)
            entry = to_dict(model)
            entry["versions"] = [to_dict(v) for v in versions]
            for version, shown in zip(versions, entry["versions"]):
                exports = [] if version.HasField("delete_time") else (await self._call(
                    "models", models_grpc.ModelsServiceStub, "ListExports", models_pb.ListExportsRequest(
                        tenant=session.tenant, model=model.name, version=version.version), session)).exports
                shown["artifacts"] = [to_dict(e) for e in exports]
            stats = self._request_figures(session.tenant, model.name)
            for version in entry["versions"]:
                version["requests"] = stats.get(str(version["version"])) if stats is not None else None
            entry["figures_shared_name"] = stats is None
            out.append(entry)
        return ok({"tenant": session.tenant, "models": out, "time": time.time()})

    async def artifact(self, request, session: Session):
        """An artifact's file (e.g. model.tflite), streamed from DownloadVersion
        with the session's token: the API decides who may read it (another
        tenant's model is 404)."""
        name, artifact = request.match_info["name"], request.match_info["artifact"]
        try:
            number = int(request.match_info["version"])
        except ValueError:
            raise Refused(400, "the version is a number") from None
        call = self._stub("models", models_grpc.ModelsServiceStub).DownloadVersion(
            models_pb.DownloadVersionRequest(tenant=session.tenant, model=name, version=number, artifact=artifact),
            metadata=session.metadata, timeout=CALL_TIMEOUT * 60)
        first = await call.read()  # the manifest: errors (404, 412) come back before any byte is sent
        if first is grpc.aio.EOF or first.WhichOneof("part") != "manifest" or len(first.manifest.files) != 1:
            call.cancel()
            raise Refused(502, "the artifact's download did not start with a one-file manifest")
        entry = first.manifest.files[0]
        filename = "".join(c for c in f"{name}-v{number}-{artifact}-{entry.path}" if c.isalnum() or c in "._-")
        response = web.StreamResponse(headers={
            **SECURITY_HEADERS, "Content-Type": "application/octet-stream", "Content-Length": str(entry.size_bytes),
            "Content-Disposition": f'attachment; filename="{filename}"', "X-Content-SHA256": entry.sha256})
        await response.prepare(request)
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                await response.write(message.chunk.data)
        except (ConnectionResetError, asyncio.CancelledError):
            call.cancel()
            raise
        except grpc.aio.AioRpcError as err:  # headers are out: cut the response short (its length tells)
            log.warning("artifact download %s/%s v%d %s cut: %s", session.tenant, name, number, artifact,
                        err.details() or err.code().name)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    def _request_figures(self, tenant: str, model: str) -> dict | None:
        """The gateway's own request counts per version of `tenant`'s `model`
        (cumulative; the page turns them into rates), or None when they cannot
        be told apart from another tenant's: the metrics are labelled with the
        name a caller used, and a bare name is the caller's own model, so
        counts under a bare name that another tenant also uses are not shown."""
        router = getattr(self.console.rest, "router", None)
        if router is None:
            return {}
        owners = {t for (t, m) in router.table.routes if m == model}
        labels = {f"{tenant}.{model}"}
        shared = bool(owners - {tenant})
        if not shared:
            labels.add(model)
        figures: dict[str, dict] = {}
        for (_label, version), counts in router.metrics.snapshot(labels).items():
            merged = figures.setdefault(version, {"requests": 0, "errors": 0, "seconds": 0.0})
            for key in merged:
                merged[key] += counts[key]
        return None if shared and not figures else figures

    async def predict(self, request, session: Session):
        rest = self.console.rest
        if rest is None or rest.router is None:
            raise Refused(503, "model routing is not enabled on this gateway")
        version = request.query.get("version") or None
        if version is not None and not version.isdigit():
            raise Refused(400, f"invalid version {version!r}")
        name = request.match_info["name"]
        if session.tenant != session.principal.tenant:
            name = f"{session.tenant}.{name}"  # an admin looking at a tenant (only public models resolve)
        body = await rest.read_predict_body(request, name, int(version) if version else None, session.metadata)
        return await rest.predict_json(name, int(version) if version else None, body, session.metadata)

    # --- studies --------------------------------------------------------------------------

    async def studies(self, request, session: Session):
        studies = await self._pages("tuner", tuner_grpc.TunerServiceStub, "ListStudies",
                                    tuner_pb.ListStudiesRequest(tenant=session.tenant), "studies", session)
        return ok({"tenant": session.tenant, "studies": [to_dict(s) for s in studies]})

    async def study(self, request, session: Session):
        name = request.match_info["name"]
        study = (await self._call("tuner", tuner_grpc.TunerServiceStub, "GetStudy",
                                  tuner_pb.GetStudyRequest(tenant=session.tenant, name=name), session)).study
        trials = await self._pages("tuner", tuner_grpc.TunerServiceStub, "ListTrials",
                                   tuner_pb.ListTrialsRequest(tenant=session.tenant, study=name), "trials", session)
        return ok({"study": to_dict(study), "trials": [to_dict(t) for t in trials]})

    # --- quota and TensorBoards -----------------------------------------------------------

    async def quota(self, request, session: Session):
        quota = await self._call("auth", auth_grpc.AuthServiceStub, "GetQuota",
                                 auth_pb.GetQuotaRequest(tenant=session.tenant), session)
        return ok(to_dict(quota))

    async def open_tensorboard(self, request, session: Session):
        if session.tenant != session.principal.tenant:
            # Pages serve only their own tenant's callers (services/gateway/pages.py).
            raise Refused(403, f"a TensorBoard of tenant {session.tenant!r} opens only for its own members")
        path = f"/tensorboard/{session.tenant}/{request.match_info['name']}/"
        link = await self._call("auth", auth_grpc.AuthServiceStub, "CreateLoginLink",
                                auth_pb.CreateLoginLinkRequest(path=path), session)
        return ok({"link": link.login_path})
