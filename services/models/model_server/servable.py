"""Loading a SavedModel and running its signatures.

Like TF Serving (`SavedModelBundle`), the model is loaded into one TensorFlow
session from its `serve` MetaGraphDef, for TF1 `SavedModelBuilder` exports and
TF2 `tf.saved_model.save` exports alike; a signature runs as one session
call that feeds and fetches the tensors its SignatureDef names. Each
(feeds, fetches) pair gets a prebuilt session callable, which costs about
20 us per call in Python; the callables for every signature's full outputs
are built at load time, others (an `output_filter` subset) on first use.

One exception to TF Serving: a TF2 export whose graph-mode restore leaves
variables uninitialized (Keras 3 models written with `tf.saved_model.save`,
which TF Serving loads but then fails every request with "Could not find
variable ...") is served through `tf.saved_model.load` and its signature
functions instead. The check runs at load time, so such a model is not
reported AVAILABLE with a broken graph.
"""
from __future__ import annotations

import abc

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

from services.models.model_server import status
from services.models.model_server.tensors import TF_DTYPES, dtype_name

log = logging.getLogger(__name__)

SERVE_TAGS = ("serve",)
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

Runner = Callable[[Sequence[np.ndarray]], list]


class LoadError(Exception):
    """The SavedModel could not be loaded; the message says why, `code` is a
    gRPC status code number (NOT_FOUND for a missing model, DATA_LOSS for an
    unreadable one, TensorFlow's own code for its errors)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.message = message
        self.code = code


NOT_FOUND, DATA_LOSS = 5, 15


@dataclass(frozen=True)
class TensorSpec:
    alias: str
    name: str  # graph tensor name ("x:0"); empty for a TF2 function input
    dtype: int
    shape: tuple[int, ...] | None  # None: unknown rank; -1: unknown dimension


@dataclass(frozen=True)
class Signature:
    name: str
    method_name: str
    #: by alias, in alias order (the order inputs are fed in)
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    #: default values for inputs a request may leave out (SignatureDef.defaults)
    defaults: dict[str, tensor_pb2.TensorProto]
    proto: meta_graph_pb2.SignatureDef = field(repr=False)

    @property
    def input_aliases(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def output_aliases(self) -> tuple[str, ...]:
        return tuple(self.outputs)

    def debug_string(self) -> str:
        """The SignatureDef in text format, as TF Serving's DebugString() prints it."""
        return str(self.proto)


def _spec(alias: str, info: meta_graph_pb2.TensorInfo) -> TensorSpec:
    shape = None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim)
    return TensorSpec(alias, info.name, info.dtype, shape)


def _signature(name: str, proto: meta_graph_pb2.SignatureDef) -> Signature:
    return Signature(
        name=name,
        method_name=proto.method_name,
        inputs={a: _spec(a, proto.inputs[a]) for a in sorted(proto.inputs)},
        outputs={a: _spec(a, proto.outputs[a]) for a in sorted(proto.outputs)},
        defaults={a: proto.defaults[a] for a in sorted(proto.defaults)} if hasattr(proto, "defaults") else {},
        proto=proto,
    )


