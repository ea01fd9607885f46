"""The replica's domain logic: one model version, its state, and every API call.

`ServedModel` never sees gRPC. It resolves a request's ModelSpec against the
one version it serves, with ServerCore's rules:

- no ModelSpec: INVALID_ARGUMENT "Missing ModelSpec"; no name:
  INVALID_ARGUMENT "ModelSpec has no name specified.";
- a version label: INVALID_ARGUMENT "Unrecognized servable version label: L"
  (a replica knows no labels; the gateway resolves them, see below);
- another name, another version, or the model not loaded yet: NOT_FOUND
  "Servable not found for request: Specific(name, version)" (or
  "Latest(name)" when the request names no version).

Requests routed by the gateway carry the metadata
`x-cloudml-resolved-version: <n>` (the version the gateway picked from the
request's version, label, default version or traffic split, for a model
name it resolved within the caller's tenant). The servicer passes it as
`routed_version`; when it equals the served version the ModelSpec's name,
version and label are not checked again (its name is still echoed), and
when it differs the answer is NOT_FOUND, so a stale route never reaches the
wrong version.

Response ModelSpecs echo the request's model name, the served version and
the signature name with "serving_default" filled in, as TF Serving's
MakeModelSpec does.
"""
from __future__ import annotations

import asyncio
import enum
import logging

import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    regression_pb2,
)

from services.models.model_server import classify, predict, status
from services.models.model_server.batching import Batcher, BatchingConfig, TFExecutor, batch_key, timed
from services.models.model_server.servable import Servable
from services.models.model_server.tensors import model_spec_bytes

log = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"


