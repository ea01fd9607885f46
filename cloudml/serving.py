"""Model-serving helpers of the SDK (the CLI's `cloudml models` uses them).

    import cloudml
    from cloudml import serving

    client = cloudml.Client()
    uri = serving.upload_saved_model(client, "linear", "./export/1", version=1)
    stub = serving.models_stub(client)          # cloudml.models.v1.ModelsService
    client.call(stub.CreateVersion, models_pb.CreateVersionRequest(
        model="linear", model_version=models_pb.ModelVersion(version=1, model_uri=uri)))
    serving.wait_for_version(client, "linear", 1)
    print(serving.predict(client, "linear", {"instances": [[1.0], [2.0]]}))

Uploads
-------
`upload_saved_model` streams the directory to the models service
(`UploadModel`, through the gateway, so it works from any machine and as any
user), which stores it in the tenant's storage under its content hash,
`file:///DATA_DIR/storage/<tenant>/models/<model>/<hash>/`, renamed into
place once complete, so the service never sees half a SavedModel and the
same directory uploaded again gives the same URI.

Predict
-------
`predict` POSTs TF Serving's REST JSON to the gateway
(`/v1/models/NAME[/versions/N|/labels/L]:predict`, `Authorization: Bearer`)
and returns the decoded answer. `to_rest_request` also accepts the seed
platform's format, e.g. {"keys_dtype": "int32", "keys": [[1], [2]],
"X_dtype": "float32", "X": [[10.0], [30.0]]}, and turns it into TF Serving's
columnar form {"inputs": {"keys": [[1], [2]], "X": [[10.0], [30.0]]}} (values
coerced to the named dtypes).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from cloudml import errors

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
DTYPE_SUFFIX = "_dtype"
_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "int", "long"}
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "float", "double", "half"}
_STRING_DTYPES = {"string", "str", "bytes"}
_BOOL_DTYPES = {"bool", "boolean"}
# TF Serving's REST error statuses -> gRPC status names.
_HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               408: "DEADLINE_EXCEEDED", 409: "ABORTED", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
               499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
               504: "DEADLINE_EXCEEDED"}


def _models_pb():
    from cloudml.models.v1 import models_service_pb2 as pb  # noqa: PLC0415
    from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc  # noqa: PLC0415

    return pb, pb_grpc


def models_stub(client):
    return client.stub(_models_pb()[1].ModelsServiceStub)


def parse_version(text: str | int) -> int:
    """1, "1" or the seed's "v1" -> 1. Raises ValueError otherwise."""
    if isinstance(text, int):
        number = text
    else:
        raw = str(text).strip()
        digits = raw[1:] if raw[:1] in ("v", "V") else raw
        if not digits.isdigit():
            raise ValueError(f"version {text!r} is not a number (e.g. 1 or v1)")
        number = int(digits)
    if number < 0 or number > 2**63 - 1:
        raise ValueError(f"version {text!r} is out of range")
    return number


# --- uploads --------------------------------------------------------------------------

def is_saved_model_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in SAVED_MODEL_FILES)


def is_local_source(uri: str) -> bool:
    """True for a path on this machine (what the CLI uploads), False for a URI."""
    return "://" not in uri


