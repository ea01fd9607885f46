"""`client.models`: deploy SavedModels and call them (ModelsService and
TF Serving's REST API, through the gateway).

    version = client.models.create("linear", "export/1", replicas=2, wait=True)
    client.models.label("linear", "stable", 1)
    y = client.models.predict("linear", {"keys": [[1]], "X": [[10.0]]})      # numpy when installed
    client.models.download("linear", "linear-v1", version=1)                   # the SavedModel, verified
    client.models.export("linear", 1, optimize="float16", wait=True)          # TensorFlow Lite, an artifact
    client.models.download("linear", "linear-tflite", version=1, artifact="tflite-float16")
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import time

from cloudml import errors, serving, units
from cloudml.sdk.types import Export, Model, ModelVersion

#: `optimize` names -> ExportOptimization numbers
OPTIMIZE = {"none": 1, "dynamic-range": 2, "float16": 3}
FORMATS = {"tflite": 1}


def _pb():
    from cloudml.models.v1 import models_service_pb2 as pb

    return pb


def _to_json(value: Any) -> Any:
    """numpy arrays and scalars (anything with .tolist()) as JSON-ready lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _numpy():
    try:
        import numpy  # noqa: PLC0415

        return numpy
    except ImportError:
        return None


def _from_json(answer: dict) -> Any:
    """TF Serving's REST answer as arrays: one output -> an array, several ->
    {name: array}; plain lists when numpy is not installed."""
    np = _numpy()
    wrap = np.asarray if np is not None else (lambda v: v)
    if "predictions" in answer:
        rows = answer["predictions"]
        if rows and all(isinstance(r, dict) for r in rows):
            names = list(rows[0])
            return {n: wrap([r[n] for r in rows]) for n in names}
        return wrap(rows)
    if "outputs" in answer:
        outputs = answer["outputs"]
        if isinstance(outputs, dict):
            return {n: wrap(v) for n, v in outputs.items()}
        return wrap(outputs)
    return answer


