"""`cloudml.Client`: the Python SDK for a Cloud-ML platform.

    import cloudml

    client = cloudml.Client()                      # env, else `cloudml configure`'s file
    job = client.jobs.submit("linear", module="trainer.task", package="pkgs/trainer-1.0.tar.gz", wait=True)
    client.models.create("linear", job.output_path + "/model/1", wait=True)
    print(client.models.predict("linear", {"keys": [[1]], "X": [[10.0]]}))
    study = client.studies.wait(client.studies.submit("examples/studies/linear_space.json").name)
    print(client.tensorboards.login_link(client.tensorboards.for_job("linear")))
    env = client.dev.create("nb", cpu="2", memory="4Gi")   # a JupyterLab server; client.dev.login_link("nb")

    client.create_tenant("team-a")                 # admin calls

    key = client.create_access_key("team-a", description="ci")
    client.set_quota("team-a", cpu="8", memory="16Gi", gpus=1)

The client talks to ONE endpoint (the gateway, 127.0.0.1:8500 on a local
platform), over a synchronous gRPC channel. It exchanges its access key for a
bearer token with `IssueToken`, keeps it, refreshes it shortly before it
expires (and once more when a call is refused because the token expired), and
attaches it to every call as `authorization: Bearer <token>` through a client
interceptor, so stubs of any platform service built on `client.channel` (or
with `client.stub(StubClass)`) are authenticated too. Calls without a deadline
of their own get the client's `timeout` (response-streaming calls excepted:
they may legitimately run long, so pass `timeout=` to them yourself).

Every typed method raises `cloudml.errors.CloudMLError` subclasses; wrap calls
on other services' stubs with `client.call(stub.Method, request)` to get the
same errors.
"""
from __future__ import annotations

import base64
import collections
import json
import threading
import time
from datetime import datetime, timezone
from typing import Iterator

import grpc

from cloudml import config as _config
from cloudml import errors, units
from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.common.v1 import resources_pb2

__all__ = ["Client", "make_resources", "RESOURCE_FIELDS"]

DEFAULT_TIMEOUT = 30.0
# Refresh a token this long before it expires (at most), so a call never
# leaves with a token that dies in flight.
REFRESH_MARGIN = 60.0
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)

# Resources fields and the SDK/CLI names that set them, with their parser.
RESOURCE_FIELDS = {
    "cpu": ("cpu_millis", units.parse_cpu),
    "memory": ("memory_bytes", units.parse_memory),
    "gpus": ("gpus", lambda v: units.parse_count(v, "gpus")),
    "train_jobs": ("train_jobs", lambda v: units.parse_count(v, "train_jobs")),
    "model_replicas": ("model_replicas", lambda v: units.parse_count(v, "model_replicas")),
    "studies": ("studies", lambda v: units.parse_count(v, "studies")),
    "dev_environments": ("dev_environments", lambda v: units.parse_count(v, "dev_environments")),
    "tensorboards": ("tensorboards", lambda v: units.parse_count(v, "tensorboards")),
}


def make_resources(base: resources_pb2.Resources | None = None, **amounts) -> resources_pb2.Resources:
    """A `Resources` message from human amounts, over `base` (copied).

    Keywords: cpu ("0.5", "500m", 2), memory ("100M", "1Gi", 4096), gpus,
    train_jobs, model_replicas, studies, dev_environments, tensorboards; None leaves a field as in `base`.
    Raises ValueError on a malformed or negative amount.
    """
    result = resources_pb2.Resources()
    if base is not None:
        result.CopyFrom(base)
    for name, value in amounts.items():
        if name not in RESOURCE_FIELDS:
            raise TypeError(f"unknown resource {name!r}; expected one of {', '.join(RESOURCE_FIELDS)}")
        if value is None:
            continue
        field, parse = RESOURCE_FIELDS[name]
        setattr(result, field, parse(value))
    return result


# --- tokens -------------------------------------------------------------------------