class State(enum.IntEnum):
    """TF Serving's ModelVersionStatus.State numbers."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


class ServedModel:
    """One served model version.

    TensorFlow calls run on the executor's threads, except calls of a runner
    whose recent run time (an average measured on every call) is under
    `inline_max_seconds`: those run on the event loop itself. Handing a call
    to a thread and back costs ~80 us on this machine, several times what a
    tiny model (half_plus_two: ~20 us) needs, and blocking the loop for less
    than the hand-off keeps it as responsive. A runner's first call always
    goes to a thread, and one slow call moves it back there. Every call,
    batched or not, executes the graph on the thread that makes it
    (`Servable.runner(caller_thread=True)`): the executor or batch thread
    already gives calls their concurrency, and a hand-off to TensorFlow's
    inter-op pool costs more than it saves. On the 2-CPU box with the MLP at
    concurrency 32 (bench/bench_batching.py), batched calls on the pool
    served ~2,500 rps and on the batch thread ~2,950.
    """

    def __init__(self, name: str, version: int, *, batching: BatchingConfig, executor: TFExecutor,
                 tensor_content: bool = False, metrics=None, inline_max_seconds: float = 0.0,
                 inline_group_max_seconds: float = 0.0):
        self.name = name
        self.version = version
        self.state = State.START
        self.servable: Servable | None = None
        self.executor = executor
        self.batching = batching
        self.batcher = Batcher(batching, executor, metrics, inline_group_max_seconds) if batching.enabled else None
        self.tensor_content = tensor_content
        self.metrics = metrics
        self.inline_max_seconds = inline_max_seconds
        self._metadata_any = None

    # --- lifecycle ---------------------------------------------------------------------------

    def set_state(self, state: State) -> None:
        self.state = state
        if self.metrics is not None:
            self.metrics.state.set(int(state))

    def attach(self, servable: Servable) -> None:
        """The model is loaded (not yet warm)."""
        self.servable = servable
        if self.metrics is not None:
            servable.run_counter = self.metrics.tf_runs
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in servable.meta_graph_signatures.items():
            sig_map.signature_def[key].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.metadata[SIGNATURE_DEF_FIELD].Pack(sig_map)
        self._metadata_any = response.metadata[SIGNATURE_DEF_FIELD]

    @property
    def serving(self) -> bool:
        return self.state in (State.AVAILABLE, State.UNLOADING)

    # --- ModelSpec resolution --------------------------------------------------------------

    def resolve(self, spec, routed_version: int | None = None) -> None:
        """Raises unless `spec` addresses the served version (see the module doc)."""
        if not spec.name:
            raise status.invalid(status.NO_MODEL_NAME)
        choice = spec.WhichOneof("version_choice")
        asked = spec.version.value if choice == "version" else None
        if routed_version is not None:
            if routed_version != self.version:
                raise status.servable_not_found(spec.name, routed_version)
        else:
            if choice == "version_label":
                raise status.unknown_label(spec.version_label)
            if spec.name != self.name or (asked is not None and asked != self.version):
                raise status.servable_not_found(spec.name, asked)
        if not self.serving:
            raise status.servable_not_found(spec.name, asked)

    def _spec(self, request_spec, signature_name: str | None):
        spec = model_pb2.ModelSpec(name=request_spec.name)
        spec.version.value = self.version
        if signature_name is not None:
            spec.signature_name = signature_name or predict.DEFAULT_SIGNATURE
        return spec

    # --- Predict ------------------------------------------------------------------------------

    async def predict(self, request, routed_version: int | None = None, *, warmup: bool = False) -> bytes:
        """A serialized PredictResponse."""
        plan, runner = self._predict_plan(request, routed_version, warmup)
        try:
            if self.batcher is not None:
                key = batch_key(plan.signature.name, plan.fetches, plan.arrays)
                outputs = await self.batcher.run(key, runner, plan.arrays)
            else:
                outputs = await self._execute(runner, plan.arrays)
        except tf.errors.OpError as err:
            raise status.from_tf_error(err) from err
        return self._predict_response(request, plan, outputs)

    async def predict_group(self, requests, routed_version: int | None = None) -> list:
        """Predict for a group of requests that arrive together (the gateway's
        coalesced calls): each one's serialized PredictResponse or its
        ServingError, in order. Each request is checked on its own, exactly
        as `predict` checks it; the valid ones go to the batcher in one step
        (`Batcher.run_group`), so a group costs one batch hand-off instead of
        one task per member."""
        if self.batcher is None:
            return await asyncio.gather(*(self.predict(r, routed_version) for r in requests),
                                        return_exceptions=True)
        results: list = [None] * len(requests)
        planned = []
        for i, request in enumerate(requests):
            try:
                plan, runner = self._predict_plan(request, routed_version, False)
            except Exception as err:  # noqa: BLE001 - this member's error (INTERNAL unless a ServingError)
                results[i] = err
                continue
            planned.append((i, request, plan, runner))
        outcomes = await self.batcher.run_group(
            [(batch_key(plan.signature.name, plan.fetches, plan.arrays), runner, plan.arrays)
             for _, _, plan, runner in planned])
        for (i, request, plan, _), outputs in zip(planned, outcomes):
            if isinstance(outputs, tf.errors.OpError):
                results[i] = status.from_tf_error(outputs)
            elif isinstance(outputs, BaseException):
                results[i] = outputs
            else:
                results[i] = self._predict_response(request, plan, outputs)
        return results

    def _predict_plan(self, request, routed_version, warmup):
        if not warmup:
            if not request.HasField("model_spec"):
                raise status.invalid(status.MISSING_MODEL_SPEC)
            self.resolve(request.model_spec, routed_version)
        plan = predict.plan(self.servable, request)
        return plan, self._runner(plan.signature, plan.feeds, plan.fetches)

    def _predict_response(self, request, plan, outputs) -> bytes:
        spec = model_spec_bytes(request.model_spec.name, self.version, plan.signature.name)
        return predict.response_bytes(plan, outputs, spec, self.tensor_content)

    def _runner(self, signature, feeds, fetches, caller_thread=True):
        try:
            return self.servable.runner(signature, feeds, fetches, caller_thread)
        except tf.errors.OpError as err:
            raise status.from_tf_error(err) from err
        except (ValueError, TypeError, KeyError) as err:
            raise status.invalid(f"signature {signature.name} cannot run: {err}") from err

    async def _run(self, runner, arrays):
        try:
            return await self._execute(runner, arrays)
        except tf.errors.OpError as err:
            raise status.from_tf_error(err) from err

    async def _execute(self, runner, arrays):
        """Runs `runner` inline or on a thread (see the class doc)."""
        cost = getattr(runner, "cost", None)
        if cost is not None and cost < self.inline_max_seconds:
            return timed(runner, arrays)
        return await self.executor.run(timed, runner, arrays)

    # --- Classify / Regress / MultiInference --------------------------------------------------

    async def classify(self, request, routed_version: int | None = None, *, warmup: bool = False):
        if not warmup:
            if not request.HasField("model_spec"):
                raise status.invalid(status.MISSING_MODEL_SPEC)
            self.resolve(request.model_spec, routed_version)
        signature, fetches = classify.classification_signature(self.servable, request.model_spec.signature_name)
        examples = classify.examples(request.input)
        classify.check_string_input(signature, classify.CLASSIFY_INPUTS)
        outputs = await self._run(self._runner(signature, (classify.CLASSIFY_INPUTS,), fetches), [examples])
        response = classification_pb2.ClassificationResponse()
        response.model_spec.CopyFrom(self._spec(request.model_spec, signature.name))
        classify.fill_classification(response.result, len(examples), fetches, outputs)
        return response

    async def regress(self, request, routed_version: int | None = None, *, warmup: bool = False):
        if not warmup:
            if not request.HasField("model_spec"):
                raise status.invalid(status.MISSING_MODEL_SPEC)
            self.resolve(request.model_spec, routed_version)
        signature, fetches = classify.regression_signature(self.servable, request.model_spec.signature_name)
        examples = classify.examples(request.input)
        classify.check_string_input(signature, classify.REGRESS_INPUTS)
        outputs = await self._run(self._runner(signature, (classify.REGRESS_INPUTS,), fetches), [examples])
        response = regression_pb2.RegressionResponse()
        response.model_spec.CopyFrom(self._spec(request.model_spec, signature.name))
        classify.fill_regression(response.result, len(examples), outputs)
        return response

    async def multi_inference(self, request, routed_version: int | None = None, *, warmup: bool = False):
        # TF Serving looks the servable up with the first task's ModelSpec (an
        # empty one without tasks).
        if not request.tasks or not request.tasks[0].HasField("model_spec"):
            raise status.invalid(status.NO_MODEL_NAME)
        if not warmup:
            self.resolve(request.tasks[0].model_spec, routed_version)
        plan = classify.multi_inference_plan(self.servable, request)
        examples = classify.examples(request.input)
        classify.check_string_input(plan[0][1], classify.CLASSIFY_INPUTS)
        response = inference_pb2.MultiInferenceResponse()
        for task, signature, method, fetches in plan:
            outputs = await self._run(self._runner(signature, (classify.CLASSIFY_INPUTS,), fetches), [examples])
            result = response.results.add()
            result.model_spec.CopyFrom(self._spec(task.model_spec, signature.name))
            if method == classify.CLASSIFY_METHOD:
                classify.fill_classification(result.classification_result, len(examples), fetches, outputs)
            else:
                classify.fill_regression(result.regression_result, len(examples), outputs)
        return response

    # --- metadata and status -------------------------------------------------------------------

    def model_metadata(self, request, routed_version: int | None = None):
        if not request.HasField("model_spec"):
            raise status.invalid(status.MISSING_MODEL_SPEC)
        if not request.metadata_field:
            raise status.invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise status.invalid(f"Metadata field {field} is not supported")
        self.resolve(request.model_spec, routed_version)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.name if routed_version is None else request.model_spec.name
        response.model_spec.version.value = self.version
        response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(self._metadata_any)
        return response

    def model_status(self, request, routed_version: int | None = None):
        if not request.HasField("model_spec"):
            raise status.invalid(status.MISSING_MODEL_SPEC)
        spec = request.model_spec
        has_version = spec.WhichOneof("version_choice") == "version"
        name_ok = spec.name == self.name or routed_version is not None
        if has_version and (not name_ok or spec.version.value != self.version):
            raise status.not_found(f"Could not find version {spec.version.value} of model {spec.name}")
        if not name_ok:
            raise status.not_found(f"Could not find any versions of model {spec.name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        entry = response.model_version_status.add()
        entry.version = self.version
        entry.state = int(self.state)
        entry.status.error_code = 0
        entry.status.error_message = ""
        return response


async def run_prediction_log(model: ServedModel, log_entry) -> None:
    """Replays one PredictionLog record (warmup); raises on failure."""
    kind = log_entry.WhichOneof("log_type")
    if kind == "predict_log":
        await model.predict(log_entry.predict_log.request, warmup=True)
    elif kind == "classify_log":
        await model.classify(log_entry.classify_log.request, warmup=True)
    elif kind == "regress_log":
        await model.regress(log_entry.regress_log.request, warmup=True)
    elif kind == "multi_inference_log":
        await model.multi_inference(log_entry.multi_inference_log.request, warmup=True)
    else:
        raise status.unimplemented(f"Unsupported log_type for warmup: {kind}")

