"""The replica process: listen, load, warm up, serve, drain.

A replica is tenant code (a SavedModel's ops read and write files), so it
never talks to etcd or to any platform service: it tells its state only
through its port file and its gRPC health service, and the models service's
reconciler (services/models/reconciler.py) publishes its endpoint for
gateways.

1. Bind `--listen` and write the port file
   `{"pid": pid, "address": "<gRPC address>"}` (plus `"grpc": port` on TCP);
   health is NOT_SERVING and GetModelStatus answers LOADING meanwhile.
   `--listen` is `unix:/path/replica.sock` when the models service starts it
   (only the platform can reach the socket's directory), or `host:port`
   (port 0 allowed) when run by hand. On a unix: listen (and `--frames on`,
   the default) this process also serves the data plane's framed protocol
   (frames.py, frame.h) on `unix:/path/replica.frame.sock` (mode 0600), and
   the port file has `"frame_address"` too.
2. Load the SavedModel (on its own thread; SIGTERM still works) and replay
   the warmup file. A failure is logged, written to the port file as
   `{"error": "...", "code": <gRPC code number>, "pid": pid}` (the models
   service shows it), and the process exits 1.
3. State AVAILABLE: the port file gains `coalesce_max` and
   `max_request_bytes` (what the endpoint record publishes), then health
   goes SERVING; the reconciler, watching health over the socket, publishes
   the endpoint.
4. SIGTERM/SIGINT: health goes NOT_SERVING (when the reconciler stops a
   replica it has already marked its endpoint UNLOADING); after
   `--drain-delay` (so gateways stop routing here) the server refuses new
   calls and in-flight ones get `--grace` seconds; then the process exits 0.
   The frame server stops at the same moment: no new connections, new
   calls answered UNAVAILABLE, in-flight ones finish within the same grace,
   then its connections close and its socket is removed.

Every replica, batching or not, puts the native front (the gateway's
data-plane binary in replica front mode, `--native-front`) on the
`--listen` address, and this process listens on an address of its own
(`server_address()`: a socket beside the front's, or a loopback port), so
direct callers get the native fast path: the per-call cost of a Python gRPC
hop is paid by this process only, once per call (batching off: the front
relays every call as is, `--coalesce-max 0`, its model calls over the
framed socket when there is one) or once per group (batching on, over the
framed socket too when there is one:
concurrent Predict calls reach it as PredictBatch groups, as the gateway's
do; every other call is relayed as is). The endpoint published for gateways
is this process's own address (the gateway has the same fast path and
coalesces already; a second hop would only add latency); the port file's
`address` (and `grpc`) are the front's, for direct callers, and
`replica_address` this process's. The front drains after this process; if
it dies, the replica exits 1 and its supervisor restarts it.

Metrics (`--metrics-listen`) are served over HTTP on `unix:/path` or
`host:port` (see metrics.serve_metrics).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import native
from services.models.model_server import servable as servable_lib
from services.models.model_server.batching import TFExecutor
from services.models.model_server.config import Settings, resident_bytes
from services.models.model_server.core import ServedModel, State
from services.models.model_server.frames import FrameServer
from services.models.model_server.metrics import Metrics, serve_metrics
from services.models.model_server.servicer import MODEL_SERVICE, PREDICTION_SERVICE, Servicer
from services.models.model_server.warmup import WarmupError, run_warmup

log = logging.getLogger(__name__)

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
)


def server_address(listen: str) -> str:
    """Where this process listens when the native front owns `listen`: for
    `unix:DIR/NAME.sock`, `unix:DIR/NAME.server.sock` (the same directory, so
    the same access rules; the reconciler expects this name), else a loopback
    port of its own."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        stem = path[:-len(".sock")] if path.endswith(".sock") else path
        return f"unix:{stem}.server.sock"
    return "127.0.0.1:0"


def frame_address(listen: str) -> str | None:
    """Where this process serves the framed protocol (frames.py) for a
    `unix:DIR/NAME.sock` listen: `unix:DIR/NAME.frame.sock` (the same
    directory, so the same access rules; frame.h names it so). None on a
    TCP listen: the protocol has no authentication, only a Unix socket in
    the platform's directory keeps others out."""
    if not listen.startswith("unix:"):
        return None
    path = listen[len("unix:"):]
    stem = path[:-len(".sock")] if path.endswith(".sock") else path
    return f"unix:{stem}.frame.sock"


def bound_address(listen: str, port: int) -> str:
    """The address callers use for a bound `listen` (a unix: address as is)."""
    if listen.startswith("unix:"):
        return listen
    return f"{listen.rpartition(':')[0] or '127.0.0.1'}:{port}"


def write_port_file(path: str | None, content: dict) -> None:
    if not path:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)