def check_dtypes(signature: Signature, aliases: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
    """Refuses a fed array whose dtype is not the signature's, in the session's words."""
    for index, (alias, arr) in enumerate(zip(aliases, arrays)):
        expected = signature.inputs[alias].dtype
        got = TF_DTYPES.get(arr.dtype)
        if got is None:
            got = 7 if arr.dtype.kind in ("O", "S", "U") else -1
        if got != expected:
            raise status.type_mismatch(index, dtype_name(expected), dtype_name(got) if got >= 0 else str(arr.dtype))


class Servable(abc.ABC):
    """A loaded SavedModel: its signatures and a way to run them."""

    def __init__(self, path: str, meta_graph: meta_graph_pb2.MetaGraphDef, runtime: str):
        self.path = path
        self.meta_graph_signatures = meta_graph.signature_def  # for GetModelMetadata, as loaded
        self.signatures: dict[str, Signature] = {
            name: _signature(name, proto) for name, proto in sorted(meta_graph.signature_def.items())
        }
        #: "session" (TF Serving's way) or "function" (tf.saved_model.load)
        self.runtime = runtime
        self._runners: dict[tuple, Runner] = {}
        self._lock = threading.Lock()
        #: TensorFlow calls made (a batch counts once)
        self.runs = 0
        #: a prometheus Counter to increment per call, if any
        self.run_counter = None

    # --- running ---------------------------------------------------------------------

    def runner(self, signature: Signature, feeds: tuple[str, ...], fetches: tuple[str, ...],
               caller_thread: bool = False) -> Runner:
        """A function running `signature` on arrays for the `feeds` aliases and
        returning the arrays of the `fetches` aliases, in order.

        `caller_thread`: execute the graph's ops on the calling thread instead
        of TensorFlow's inter-op pool (session runtime only). That saves the
        hand-off to the pool: half_plus_two 22 -> 5 us, a 3x1000 MLP on one row
        330 -> 200 us. The model server makes every call this way (batched
        ones too: in-process the pool is ~15% faster on a batch of 32, but in
        a loaded replica its threads compete for the CPUs with the event loop).
        """
        key = (signature.name, feeds, fetches, caller_thread)
        runner = self._runners.get(key)
        if runner is None:
            with self._lock:
                runner = self._runners.get(key)
                if runner is None:
                    runner = self._build_runner(signature, feeds, fetches, caller_thread)
                    if len(self._runners) < 1024:
                        self._runners[key] = runner
        return runner

    @abc.abstractmethod
    def _build_runner(self, signature: Signature, feeds: tuple[str, ...], fetches: tuple[str, ...],
                      caller_thread: bool) -> Runner:
        """How this kind of SavedModel runs a signature (session or function)."""

    def _count(self) -> None:
        self.runs += 1
        if self.run_counter is not None:
            self.run_counter.inc()

    def prepare(self) -> None:
        """Builds the runners of every signature with all its outputs."""
        for sig in self.signatures.values():
            if sig.inputs and sig.outputs and sig.method_name:
                try:
                    for caller_thread in (False, True):
                        self.runner(sig, sig.input_aliases, sig.output_aliases, caller_thread)
                except Exception as err:  # noqa: BLE001 - a bad signature must not fail the others
                    log.warning("signature %s cannot run: %s", sig.name, err)

    def close(self) -> None:
        pass


class SessionServable(Servable):
    """The model in a TF1-style session, as TF Serving runs it."""

    def __init__(self, path, meta_graph, session: tf.compat.v1.Session):
        super().__init__(path, meta_graph, "session")
        self._session = session

    def _build_runner(self, signature, feeds, fetches, caller_thread):
        feed_names = [signature.inputs[a].name for a in feeds]
        fetch_names = [signature.outputs[a].name for a in fetches]
        unique = list(dict.fromkeys(fetch_names))
        positions = [unique.index(n) for n in fetch_names]
        options = config_pb2.CallableOptions(feed=feed_names, fetch=unique)
        if caller_thread:
            options.run_options.inter_op_thread_pool = -1
        make = getattr(self._session, "_make_callable_from_options", None)
        if make is not None:
            fn = make(options)
        else:  # pragma: no cover - older TF
            fn = self._session.make_callable(unique, feed_names)

        def run(arrays: Sequence[np.ndarray]) -> list:
            self._count()
            out = fn(*arrays)
            return out if len(positions) == len(out) else [out[p] for p in positions]

        return run

    def close(self) -> None:
        self._session.close()


class FunctionServable(Servable):
    """A TF2 export run through `tf.saved_model.load` signature functions."""

    def __init__(self, path, meta_graph, loaded):
        super().__init__(path, meta_graph, "function")
        self._loaded = loaded
        self._functions = loaded.signatures

    def _build_runner(self, signature, feeds, fetches, caller_thread):
        fn = self._functions[signature.name]

        def run(arrays: Sequence[np.ndarray]) -> list:
            self._count()
            kwargs = {alias: tf.constant(arr) for alias, arr in zip(feeds, arrays)}
            try:
                out = fn(**kwargs)
            except (TypeError, ValueError) as err:
                raise status.invalid(str(err)) from err
            return [out[a].numpy() for a in fetches]

        return run


def _session_config(intra_op_threads: int, inter_op_threads: int) -> config_pb2.ConfigProto:
    return config_pb2.ConfigProto(
        allow_soft_placement=True,
        intra_op_parallelism_threads=intra_op_threads,
        inter_op_parallelism_threads=inter_op_threads,
    )


def _uninitialized_variables(session: tf.compat.v1.Session, graph: tf.Graph) -> list[str]:
    """Resource variables of the loaded graph that restoring left without a value."""
    handles = [op for op in graph.get_operations() if op.type == "VarHandleOp"]
    if not handles:
        return []
    with graph.as_default(), tf.name_scope("cloudml_model_server_init_check"):
        checks = [tf.raw_ops.VarIsInitializedOp(resource=op.outputs[0]) for op in handles]
    values = session.run(checks)
    return [op.name for op, ok in zip(handles, values) if not ok]


def load(path: str, *, tags: Sequence[str] = SERVE_TAGS, intra_op_threads: int = 0,
         inter_op_threads: int = 0) -> Servable:
    """Loads the SavedModel directory `path`; raises LoadError."""
    if not os.path.isdir(path):
        raise LoadError(f"SavedModel directory {path} does not exist", NOT_FOUND)
    if not any(os.path.exists(os.path.join(path, f)) for f in SAVED_MODEL_FILES):
        raise LoadError(f"SavedModel file does not exist at: {path}/{{saved_model.pbtxt|saved_model.pb}}",
                        NOT_FOUND)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=_session_config(intra_op_threads, inter_op_threads))
    try:
        with graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(session, list(tags), path)
        missing = _uninitialized_variables(session, graph)
    except Exception as err:  # noqa: BLE001 - every load failure is reported the same way
        session.close()
        raise _load_error(err) from err
    if not missing:
        servable: Servable = SessionServable(path, meta_graph, session)
    elif meta_graph.HasField("object_graph_def"):
        log.warning(
            "graph-mode restore left %d variable(s) uninitialized (e.g. %s); serving %s through "
            "tf.saved_model.load", len(missing), missing[0], path,
        )
        session.close()
        try:
            loaded = tf.saved_model.load(path, tags=list(tags))
        except Exception as err:  # noqa: BLE001
            raise _load_error(err) from err
        servable = FunctionServable(path, meta_graph, loaded)
    else:
        session.close()
        raise LoadError(f"variables not initialized after restoring {path}: {', '.join(missing[:5])}", 9)
    try:
        servable.prepare()
    except Exception as err:  # noqa: BLE001
        servable.close()
        raise _load_error(err) from err
    return servable


def _load_error(err: Exception) -> LoadError:
    message = (getattr(err, "message", None) or str(err) or type(err).__name__).strip()
    code = getattr(err, "error_code", None)
    if not isinstance(code, int):
        code = DATA_LOSS if isinstance(err, OSError) else 2
    return LoadError(message, code)

