"""gRPC handlers: tensorflow.serving.PredictionService and ModelService.

Thin: read the routed version from the metadata, call `ServedModel`, turn a
`ServingError` into its status (the one place that does), count the call.
`Servicer.invoke` does this for the gRPC handlers and for the framed
protocol's server (frames.py) alike, so both run a call the same way.
Handlers return the response serialized (Predict's is built from numpy
buffers in `tensors.py`), so no response serializer is registered.

Requests arrive as bytes and are parsed here: a body that is not the
method's message is INVALID_ARGUMENT (gRPC's own deserializer would answer
UNKNOWN), and one larger than `max_request_bytes` (see config.py) is
RESOURCE_EXHAUSTED before it is parsed, as is a PredictBatch member; a
Predict input whose shape decodes to more than that is INVALID_ARGUMENT.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)

from cloudml.internal.v1 import replica_pb2
from services.models.model_server import predict as predict_lib
from services.models.model_server import status
from services.models.model_server.config import DEFAULT_MAX_REQUEST_BYTES_CAP
from services.models.model_server.core import ServedModel

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
REPLICA_SERVICE = "cloudml.internal.v1.ReplicaService"
#: Set by the gateway: the model version it routed this request to (see core.py).
ROUTED_VERSION_KEY = "x-cloudml-resolved-version"
_OK = grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class Rpc:
    """One unary method as its front ends (the gRPC server, frames.py) call it."""

    service: str
    method: str
    #: `await call(request message, routed version or None)`: the response
    call: Callable[[Any, int | None], Awaitable[Any]]
    #: None: the call takes the raw bytes and parses and counts them itself (PredictBatch)
    request_cls: type | None
    #: the call returns its response serialized already (Predict, see tensors.py)
    returns_bytes: bool = False


def routed_version(context) -> int | None:
    for key, value in context.invocation_metadata() or ():
        if key == ROUTED_VERSION_KEY:
            try:
                return int(value)
            except ValueError:
                raise status.invalid(f"bad {ROUTED_VERSION_KEY} metadata: {value!r}") from None
    return None


class MemberContext:
    """What a PredictBatch member's Predict sees of its own call, in place of
    a gRPC context: its caller's metadata and deadline (replica.proto
    PredictMember), and the trailing metadata it sets, returned to its
    caller in its PredictResult."""

    def __init__(self, member: replica_pb2.PredictMember, now: float):
        self._metadata = tuple((m.key, m.value if m.key.endswith("-bin") else m.value.decode("utf-8", "replace"))
                               for m in member.metadata)
        #: time.monotonic() at which its caller gives up; None: no deadline
        self.deadline = now + member.timeout_micros / 1e6 if member.timeout_micros > 0 else None
        self.trailers: tuple = ()

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def set_trailing_metadata(self, metadata) -> None:
        self.trailers = tuple(metadata)


def deadline_exceeded() -> status.ServingError:
    return status.ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def too_large(method: str, size: int, limit: int) -> status.ServingError:
    return status.ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{method} request of {size} bytes is larger than this model's limit of {limit} bytes")


class Servicer:
    def __init__(self, model: ServedModel, metrics=None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES_CAP):
        self.model = model
        self.metrics = metrics
        #: the largest request taken (config.Settings.max_request_bytes, set again once the model is loaded)
        self.max_request_bytes = max_request_bytes
        #: PredictionService's methods (the ones the data plane forwards, also over frames.py)
        self.prediction_rpcs = {
            "Predict": Rpc(PREDICTION_SERVICE, "Predict", self._predict, predict_pb2.PredictRequest, True),
            "Classify": Rpc(PREDICTION_SERVICE, "Classify", self._classify, classification_pb2.ClassificationRequest),
            "Regress": Rpc(PREDICTION_SERVICE, "Regress", self._regress, regression_pb2.RegressionRequest),
            "MultiInference": Rpc(PREDICTION_SERVICE, "MultiInference", self._multi_inference,
                                  inference_pb2.MultiInferenceRequest),
            "GetModelMetadata": Rpc(PREDICTION_SERVICE, "GetModelMetadata", self._metadata,
                                    get_model_metadata_pb2.GetModelMetadataRequest),
        }
        #: what the framed protocol (frames.py) serves: these, and the data plane's coalesced groups
        self.framed_rpcs = {**self.prediction_rpcs, "PredictBatch": Rpc(
            REPLICA_SERVICE, "PredictBatch", lambda raw, _routed: self.predict_batch(raw), None, True)}
        self.model_rpcs = {
            "GetModelStatus": Rpc(MODEL_SERVICE, "GetModelStatus", self._status,
                                  get_model_status_pb2.GetModelStatusRequest),
            "HandleReloadConfigRequest": Rpc(MODEL_SERVICE, "HandleReloadConfigRequest", self._reload,
                                             model_management_pb2.ReloadConfigRequest),
        }

    def parse(self, method: str, request_cls, raw: bytes):
        """The request message of `raw`; raises ServingError when too large or undecodable."""
        if len(raw) > self.max_request_bytes:
            raise too_large(method, len(raw), self.max_request_bytes)
        try:
            request = request_cls.FromString(raw)
        except (DecodeError, ValueError, RecursionError):
            raise status.invalid(f"Could not parse the {request_cls.DESCRIPTOR.name}") from None
        if request_cls is predict_pb2.PredictRequest:
            predict_lib.check_input_sizes(request, self.max_request_bytes)
        return request

    async def invoke(self, rpc: Rpc, raw: bytes, routed: int | None = None, context=None):
        """Runs one call of `rpc` as every front end runs it: parse `raw`
        (`parse`), call the model, turn a ServingError into its status and
        any other exception into INTERNAL (its traceback to the log, never
        to the caller), count it (`metrics.inflight`, `metrics.observe`).

        The routed version is `routed` (the framed server, frames.py, reads
        it from its CALL header), or read from `context`'s
        x-cloudml-resolved-version metadata (the gRPC handler). Returns
        `(code, message, body)`: a grpc.StatusCode, its status message, and
        the serialized response ("" and b"" unless OK). A cancelled call
        (its caller went away, or the framed server's deadline passed: a
        `status.CANCEL_DEADLINE` cancellation) re-raises CancelledError, counted as
        CANCELLED or DEADLINE_EXCEEDED. An rpc without a request class
        (PredictBatch) gets `raw` as is, and parses and counts it itself.
        """
        metrics = self.metrics if rpc.request_cls is not None else None
        start = time.perf_counter()
        code = "OK"
        if metrics is not None:
            metrics.inflight.inc()
        try:
            request = raw if rpc.request_cls is None else self.parse(rpc.method, rpc.request_cls, raw)
            if context is not None:
                routed = routed_version(context)
            response = await rpc.call(request, routed)
            return _OK, "", response if rpc.returns_bytes else response.SerializeToString()
        except status.ServingError as err:
            code = err.code.name
            return err.code, err.message, b""
        except asyncio.CancelledError as err:
            code = "DEADLINE_EXCEEDED" if status.CANCEL_DEADLINE in err.args else "CANCELLED"
            raise
        except Exception:  # noqa: BLE001 - INTERNAL to the caller, the traceback to the log
            code = "INTERNAL"
            log.exception("%s/%s failed", rpc.service, rpc.method)
            return grpc.StatusCode.INTERNAL, f"Internal error in {rpc.method} (see the model server log)", b""
        finally:
            if metrics is not None:
                metrics.inflight.dec()
                metrics.observe(rpc.service, rpc.method, code, time.perf_counter() - start)

    def _handler(self, rpc: Rpc):
        """The gRPC handler of `rpc`: `invoke`, then the body or the status."""
        invoke = self.invoke

        async def handler(raw, context):
            code, message, body = await invoke(rpc, raw, None, context)
            if code is _OK:
                return body
            await context.abort(code, message)

        return handler

    # --- the gateway's coalesced Predict calls (replica.proto) ---------------------------------

    async def _predict_batch_handler(self, raw: bytes, context) -> bytes:
        """PredictBatch over gRPC: `predict_batch`, or its status."""
        try:
            return await self.predict_batch(raw)
        except status.ServingError as err:
            await context.abort(err.code, err.message)

    async def predict_batch(self, raw: bytes) -> bytes:
        """A PredictBatchRequest's answer, serialized (the gRPC handler and the
        framed protocol's PredictBatch method call this); a body that is not
        one raises INVALID_ARGUMENT.

        Each member is a Predict call of its own: checked on its own, given
        its own answer or error, its caller's metadata and deadline, and
        counted as a Predict call; its trailers go back in its result. A member
        whose deadline has passed on arrival is not run; one whose deadline
        passes before the group's answers are in is DEADLINE_EXCEEDED. The
        members that pass go to the batcher together and run without waiting
        out batch_timeout_micros: they already waited in the data plane
        (`ServedModel.predict_group`)."""
        try:
            request = replica_pb2.PredictBatchRequest.FromString(raw)
        except (DecodeError, ValueError, RecursionError):
            raise status.invalid("Could not parse the PredictBatchRequest") from None
        # `requests`: a data plane that predates `members` (no deadline, no metadata).
        members = list(request.members) or [replica_pb2.PredictMember(request=r) for r in request.requests]
        metrics = self.metrics
        start = time.perf_counter()
        now = time.monotonic()
        n = len(members)
        if metrics is not None:
            metrics.inflight.inc(n)
            metrics.groups.observe(n)
        contexts = [MemberContext(m, now) for m in members]
        planned, results = [], [None] * n
        for i, (member, ctx) in enumerate(zip(members, contexts)):
            try:
                if ctx.expired():
                    raise deadline_exceeded()
                routed = request.resolved_version or routed_version(ctx)
                planned.append((i, routed, self.parse("Predict", predict_pb2.PredictRequest, member.request)))
            except status.ServingError as err:
                results[i] = err
        try:
            # One call per resolved version (the data plane sends one; members may name their own).
            for routed in {r for _, r, _ in planned}:
                group = [(i, req) for i, r, req in planned if r == routed]
                outcomes = await self.model.predict_group([req for _, req in group], routed)
                for (i, _), outcome in zip(group, outcomes):
                    results[i] = deadline_exceeded() if contexts[i].expired() else outcome
        finally:
            if metrics is not None:
                metrics.inflight.dec(n)
        elapsed = time.perf_counter() - start
        answers = []
        for outcome, ctx in zip(results, contexts):
            trailers = [replica_pb2.MetadataEntry(key=k, value=v if isinstance(v, bytes) else v.encode())
                        for k, v in ctx.trailers]
            if isinstance(outcome, bytes):
                code = grpc.StatusCode.OK
                answers.append(replica_pb2.PredictResult(response=outcome, trailers=trailers))
            elif isinstance(outcome, status.ServingError):
                code = outcome.code
                answers.append(replica_pb2.PredictResult(code=code.value[0], message=outcome.message,
                                                         trailers=trailers))
            else:
                code = grpc.StatusCode.INTERNAL
                log.error("%s/Predict (in PredictBatch) failed", PREDICTION_SERVICE, exc_info=outcome)
                answers.append(replica_pb2.PredictResult(
                    code=code.value[0], message="Internal error in Predict (see the model server log)",
                    trailers=trailers))
            if metrics is not None:
                metrics.observe(PREDICTION_SERVICE, "Predict", code.name, elapsed)
        return replica_pb2.PredictBatchResponse(results=answers).SerializeToString()

    # --- calls -------------------------------------------------------------------------------

    async def _predict(self, request, routed):
        return await self.model.predict(request, routed)

    async def _classify(self, request, routed):
        return await self.model.classify(request, routed)

    async def _regress(self, request, routed):
        return await self.model.regress(request, routed)

    async def _multi_inference(self, request, routed):
        return await self.model.multi_inference(request, routed)

    async def _metadata(self, request, routed):
        return self.model.model_metadata(request, routed)

    async def _status(self, request, routed):
        return self.model.model_status(request, routed)

    async def _reload(self, request, routed):
        raise status.unimplemented(
            "HandleReloadConfigRequest is not supported: a Cloud-ML model-server replica serves one model "
            "version; change models and versions through the models service"
        )

    # --- registration ----------------------------------------------------------------------------

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(rpcs):
            # Handlers return the response serialized (`invoke`): no serializer.
            return {name: grpc.unary_unary_rpc_method_handler(self._handler(rpc), request_deserializer=None)
                    for name, rpc in rpcs.items()}

        replica = {
            "PredictBatch": grpc.unary_unary_rpc_method_handler(
                self._predict_batch_handler, request_deserializer=None),
        }
        return [
            grpc.method_handlers_generic_handler(PREDICTION_SERVICE, unary(self.prediction_rpcs)),
            grpc.method_handlers_generic_handler(MODEL_SERVICE, unary(self.model_rpcs)),
            grpc.method_handlers_generic_handler(REPLICA_SERVICE, replica),
        ]