def tree_digest(path: str) -> str:
    """A digest of a directory's relative file names and contents."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def _endpoint_is_local(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def upload_saved_model(client, model: str, source: str, *, version: int = 0, tenant: str = "") -> str:
    """Copies the SavedModel directory `source` into the platform's storage
    and returns the URI to pass as model_uri."""
    source = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(source):
        raise errors.InvalidArgument(f"{source} is not a directory")
    if not is_saved_model_dir(source):
        raise errors.InvalidArgument(f"{source} is not a SavedModel directory (no saved_model.pb)")
    # Streamed through the gateway (ModelsService/UploadModel), stored under
    # its content hash: works from any machine, as any user. (`version` is
    # kept for callers; the stored copy does not depend on it.)
    return client.upload_model(model, source, tenant=tenant or None)


def _copy_local(source: str, target: str, version: int, version_exists) -> None:
    stale = None
    if os.path.exists(target):
        if tree_digest(source) == tree_digest(target):
            return
        if version_exists():
            raise errors.AlreadyExists(
                f"version {version} already has a different SavedModel at {target}; versions are immutable, "
                "create a new version instead"
            )
        stale = target  # left by a version deleted since: nothing serves it any more
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".upload-{os.path.basename(target)}-{secrets.token_hex(4)}")
    trash = tmp + ".old"
    try:
        shutil.copytree(source, tmp)
        if stale is not None:
            os.rename(stale, trash)
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone uploaded the same version meanwhile.
            if os.path.isdir(target) and tree_digest(source) == tree_digest(target):
                return
            raise errors.AlreadyExists(f"version {version} was uploaded concurrently with other content") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)


def _copy_fsspec(source: str, uri: str) -> None:
    import fsspec  # noqa: PLC0415

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.put(source.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    except (ImportError, ValueError, OSError) as err:
        raise errors.Unavailable(f"cannot upload to {uri}: {err}") from None


# --- versions --------------------------------------------------------------------------

def wait_for_version(client, model: str, version: int, *, tenant: str = "", timeout: float = 300.0,
                     poll: float = 0.5, progress=None):
    """Polls until the version is AVAILABLE with at least its min_replicas
    replicas ready (returns it) or ends (raises FailedPrecondition with the
    load error); DeadlineExceeded after `timeout`, naming how many replicas
    were ready. `progress(ready, wanted, state_name)` is called whenever
    those change."""
    pb, _ = _models_pb()
    stub = models_stub(client)
    deadline = time.monotonic() + timeout
    shown = None
    while True:
        found = client.call(stub.GetVersion, pb.GetVersionRequest(tenant=tenant, model=model,
                                                                  version=version)).model_version
        ready = sum(r.state == pb.MODEL_VERSION_STATE_AVAILABLE for r in found.replicas)
        wanted = max(1, found.min_replicas)
        state = pb.ModelVersionState.Name(found.state).removeprefix("MODEL_VERSION_STATE_")
        if progress is not None and (ready, wanted, state) != shown:
            shown = (ready, wanted, state)
            progress(ready, wanted, state)
        if found.state == pb.MODEL_VERSION_STATE_AVAILABLE and ready >= wanted:
            return found
        if found.state == pb.MODEL_VERSION_STATE_END:
            raise errors.FailedPrecondition(
                f"version {version} of model {model!r} failed: {found.status.message or 'it ended'}")
        if time.monotonic() >= deadline:
            raise errors.DeadlineExceeded(
                f"version {version} of model {model!r} is {state} with {ready} of {wanted} replicas ready "
                f"after {timeout:.0f}s")
        time.sleep(poll)


def wait_for_version_gone(client, model: str, version: int, *, tenant: str = "", timeout: float = 300.0) -> None:
    pb, _ = _models_pb()
    stub = models_stub(client)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.call(stub.GetVersion, pb.GetVersionRequest(tenant=tenant, model=model, version=version))
        except errors.NotFound:
            return
        if time.monotonic() >= deadline:
            raise errors.DeadlineExceeded(f"version {version} of model {model!r} still draining after {timeout:.0f}s")
        time.sleep(0.5)


def wait_for_model_gone(client, model: str, *, tenant: str = "", timeout: float = 300.0) -> None:
    pb, _ = _models_pb()
    stub = models_stub(client)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.call(stub.GetModel, pb.GetModelRequest(tenant=tenant, name=model))
        except errors.NotFound:
            return
        if time.monotonic() >= deadline:
            raise errors.DeadlineExceeded(f"model {model!r} still draining after {timeout:.0f}s")
        time.sleep(0.5)


# --- predict ------------------------------------------------------------------------------

def _coerce(value: Any, dtype: str, name: str) -> Any:
    if isinstance(value, list):
        return [_coerce(v, dtype, name) for v in value]
    if isinstance(value, dict):  # {"b64": ...}
        return value
    try:
        if dtype in _INT_DTYPES:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(value)
        if dtype in _FLOAT_DTYPES:
            return float(value)
        if dtype in _BOOL_DTYPES:
            return bool(value)
        if dtype in _STRING_DTYPES:
            return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError) as err:
        raise errors.InvalidArgument(f"input {name!r}: {err} (dtype {dtype})") from None
    raise errors.InvalidArgument(f"input {name!r}: unknown dtype {dtype!r}")


def to_rest_request(data: Any, *, signature_name: str = "") -> dict:
    """TF Serving's REST request body for `data`: TF Serving's own JSON
    ({"instances": ...} or {"inputs": ...}) as is, a bare list as instances,
    or the seed's {"<input>_dtype": "...", "<input>": [...]} as columnar inputs."""
    if isinstance(data, list):
        body: dict = {"instances": data}
    elif not isinstance(data, dict):
        raise errors.InvalidArgument("the data must be a JSON object (TF Serving's REST JSON or the seed's format)")
    elif "instances" in data or "inputs" in data:
        body = dict(data)
    else:
        dtypes = {k[: -len(DTYPE_SUFFIX)]: v for k, v in data.items() if k.endswith(DTYPE_SUFFIX)}
        inputs = {k: v for k, v in data.items() if not k.endswith(DTYPE_SUFFIX) and k != "signature_name"}
        if not inputs:
            raise errors.InvalidArgument("the data names no inputs (expected \"instances\", \"inputs\" or the "
                                         "seed's {\"X\": [...], \"X_dtype\": \"float32\"})")
        for name, dtype in dtypes.items():
            if name not in inputs:
                raise errors.InvalidArgument(f"{name}{DTYPE_SUFFIX} names no input {name!r}")
            inputs[name] = _coerce(inputs[name], str(dtype).lower(), name)
        body = {"inputs": inputs}
        if data.get("signature_name"):
            body["signature_name"] = data["signature_name"]
    if signature_name:
        body["signature_name"] = signature_name
    return body