class Models:
    """Models of the caller's tenant (or, for an admin, of `tenant=`)."""

    def __init__(self, client):
        self._client = client

    @property
    def _stub(self):
        return serving.models_stub(self._client)

    def _rpc(self, method: str, request):
        return self._client.call(getattr(self._stub, method), request)

    # --- models --------------------------------------------------------------------

    def create(self, name: str, source: str | None = None, *, version: int | str = 1, public: bool = False,
               model_description: str = "", tenant: str | None = None, **deploy_options) -> ModelVersion | Model:
        """Creates the model `name` unless it exists, then, when `source` is
        given, deploys version `version` from it (see `deploy` for the
        options: replicas, cpu, memory, batching, wait, ...) and returns the
        version; without `source`, returns the model. `public=True` allows
        Predict without a token (new models only).

        Raises FailedPrecondition when a model of that name is being deleted.
        """
        model = self.ensure(name, public=public, description=model_description, tenant=tenant)
        if source is None:
            return model
        return self.deploy(name, source, version=version, tenant=tenant, **deploy_options)

    def ensure(self, name: str, *, public: bool = False, description: str = "", tenant: str | None = None) -> Model:
        """The model `name`, created when missing (`model.created` tells)."""
        pb = _pb()
        try:
            created = self._rpc("CreateModel", pb.CreateModelRequest(
                tenant=tenant or "", name=name, description=description, public=public)).model
            return Model(created, created=True)
        except errors.AlreadyExists:
            model = self.get(name, tenant=tenant)
            if model.deleting:
                raise errors.FailedPrecondition(f"model {name!r} is being deleted; wait, then create it again") \
                    from None
            model.created = False
            return model

    def get(self, name: str, *, tenant: str | None = None) -> Model:
        """The model `name` (NotFound when the tenant has none)."""
        return Model(self._rpc("GetModel", _pb().GetModelRequest(tenant=tenant or "", name=name)).model)

    def list(self, *, tenant: str | None = None, page_size: int = 1000) -> Iterator[Model]:
        """Every model, fetched page by page as the iterator advances."""
        pb = _pb()
        token = ""
        while True:
            resp = self._rpc("ListModels", pb.ListModelsRequest(tenant=tenant or "", page_token=token,
                                                                page_size=page_size))
            for model in resp.models:
                yield Model(model)
            token = resp.next_page_token
            if not token:
                return

    def delete(self, name: str, *, wait: bool = False, timeout: float = 600.0, tenant: str | None = None) -> Model:
        """Deletes the model and all its versions (they drain first); with
        `wait=True`, returns once every replica has stopped."""
        model = Model(self._rpc("DeleteModel", _pb().DeleteModelRequest(tenant=tenant or "", name=name)).model)
        if wait:
            serving.wait_for_model_gone(self._client, name, tenant=tenant or "", timeout=timeout)
        return model

    def update(self, name: str, *, paths: list[str], changes, tenant: str | None = None) -> Model:
        """UpdateModel with a field mask: `changes` is a models.v1.Model
        holding the new values of `paths` (description, public,
        default_version, traffic_split)."""
        from google.protobuf.field_mask_pb2 import FieldMask  # noqa: PLC0415

        return Model(self._rpc("UpdateModel", _pb().UpdateModelRequest(
            tenant=tenant or "", name=name, model=changes, update_mask=FieldMask(paths=paths))).model)

    def label(self, name: str, label: str, version: int | str, *, allow_unavailable: bool = False,
              tenant: str | None = None) -> Model:
        """Points `label` (e.g. "stable") at `version`; Predict can then name
        the label. FailedPrecondition when the version is not AVAILABLE
        (unless `allow_unavailable`)."""
        return Model(self._rpc("SetLabel", _pb().SetLabelRequest(
            tenant=tenant or "", model=name, label=label, version=serving.parse_version(version),
            allow_unavailable=allow_unavailable)).model)

    def unlabel(self, name: str, label: str, *, tenant: str | None = None) -> Model:
        """Removes `label` from the model."""
        return Model(self._rpc("DeleteLabel", _pb().DeleteLabelRequest(tenant=tenant or "", model=name,
                                                                        label=label)).model)

    # --- versions ------------------------------------------------------------------

    def version_spec(self, source: str, *, version: int | str = 0, description: str = "", replicas=None,
                     min_replicas=None, max_replicas=None, cpu=None, memory=None, gpus=None,
                     batching: bool | dict = False):
        """A models.v1.ModelVersion from keywords (what `deploy` sends).
        `replicas` fixes the count; `min_replicas`/`max_replicas` let it
        autoscale. `batching` is True or {max_batch_size,
        batch_timeout_micros, max_enqueued_batches, num_batch_threads}."""
        pb = _pb()
        if replicas is not None and (min_replicas is not None or max_replicas is not None):
            raise errors.SpecError("give either replicas or min_replicas/max_replicas")
        low = replicas or min_replicas or 0
        high = replicas or max_replicas or 0
        if max_replicas and not min_replicas:
            low = 1
        options = dict(batching) if isinstance(batching, dict) else {}
        known = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"}
        if set(options) - known:
            raise errors.SpecError(f"batching: unknown option(s) {', '.join(sorted(set(options) - known))}")
        from cloudml.common.v1 import resources_pb2  # noqa: PLC0415

        try:
            resources = resources_pb2.Resources(
                cpu_millis=units.parse_cpu(cpu) if cpu is not None else 0,
                memory_bytes=units.parse_memory(memory) if memory is not None else 0,
                gpus=units.parse_count(gpus, "gpus") if gpus is not None else 0)
            number = serving.parse_version(version)
        except ValueError as err:
            raise errors.SpecError(str(err)) from None
        return pb.ModelVersion(
            version=number, model_uri=source, description=description, resources=resources,
            min_replicas=low, max_replicas=high,
            batching=pb.BatchingConfig(enabled=bool(batching) or any(options.values()), **options))

    def deploy(self, name: str, source: str | None = None, *, version: int | str = 0, spec=None,
               tenant: str | None = None, upload: bool = True, wait: bool = False, timeout: float = 600.0,
               progress: Callable[[int, int, str], None] | None = None,
               upload_progress: Callable[[int, int], None] | None = None, **options) -> ModelVersion:
        """Creates version `version` (0: the next number) of the existing
        model `name` from `source`: a SavedModel directory on this machine
        (uploaded into the tenant's storage first, unless `upload=False`)
        or a URI the platform can read. Options as for `version_spec`
        (replicas, min_replicas, max_replicas, cpu, memory, gpus, batching,
        description), or a ready `spec`. Idempotent: the same spec again
        returns the existing version (`created` False).

        With `wait=True`, returns once the version is AVAILABLE with its
        replicas ready (`wait`'s errors apply)."""
        if spec is None:
            if source is None:
                raise errors.SpecError("deploy needs a source: a SavedModel directory or a URI")
            if serving.is_local_source(source):
                path = os.path.abspath(os.path.expanduser(source))
                if upload:
                    if not serving.is_saved_model_dir(path):
                        raise errors.InvalidArgument(f"{path} is not a SavedModel directory (no saved_model.pb)")
                    source = self._client.upload_model(name, path, tenant=tenant, progress=upload_progress)
                else:
                    source = path
            spec = self.version_spec(source, version=version, **options)
        resp = self._rpc("CreateVersion", _pb().CreateVersionRequest(tenant=tenant or "", model=name,
                                                                     model_version=spec))
        result = ModelVersion(resp.model_version, created=resp.created)
        if wait:
            result = self.wait(name, result.version, tenant=tenant, timeout=timeout, progress=progress)
            result.created = resp.created
        return result

    def wait(self, name: str, version: int | str, *, tenant: str | None = None, timeout: float = 600.0,
             progress: Callable[[int, int, str], None] | None = None) -> ModelVersion:
        """Blocks until the version is AVAILABLE with all its replicas ready
        and returns it. FailedPrecondition (with the load error) when it
        fails; DeadlineExceeded after `timeout`, naming how many replicas
        were ready. `progress(ready, wanted, state)` is called on each change."""
        found = serving.wait_for_version(self._client, name, serving.parse_version(version), tenant=tenant or "",
                                         timeout=timeout, progress=progress)
        return ModelVersion(found)

    def get_version(self, name: str, version: int | str, *, tenant: str | None = None) -> ModelVersion:
        """One version with its replicas."""
        return ModelVersion(self._rpc("GetVersion", _pb().GetVersionRequest(
            tenant=tenant or "", model=name, version=serving.parse_version(version))).model_version)

    def versions(self, name: str, *, tenant: str | None = None, page_size: int = 1000) -> Iterator[ModelVersion]:
        """Every version of the model, fetched page by page."""
        pb = _pb()
        token = ""
        while True:
            resp = self._rpc("ListVersions", pb.ListVersionsRequest(tenant=tenant or "", model=name,
                                                                    page_token=token, page_size=page_size))
            for version in resp.model_versions:
                yield ModelVersion(version)
            token = resp.next_page_token
            if not token:
                return

    def scale(self, name: str, version: int | str, *, min_replicas: int, max_replicas: int,
              tenant: str | None = None) -> ModelVersion:
        """Sets the version's replica bounds (equal bounds: a fixed count)."""
        return ModelVersion(self._rpc("ScaleVersion", _pb().ScaleVersionRequest(
            tenant=tenant or "", model=name, version=serving.parse_version(version), min_replicas=min_replicas,
            max_replicas=max_replicas)).model_version)

    def delete_version(self, name: str, version: int | str, *, wait: bool = False, timeout: float = 600.0,
                       tenant: str | None = None) -> ModelVersion:
        """Deletes a version (it drains first); `wait=True` returns once its
        replicas stopped."""
        number = serving.parse_version(version)
        deleted = ModelVersion(self._rpc("DeleteVersion", _pb().DeleteVersionRequest(
            tenant=tenant or "", model=name, version=number)).model_version)
        if wait:
            serving.wait_for_version_gone(self._client, name, number, tenant=tenant or "", timeout=timeout)
        return deleted

    # --- files for devices: downloads and exports ------------------------------------

    def download(self, name: str, target: str, *, version: int | str = 0, label: str = "", artifact: str = "",
                 tenant: str | None = None, progress: Callable[[int, int], None] | None = None,
                 timeout: float | None = None):
        """Downloads the version's SavedModel (or, with `artifact`, e.g.
        "tflite", that export's file) into the directory `target`, streamed
        through the gateway, every file checked against the server's SHA-256,
        and returns a `cloudml.download.Downloaded`. Give `version` or
        `label`. A download cut short resumes when run again (see
        cloudml.download); `target` appears only once complete and verified.
        `progress(done_bytes, total_bytes)` is called after each chunk.

        Errors: NotFound (no such model, version, label or artifact),
        FailedPrecondition (the export has not SUCCEEDED; the version is being
        deleted), AlreadyExists (`target` holds something else), DataLoss."""
        from cloudml import download as transfer  # noqa: PLC0415

        number = serving.parse_version(version) if version else 0
        if bool(number) == bool(label):
            raise errors.SpecError("give either a version or a label")
        return transfer.download(self._client, name, target, version=number, label=label, artifact=artifact,
                                 tenant=tenant or "", progress=progress, timeout=timeout)

    def export(self, name: str, version: int | str, *, format: str = "tflite", optimize: str = "none",
               signature: str = "", tenant: str | None = None, wait: bool = False, timeout: float = 600.0,
               progress: Callable[[Export], None] | None = None) -> Export:
        """Exports a version (AVAILABLE) to TensorFlow Lite, converted on the
        platform as your tenant's code; the result is an artifact of the
        version (`exports`, `download(..., artifact=export.id)`). Idempotent:
        the same format and options again return the existing export
        (`created` False). `optimize`: none, dynamic-range or float16. With
        `wait=True`, returns once it SUCCEEDED; FailedPrecondition with the
        converter's reason when it FAILED, DeadlineExceeded after `timeout`."""
        pb = _pb()
        if format not in FORMATS:
            raise errors.SpecError(f"unknown export format {format!r} (known: {', '.join(FORMATS)})")
        if optimize not in OPTIMIZE:
            raise errors.SpecError(f"unknown optimization {optimize!r} (known: {', '.join(OPTIMIZE)})")
        number = serving.parse_version(version)
        resp = self._rpc("ExportVersion", pb.ExportVersionRequest(
            tenant=tenant or "", model=name, version=number, format=FORMATS[format],
            options=pb.ExportOptions(signature=signature, optimization=OPTIMIZE[optimize])))
        result = Export(resp.export, created=resp.created)
        if wait:
            result = self.wait_export(name, number, result.id, tenant=tenant, timeout=timeout, progress=progress)
            result.created = resp.created
        return result

    def get_export(self, name: str, version: int | str, export_id: str, *, tenant: str | None = None) -> Export:
        """One export of a version by id (e.g. "tflite")."""
        return Export(self._rpc("GetExport", _pb().GetExportRequest(
            tenant=tenant or "", model=name, version=serving.parse_version(version), id=export_id)).export)

    def exports(self, name: str, version: int | str, *, tenant: str | None = None) -> list[Export]:
        """The version's exports (its artifacts), by id."""
        return [Export(e) for e in self._rpc("ListExports", _pb().ListExportsRequest(
            tenant=tenant or "", model=name, version=serving.parse_version(version))).exports]

    def wait_export(self, name: str, version: int | str, export_id: str, *, tenant: str | None = None,
                    timeout: float = 600.0, progress: Callable[[Export], None] | None = None) -> Export:
        """Polls an export until it SUCCEEDED (returned) or FAILED
        (FailedPrecondition with its reason); DeadlineExceeded after `timeout`.
        `progress(export)` is called when its state or message changes."""
        deadline = time.monotonic() + timeout
        last = None
        delay = 0.1
        while True:
            found = self.get_export(name, version, export_id, tenant=tenant)
            seen = (found.state, found.message)
            if progress and seen != last:
                progress(found)
            last = seen
            if found.state == "SUCCEEDED":
                return found
            if found.state == "FAILED":
                raise errors.FailedPrecondition(f"export {export_id} of {name} v{found.proto.version} FAILED: "
                                                f"{found.message}")
            if time.monotonic() >= deadline:
                raise errors.DeadlineExceeded(f"export {export_id} of {name} is {found.state} after {timeout:g}s"
                                              + (f" ({found.message})" if found.message else ""))
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    # --- predict -------------------------------------------------------------------

    def predict(self, name: str, instances: Any = None, *, inputs: Any = None, data: Any = None,
                version: int | str = 0, label: str = "", signature_name: str = "", raw: bool = False,
                rest_endpoint: str = "", timeout: float | None = None) -> Any:
        """Calls the model through the gateway's REST API.

        Give `instances` (rows: a list or an array, or a dict of named
        inputs, each a batch) or `inputs` (TF Serving's columnar form), as
        lists or numpy arrays; or `data`, a whole request body (TF Serving's
        JSON or the seed's {"X_dtype": "float32", "X": [[1.0]]}). A dict
        given as `instances` is sent as columnar inputs.

        Returns the outputs as numpy arrays when numpy is installed (one
        output: an array; several: {name: array}), else as lists; with
        `raw=True`, TF Serving's JSON answer as is. `version` or `label`
        pick a version (default: the model's default routing).

        Errors: NotFound (no such model in your tenant), InvalidArgument
        (e.g. a missing input; the message lists the signature's inputs),
        PermissionDenied, ResourceExhausted (too large), Unavailable.
        """
        given = [x is not None for x in (instances, inputs, data)]
        if sum(given) != 1:
            raise errors.SpecError("predict takes one of instances, inputs or data")
        if data is None:
            if inputs is not None or isinstance(instances, dict):
                data = {"inputs": _to_json(inputs if inputs is not None else instances)}
            else:
                data = {"instances": _to_json(instances)}
        else:
            data = _to_json(data)
        number = serving.parse_version(version) if version else 0
        try:
            answer = serving.predict(self._client, name, data, version=number, label=label,
                                     signature_name=signature_name, rest_endpoint=rest_endpoint, timeout=timeout)
        except errors.InvalidArgument as err:
            if not serving.is_input_error(err.message):
                raise
            inputs = serving.signature_inputs(self._client, name, version=number, label=label,
                                              signature_name=signature_name or (data.get("signature_name", "") if isinstance(data, dict) else ""),
                                              rest_endpoint=rest_endpoint, timeout=timeout)
            if not inputs:
                raise
            listed = ", ".join(f"{k} ({v})" for k, v in inputs.items())
            raise errors.InvalidArgument(f"{err.message}; the signature {signature_name or 'serving_default'} "
                                         f"takes inputs: {listed}", code=err.code, trailers=err.trailers) from None
        return answer if raw else _from_json(answer)