def default_intra_op_threads(tf_threads: int) -> int:
    """TensorFlow intra-op threads when `--intra-op-threads` is 0: the CPUs
    divided among the threads that make TensorFlow calls at once.

    Up to `tf_threads` calls (the executor's, or the batch threads) run
    concurrently, each on its own thread; TensorFlow's own default (an
    intra-op pool as wide as the machine) lets every one of them fan out
    over all CPUs, so N calls oversubscribe the cores N times and the pool's
    spinning threads take CPU from the event loop. With the CPUs shared out,
    on the 2-CPU box (MLP, concurrency 32, bench/bench_batching.py) the
    unbatched replica went from ~1,750 to ~2,300 rps and the batched one
    (2 batch threads) gained as much. One call at a time (e.g. one batch
    thread) still gets every CPU.
    """
    return max(1, (os.cpu_count() or 1) // max(1, tf_threads))


async def _in_thread(fn, *args):
    """Runs `fn` on a daemon thread (a SIGTERM during a long load need not wait for it)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(error, result):
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target():
        try:
            result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, err, None)
        else:
            loop.call_soon_threadsafe(settle, None, result)

    threading.Thread(target=target, name="model-load", daemon=True).start()
    return await future


class ModelServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.executor = TFExecutor(settings.batching.threads)
        self.model = ServedModel(
            settings.model_name, settings.version, batching=settings.batching, executor=self.executor,
            tensor_content=settings.tensor_content, metrics=self.metrics,
            inline_max_seconds=settings.inline_max_micros / 1e6,
            inline_group_max_seconds=settings.inline_group_max_micros / 1e6,
        )
        # gRPC refuses larger messages itself (RESOURCE_EXHAUSTED); the bound
        # tightens once the model is loaded (Servicer.max_request_bytes). The
        # slack covers a PredictBatch group's framing.
        self.server = grpc.aio.server(options=tuple(o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length")
                                      + (("grpc.max_receive_message_length", settings.max_request_bytes() + 64 * 1024),))
        self.servicer = Servicer(self.model, self.metrics, settings.max_request_bytes())
        self.health = health.aio.HealthServicer()
        self.stop_event = asyncio.Event()
        self.address = ""
        self.port = 0
        self.ports: dict = {}
        self.front: native.NativeProcess | None = None
        self.frames: FrameServer | None = None
        self.failed = False

    async def set_health(self, serving: bool) -> None:
        value = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            await self.health.set(name, value)

    async def start_listening(self) -> None:
        self.server.add_generic_rpc_handlers(tuple(self.servicer.generic_handlers()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (PREDICTION_SERVICE, MODEL_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        await self.set_health(False)
        front = self._front_wanted()
        listen = server_address(self.settings.listen) if front else self.settings.listen
        self.port = self.server.add_insecure_port(listen)
        if not self.port:
            raise OSError(f"cannot listen on {listen}")
        await self.server.start()
        self.address = bound_address(listen, self.port)
        ports = {"pid": os.getpid(), "address": self.address}
        if not listen.startswith("unix:"):
            ports["grpc"] = self.port
        framed = frame_address(self.settings.listen) if self.settings.frames else None
        if framed:
            self.frames = FrameServer(self.servicer, framed[len("unix:"):])
            await self.frames.start()
            ports["frame_address"] = framed
        if front:
            self.front = native.NativeProcess("the replica's native front")
            port = await self.front.start(["--listen", self.settings.listen, "--front-for", self.address,
                                           "--coalesce-max", str(self.coalesce_max()), "--spin-us", "0",
                                           "--batch-timeout-us", str(self.batch_timeout_micros()),
                                           "--max-request-bytes", str(self.settings.max_request_bytes()),
                                           # Its HTTP/2 front sends model calls here framed (with
                                           # batching, Predict calls coalesced into PredictBatch groups).
                                           *(("--front-frame", framed) if framed else ())])
            self.front.watch(self._front_failed)
            public = bound_address(self.settings.listen, port)
            ports.update(address=public, replica_address=self.address)
            if not self.settings.listen.startswith("unix:"):
                ports["grpc"] = port
            log.info("native front (pid %d) on %s (%s)", self.front.process.pid, public,
                     "coalesces direct Predict calls" if self.coalesce_max() else "relays calls, no coalescing")
        if self.settings.metrics_listen:
            ports["metrics"] = serve_metrics(self.settings.metrics_listen, self.metrics.registry)
        self.ports = ports
        write_port_file(self.settings.port_file, ports)
        log.info("model server for %s version %d listening on %s", self.settings.model_name,
                 self.settings.version, self.address)

    def _front_wanted(self) -> bool:
        mode = self.settings.native_front
        if mode == "off":
            return False
        if not native.built():
            if mode == "on":
                raise OSError(f"--native-front on, but {native.binary_path()} is not built "
                              "(run scripts/build_native.sh)")
            log.warning("the native front is not built (%s): direct callers reach the Python server itself "
                        "(their Predict calls are not coalesced)", native.binary_path())
            return False
        return True

    def _front_failed(self, code: int) -> None:
        log.error("the native front exited (%s); stopping this replica so it restarts whole", code)
        self.failed = True
        self.stop_event.set()

    async def load(self) -> None:
        """Loads and warms up the model; raises LoadError or WarmupError."""
        s = self.settings
        self.model.set_state(State.LOADING)
        log.info("loading SavedModel %s (model %s version %d)", s.base_path, s.model_name, s.version)
        intra = s.intra_op_threads or default_intra_op_threads(self.executor.threads)
        servable = await _in_thread(
            lambda: servable_lib.load(s.base_path, intra_op_threads=intra, inter_op_threads=s.inter_op_threads)
        )
        self.model.attach(servable)
        log.info("loaded %s (%s runtime, signatures: %s)", s.base_path, servable.runtime,
                 ", ".join(servable.signatures))
        await run_warmup(self.model, s.base_path, s.warmup_iterations)
        self.servicer.max_request_bytes = s.max_request_bytes(resident_bytes())
        log.info("requests up to %d bytes (memory limit %d bytes)", self.servicer.max_request_bytes,
                 s.memory_limit_bytes)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        try:
            await self.start_listening()
        except Exception as err:  # noqa: BLE001 - reported like a load failure
            log.error("cannot start serving on %s: %s", self.settings.listen, err)
            write_port_file(self.settings.port_file, {"error": f"cannot listen on {self.settings.listen}: {err}",
                                                      "code": 14, "pid": os.getpid()})
            await self.server.stop(0)
            if self.frames is not None:
                await self.frames.stop(0)
            if self.front is not None:
                await self.front.stop()
            return 1
        load = asyncio.create_task(self.load())
        stopped = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            log.info("stopping before the model finished loading")
            load.cancel()
            await self._shutdown(drain=False)
            return 1 if self.failed else 0
        stopped.cancel()
        error = load.exception()
        if error is not None:
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            if not isinstance(error, (servable_lib.LoadError, WarmupError)):
                log.error("loading %s failed", self.settings.base_path, exc_info=error)
            log.error("Loading servable: {name: %s version: %d} failed: %s", self.settings.model_name,
                      self.settings.version, message)
            code = getattr(error, "code", 2)
            write_port_file(self.settings.port_file, {"error": message, "code": code if isinstance(code, int) else 2,
                                                      "pid": os.getpid()})
            self.model.set_state(State.END)
            await self._shutdown(drain=False)
            return 1
        self.model.set_state(State.AVAILABLE)
        # What the endpoint record publishes, for the reconciler (before health
        # says SERVING, which is what it waits for).
        write_port_file(self.settings.port_file, {**self.ports, "coalesce_max": self.coalesce_max(),
                                                  "max_request_bytes": self.servicer.max_request_bytes,
                                                  "batch_timeout_micros": self.batch_timeout_micros()})
        await self.set_health(True)
        log.info("health: SERVING (model %s version %d AVAILABLE)", self.settings.model_name, self.settings.version)
        await self.stop_event.wait()
        await self._shutdown(drain=not self.failed)
        return 1 if self.failed else 0

    def batch_timeout_micros(self) -> int:
        """How long a call held back to coalesce may wait for company (0 with batching off)."""
        batching = self.settings.batching
        return batching.batch_timeout_micros if batching.enabled else 0

    def coalesce_max(self) -> int:
        """How many Predict calls the gateway may send in one PredictBatch
        (published in the endpoint record; 0: batching off, never coalesce).
        A group fills every batch thread: max_batch_size calls for each, and
        the replica splits it into batches of at most max_batch_size rows that
        run side by side."""
        batching = self.settings.batching
        return batching.max_batch_size * batching.threads if batching.enabled else 0

    async def _shutdown(self, drain: bool) -> None:
        log.info("shutting down")
        if drain:
            self.model.set_state(State.UNLOADING)
        await self.set_health(False)
        if drain and self.settings.drain_delay > 0:
            await asyncio.sleep(self.settings.drain_delay)
        # Both servers stop taking calls at once and share the grace.
        grace = self.settings.grace_seconds if drain else 0
        await asyncio.gather(self.server.stop(grace), *([self.frames.stop(grace)] if self.frames else []))
        if self.front is not None:  # after the drain: in-flight calls came through it
            await self.front.stop()
        self.model.set_state(State.END)
        self.executor.shutdown()
        if self.model.servable is not None:
            with contextlib.suppress(Exception):
                self.model.servable.close()
        log.info("stopped")


def run(settings: Settings) -> int:
    async def main() -> int:
        return await ModelServer(settings).serve()

    return asyncio.run(main())