def rest_endpoint_of(client, override: str = "") -> str:
    from cloudml import config  # noqa: PLC0415

    endpoint = override or getattr(client, "rest_endpoint", "") or ""
    if not endpoint:
        if client.endpoint == config.DEFAULT_ENDPOINT:
            endpoint = config.DEFAULT_REST_ENDPOINT
        else:
            raise errors.ConfigurationError(
                "no REST endpoint: set CLOUDML_REST_ENDPOINT or rest_endpoint in the config file "
                "(the platform's credentials.json has it)")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    return endpoint.rstrip("/")


def predict_url(rest_endpoint: str, model: str, *, version: int = 0, label: str = "", verb: str = "predict") -> str:
    path = f"/v1/models/{urllib.parse.quote(model, safe='')}"
    if version:
        path += f"/versions/{version}"
    elif label:
        path += f"/labels/{urllib.parse.quote(label, safe='')}"
    return f"{rest_endpoint}{path}:{verb}"


def predict(client, model: str, data: Any, *, version: int = 0, label: str = "", signature_name: str = "",
            rest_endpoint: str = "", timeout: float | None = None, token: str | None = None) -> dict:
    """POSTs a Predict to the gateway's REST API and returns its JSON answer."""
    body = json.dumps(to_rest_request(data, signature_name=signature_name)).encode()
    url = predict_url(rest_endpoint_of(client, rest_endpoint), model, version=version, label=label)
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token if token is not None else client.token()}",
    })
    try:
        with urllib.request.urlopen(request, timeout=timeout or client.timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            message = json.loads(raw).get("error") or raw.decode(errors="replace")
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace") or err.reason
        code = _HTTP_CODES.get(err.code, "UNKNOWN")
        cls = errors._BY_CODE.get(code, errors.Unknown)
        raise cls(f"{message} (HTTP {err.code})", code=code) from None
    except (urllib.error.URLError, OSError) as err:
        raise errors.ConnectionFailed(url, str(getattr(err, "reason", err))) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise errors.Unknown(f"the gateway answered non-JSON: {raw[:200]!r}") from None


# --- signatures (for error messages) ------------------------------------------------------

#: Words of TF Serving's errors about a request's inputs (missing, extra, misnamed).
_INPUT_ERRORS = ("not found in request", "missing but required", "missing named input", "sent extra",
                 "input size does not match signature", "missing 'inputs' or 'instances'", "key: ")


def is_input_error(message: str) -> bool:
    lowered = message.lower()
    return any(words in lowered for words in _INPUT_ERRORS)


def signature_inputs(client, model: str, *, version: int = 0, label: str = "", signature_name: str = "",
                     rest_endpoint: str = "", timeout: float | None = None) -> dict[str, str] | None:
    """{input name: "DT_FLOAT [-1,1]"} of the model's signature (default
    serving_default), from the gateway's REST metadata; None when it cannot
    be read (the caller then says nothing more)."""
    path = f"/v1/models/{urllib.parse.quote(model, safe='')}"
    if version:
        path += f"/versions/{version}"
    elif label:
        path += f"/labels/{urllib.parse.quote(label, safe='')}"
    try:
        url = rest_endpoint_of(client, rest_endpoint) + path + "/metadata"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {client.token()}"})
        with urllib.request.urlopen(request, timeout=timeout or client.timeout) as resp:
            body = json.loads(resp.read())
        signature = body["metadata"]["signature_def"]["signature_def"][signature_name or "serving_default"]
    except Exception:  # noqa: BLE001 - only an addition to an error message
        return None
    described = {}
    for name, info in sorted(signature.get("inputs", {}).items()):
        dims = (info.get("tensor_shape") or {}).get("dim")
        shape = "[" + ",".join(str(d.get("size", "?")) for d in dims) + "]" if dims else "[?]"
        described[name] = f"{info.get('dtype', '?')} {shape}"
    return described