def _jwt_lifetime(token: str) -> float | None:
    """exp - iat from the token's (unverified) claims: the lifetime the server
    granted, measured on the server's clock, so clock skew does not matter."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - float(claims["iat"])
    except Exception:
        return None


class _TokenSource:
    """Holds the current bearer token; thread-safe; fetches a new one when the
    current one is missing, invalidated or about to expire."""

    def __init__(self, channel: grpc.Channel, endpoint: str, access_key: str, secret_key: str,
                 ttl_seconds: int, timeout: float):
        self._stub = auth_grpc.AuthServiceStub(channel)  # a channel without the auth interceptor
        self._endpoint = endpoint
        self._access_key = access_key
        self._secret_key = secret_key
        self._ttl_seconds = int(ttl_seconds or 0)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token = ""
        self._refresh_at = 0.0  # time.monotonic()
        self.expire_time: datetime | None = None

    def get(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._refresh_at:
                self._fetch()
            return self._token

    def invalidate(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = ""

    def _fetch(self) -> None:
        sent = time.monotonic()
        try:
            resp = self._stub.IssueToken(
                auth_pb.IssueTokenRequest(
                    access_key_id=self._access_key, secret_key=self._secret_key, ttl_seconds=self._ttl_seconds
                ),
                timeout=self._timeout,
            )
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self._endpoint) from None
        lifetime = _jwt_lifetime(resp.token)
        if lifetime is None:
            lifetime = max(0.0, resp.expire_time.seconds - time.time())
        self._token = resp.token
        self._refresh_at = sent + lifetime - min(REFRESH_MARGIN, lifetime * 0.1)
        self.expire_time = datetime.fromtimestamp(resp.expire_time.seconds, tz=timezone.utc)


# --- the interceptor ------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


def _token_expired(outcome) -> bool:
    try:
        return (outcome.code() == grpc.StatusCode.UNAUTHENTICATED
                and "expired" in (outcome.details() or "").lower())
    except Exception:
        return False


class _AuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` (unless the call carries its own)
    and a default deadline; retries a unary call once when the server says
    the token expired."""

    def __init__(self, tokens: _TokenSource, timeout: float):
        self._tokens = tokens
        self._timeout = timeout

    def _details(self, details, default_timeout: bool) -> tuple[_CallDetails, str | None]:
        metadata = list(details.metadata or ())
        token = None
        if not any(k.lower() == "authorization" for k, _ in metadata):
            token = self._tokens.get()
            metadata.append(("authorization", f"Bearer {token}"))
        timeout = details.timeout
        if timeout is None and default_timeout:
            timeout = self._timeout
        return _CallDetails(details.method, timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None)), token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details, token = self._details(client_call_details, True)
        outcome = continuation(details, request)
        if token is not None and _token_expired(outcome):
            self._tokens.invalidate(token)
            details, _ = self._details(client_call_details, True)
            outcome = continuation(details, request)
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        details, _ = self._details(client_call_details, False)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        details, _ = self._details(client_call_details, True)
        return continuation(details, request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        details, _ = self._details(client_call_details, False)
        return continuation(details, request_iterator)


# --- the client ------------------------------------------------------------------------


class Client:
    """A connection to a Cloud-ML platform with one access key.

    Settings are resolved one by one from the arguments, then the environment
    (CLOUDML_ENDPOINT, CLOUDML_ACCESS_KEY, CLOUDML_SECRET_KEY), then the config
    file (`config_path`, $CLOUDML_CONFIG or ~/.config/cloudml/config.json).
    `profile` (default $CLOUDML_PROFILE) picks a named profile of that file
    (`cloudml configure --profile NAME`) instead, for everything it holds.
    `timeout` is the deadline, in seconds, of every call that has none of its
    own. `token_ttl` asks IssueToken for tokens of that many seconds (the
    server's default, an hour, when None).

    No network traffic happens until the first call. Use it as a context
    manager, or call `close()`, to release the channel.
    """

    def __init__(self, endpoint: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                 *, config_path: str | None = None, timeout: float = DEFAULT_TIMEOUT, token_ttl: int | None = None,
                 options: tuple = (), profile: str | None = None):
        creds = _config.resolve(endpoint, access_key, secret_key, config_path=config_path, profile=profile)
        self.profile = profile if profile is not None else _config.default_profile()
        self.endpoint = creds.endpoint
        self.rest_endpoint = creds.rest_endpoint
        self.access_key = creds.access_key
        self.timeout = float(timeout)
        from cloudml import __version__

        channel_options = CHANNEL_OPTIONS + (("grpc.primary_user_agent", f"cloudml-python/{__version__}"),)
        self._raw_channel = grpc.insecure_channel(self.endpoint, options=channel_options + tuple(options))
        self._tokens = _TokenSource(self._raw_channel, self.endpoint, creds.access_key, creds.secret_key,
                                    token_ttl or 0, self.timeout)
        self.channel: grpc.Channel = grpc.intercept_channel(self._raw_channel, _AuthInterceptor(self._tokens,
                                                                                                 self.timeout))
        self._stubs: dict[type, object] = {}
        self._auth = self.stub(auth_grpc.AuthServiceStub)
        self._own_tenant: str | None = None
        from cloudml.sdk.jobs import Jobs  # noqa: PLC0415
        from cloudml.sdk.models import Models  # noqa: PLC0415
        from cloudml.sdk.dev import DevEnvironments  # noqa: PLC0415
        from cloudml.sdk.studies import Studies  # noqa: PLC0415
        from cloudml.sdk.tensorboards import TensorBoards  # noqa: PLC0415

        #: train jobs: submit, get, list, cancel, delete, logs, metrics, watch, wait
        self.jobs = Jobs(self)
        #: models: create, deploy, label, predict, wait, versions, ...
        self.models = Models(self)
        #: hyperparameter studies: submit, get, list, trials, best, wait, cancel
        self.studies = Studies(self)
        #: TensorBoards: create, for_job, for_study, get, list, wait, login_link, delete
        self.tensorboards = TensorBoards(self)
        #: dev environments (JupyterLab): create, get, list, stop, start, wait, login_link, delete
        self.dev = DevEnvironments(self)

    # --- plumbing --------------------------------------------------------------------

    def stub(self, stub_class):
        """A stub of any platform service on the authenticated channel (cached)."""
        stub = self._stubs.get(stub_class)
        if stub is None:
            stub = self._stubs[stub_class] = stub_class(self.channel)
        return stub

    def call(self, method, request, *, timeout: float | None = None, metadata=None):
        """Calls a unary stub method; grpc errors become `CloudMLError`s."""
        try:
            return method(request, timeout=timeout or self.timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self.endpoint) from None

    def token(self) -> str:
        """A valid bearer token for these credentials (fetched or refreshed as needed)."""
        return self._tokens.get()

    @property
    def token_expire_time(self) -> datetime | None:
        """When the current token expires (UTC), once one was fetched."""
        return self._tokens.expire_time

    def close(self) -> None:
        """Releases the channel (the client is unusable afterwards)."""
        self._raw_channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(endpoint={self.endpoint!r}, access_key={self.access_key!r})"

    def _tenant(self, tenant: str | None) -> str:
        """`tenant`, or the caller's own tenant when None/empty."""
        if tenant:
            return tenant
        if self._own_tenant is None:
            self._own_tenant = self.whoami().tenant
        return self._own_tenant

    # --- identity --------------------------------------------------------------------

    def whoami(self) -> auth_pb.WhoAmIResponse:
        """The caller's tenant, role, access key id and token expiry."""
        return self.call(self._auth.WhoAmI, auth_pb.WhoAmIRequest())

    def login_link(self, path: str) -> str:
        """A one-time browser login link (valid about a minute) that opens
        `path` (e.g. "/tensorboard/<tenant>/<name>/") on the gateway's HTTP
        endpoint (AuthService/CreateLoginLink)."""
        response = self.call(self._auth.CreateLoginLink, auth_pb.CreateLoginLinkRequest(path=path))
        base = (self.rest_endpoint or "http://127.0.0.1:8501").rstrip("/")
        return base + response.login_path

    def list_jobs(self, tenant: str | None = None) -> list:
        """Every train job of `tenant` (default: the caller's own), newest pages first as ListJobs gives them."""
        from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
        from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc

        stub, jobs, token = self.stub(jobs_grpc.JobsServiceStub), [], ""
        while True:
            page = self.call(stub.ListJobs, jobs_pb.ListJobsRequest(tenant=tenant or "", page_token=token))
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return jobs

    # --- tenants ---------------------------------------------------------------------

    def create_tenant(self, name: str, description: str = "") -> auth_pb.Tenant:
        """Creates a tenant (ADMIN only; AlreadyExists when it exists)."""
        return self.call(self._auth.CreateTenant, auth_pb.CreateTenantRequest(name=name, description=description)).tenant

    def get_tenant(self, name: str) -> auth_pb.Tenant:
        """The tenant `name` (a member sees only its own)."""
        return self.call(self._auth.GetTenant, auth_pb.GetTenantRequest(name=name)).tenant

    def list_tenants(self, page_size: int = 0) -> Iterator[auth_pb.Tenant]:
        """Every tenant the caller may see, in name order, fetched page by page
        as the iterator advances (errors surface while iterating)."""
        page_token = ""
        while True:
            resp = self.call(self._auth.ListTenants,
                             auth_pb.ListTenantsRequest(page_size=page_size, page_token=page_token))
            yield from resp.tenants
            page_token = resp.next_page_token
            if not page_token:
                return

    def delete_tenant(self, name: str) -> None:
        """Deletes a tenant (ADMIN only)."""
        self.call(self._auth.DeleteTenant, auth_pb.DeleteTenantRequest(name=name))

    # --- access keys -----------------------------------------------------------------

    def create_access_key(self, tenant: str | None = None, description: str = "") -> auth_pb.CreateAccessKeyResponse:
        """A new key for `tenant` (default: the caller's own). The response's
        `secret_key` is shown only this once."""
        return self.call(self._auth.CreateAccessKey,
                         auth_pb.CreateAccessKeyRequest(tenant=self._tenant(tenant), description=description))

    def list_access_keys(self, tenant: str | None = None) -> list[auth_pb.AccessKey]:
        """The tenant's access keys (ids and state; never the secrets)."""
        resp = self.call(self._auth.ListAccessKeys, auth_pb.ListAccessKeysRequest(tenant=self._tenant(tenant)))
        return list(resp.access_keys)

    def revoke_access_key(self, access_key_id: str, tenant: str | None = None) -> auth_pb.AccessKey:
        """Revokes a key: its tokens stop working everywhere within a second."""
        resp = self.call(self._auth.RevokeAccessKey,
                         auth_pb.RevokeAccessKeyRequest(tenant=self._tenant(tenant), access_key_id=access_key_id))
        return resp.access_key

    # --- quotas and reservations -----------------------------------------------------

    def get_quota(self, tenant: str | None = None) -> auth_pb.GetQuotaResponse:
        """Limits and usage of `tenant` (default: the caller's own)."""
        return self.call(self._auth.GetQuota, auth_pb.GetQuotaRequest(tenant=self._tenant(tenant)))

    def set_quota(self, tenant: str | None = None, limits: resources_pb2.Resources | None = None, *,
                  cpu=None, memory=None, gpus=None, train_jobs=None, model_replicas=None,
                  studies=None, dev_environments=None, tensorboards=None) -> auth_pb.SetQuotaResponse:
        """Sets `tenant`'s limits (ADMIN only).

        With `limits`, all are replaced by it; otherwise the keywords
        (human forms: cpu="0.5", memory="16Gi") change only the given fields
        and the others keep their current values (read, then write).
        """
        tenant = self._tenant(tenant)
        amounts = dict(cpu=cpu, memory=memory, gpus=gpus, train_jobs=train_jobs, model_replicas=model_replicas,
                       studies=studies, dev_environments=dev_environments, tensorboards=tensorboards)
        if limits is None:
            limits = self.get_quota(tenant).limits
        limits = make_resources(limits, **amounts)
        return self.call(self._auth.SetQuota, auth_pb.SetQuotaRequest(tenant=tenant, limits=limits))

    def reserve(self, owner_id: str, resources: resources_pb2.Resources | dict | None = None, *,
                tenant: str | None = None, **amounts) -> auth_pb.ReserveResponse:
        """Reserves resources for `owner_id` against the quota, atomically and
        idempotently. `resources` is a message or a dict of human amounts
        ({"cpu": "0.5", "memory": "1Gi"}); keywords add to it likewise.

        Raises ResourceExhausted when it can never fit the limits, QuotaBusy
        (a FailedPrecondition) when it does not fit the usage now.
        """
        if isinstance(resources, dict):
            amounts = {**resources, **amounts}
            resources = None
        request = auth_pb.ReserveRequest(tenant=self._tenant(tenant), owner_id=owner_id,
                                         resources=make_resources(resources, **amounts))
        return self.call(self._auth.Reserve, request)

    def release(self, owner_id: str, *, tenant: str | None = None) -> bool:
        """Returns `owner_id`'s reservation; False when it held none."""
        resp = self.call(self._auth.Release, auth_pb.ReleaseRequest(tenant=self._tenant(tenant), owner_id=owner_id))
        return resp.released

    def list_reservations(self, tenant: str | None = None) -> list[auth_pb.Reservation]:
        """What holds the tenant's quota now (one reservation per job, replica, ...)."""
        resp = self.call(self._auth.ListReservations, auth_pb.ListReservationsRequest(tenant=self._tenant(tenant)))
        return list(resp.reservations)

    # --- uploads ---------------------------------------------------------------------

    def upload_package(self, path: str, *, tenant: str | None = None, progress=None,
                       timeout: float | None = None) -> str:
        """Streams a trainer package (.tar.gz/.whl) on this machine into the
        tenant's storage (JobsService/UploadPackage through the gateway) and
        returns its `file://` URI on the platform, for spec.trainer_uri.
        `progress(sent_bytes, total_bytes)` is called after each chunk."""
        import os  # noqa: PLC0415

        from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb  # noqa: PLC0415
        from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc  # noqa: PLC0415

        path = os.path.abspath(os.path.expanduser(path))
        if os.path.islink(path) or not os.path.isfile(path):
            raise errors.InvalidArgument(f"trainer package {path} is not a regular file")
        total = os.path.getsize(path)
        name = os.path.basename(path)

        def requests():
            sent = 0
            with open(path, "rb") as f:
                first = True
                while True:
                    data = f.read(UPLOAD_CHUNK)
                    if not data and not first:
                        return
                    sent += len(data)
                    yield jobs_pb.UploadPackageRequest(tenant=(tenant or "") if first else "",
                                                       file_name=name if first else "", data=data)
                    first = False
                    if progress:
                        progress(sent, total)
                    if not data:
                        return

        stub = self.stub(jobs_grpc.JobsServiceStub)
        return self.call(stub.UploadPackage, requests(), timeout=timeout or _upload_timeout(total, self.timeout)).uri

    def upload_model(self, model: str, directory: str, *, tenant: str | None = None, progress=None,
                     timeout: float | None = None) -> str:
        """Streams a SavedModel directory on this machine into the tenant's
        storage (ModelsService/UploadModel through the gateway) and returns
        its `file://` URI on the platform, for model_version.model_uri. The
        same directory uploaded again gives the same URI. Symlinks in the
        directory are refused. `progress(sent_bytes, total_bytes)` is called
        after each chunk."""
        import os  # noqa: PLC0415

        from cloudml.models.v1 import models_service_pb2 as models_pb  # noqa: PLC0415
        from cloudml.models.v1 import models_service_pb2_grpc as models_grpc  # noqa: PLC0415

        root = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(root):
            raise errors.InvalidArgument(f"{root} is not a directory")
        entries: list[tuple[str, str | None]] = []  # (relative path, full path or None for an empty dir)
        total = 0
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in dirs + files:
                full = os.path.join(folder, name)
                if os.path.islink(full):
                    raise errors.InvalidArgument(f"{full} is a symlink; uploads hold plain files and directories")
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            if not files and not dirs and rel != ".":
                entries.append((rel + "/", None))
            for name in sorted(files):
                full = os.path.join(folder, name)
                if not os.path.isfile(full):
                    raise errors.InvalidArgument(f"{full} is not a regular file")
                entries.append((name if rel == "." else f"{rel}/{name}", full))
                total += os.path.getsize(full)

        def requests():
            yield models_pb.UploadModelRequest(header=models_pb.UploadModelHeader(tenant=tenant or "", model=model))
            sent = 0
            for rel, full in entries:
                if full is None:
                    yield models_pb.UploadModelRequest(chunk=models_pb.UploadFileChunk(path=rel))
                    continue
                with open(full, "rb") as f:
                    first = True
                    while True:
                        data = f.read(UPLOAD_CHUNK)
                        if not data and not first:
                            break
                        sent += len(data)
                        yield models_pb.UploadModelRequest(chunk=models_pb.UploadFileChunk(path=rel, data=data))
                        first = False
                        if progress:
                            progress(sent, total)
                        if not data:
                            break

        stub = self.stub(models_grpc.ModelsServiceStub)
        return self.call(stub.UploadModel, requests(), timeout=timeout or _upload_timeout(total, self.timeout)).uri


#: bytes per upload message (the services take up to 4 MiB)
UPLOAD_CHUNK = 1 << 20


def _upload_timeout(size: int, base: float) -> float:
    """A deadline that grows with the upload: `base` plus a second per 4 MiB."""
    return base + size / (4 << 20)
