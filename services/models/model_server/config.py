"""The replica's command line, read once in `__main__`, and its request-size limit.

Request size limit
------------------
A Predict request costs the replica several times its serialized size: the
gRPC receive buffer, the parsed message, the decoded numpy inputs, the
TensorFlow input tensors, outputs of about the inputs' size for most models,
and the response bytes (measured with half_plus_two: see
REQUEST_MEMORY_FACTOR). The replica takes no request that could push it over
its memory limit:

    max_request_bytes = clamp((memory_limit - rss_after_load) / REQUEST_MEMORY_FACTOR,
                              MIN_REQUEST_BYTES, max_request_bytes_cap)

where `rss_after_load` is the process's resident memory once the model is
loaded and warmed up, `memory_limit` is `--memory-limit-bytes` (by default
$CLOUDML_MEMORY_LIMIT_BYTES, which the runtime sets from the version's
resources.memory_bytes, else the cgroup's memory limit; none: the cap alone)
and `--max-request-bytes-cap` (64 MiB by default) is the platform-wide cap.
Before the model is loaded (gRPC's receive limit is fixed when the server is
built) the bound is the same formula with nothing loaded. Larger requests are
RESOURCE_EXHAUSTED; the replica publishes its figure in its endpoint record so
that gateways refuse them before sending. A decoded input tensor may not hold
more bytes than the limit either (`float_val: [0]` with a huge shape is
INVALID_ARGUMENT).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from services.models.model_server.batching import BatchingConfig

MiB = 1024 * 1024
#: Peak resident memory a Predict request costs the replica, in multiples of
#: its serialized size (half_plus_two, float inputs in float_val or
#: tensor_content; measured by tests/integration/test_predict_limits.py for a
#: 4 MiB request in tensor_content: x7.96 when first written, x9.93-9.96 idle
#: and x10.79 with the suite running alongside on TensorFlow 2.21; 12 leaves
#: a margin over the worst seen).
REQUEST_MEMORY_FACTOR = 12
#: The limit never goes below this (a model that left almost nothing of its
#: memory still takes small requests).
MIN_REQUEST_BYTES = 64 * 1024
DEFAULT_MAX_REQUEST_BYTES_CAP = 64 * MiB


@dataclass
class Settings:
    model_name: str
    version: int
    base_path: str
    listen: str = "127.0.0.1:0"
    port_file: str | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    metrics_listen: str | None = None
    log_level: str = "INFO"
    #: encode Predict outputs in tensor_content instead of the typed fields
    tensor_content: bool = False
    warmup_iterations: int = 1
    #: seconds in-flight calls get to finish after SIGTERM
    grace_seconds: float = 5.0
    #: seconds between health NOT_SERVING and refusing new calls (the gateways' time to stop routing here)
    drain_delay: float = 0.0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    #: TensorFlow calls that recently took less than this run on the event loop
    inline_max_micros: int = 100
    #: batches of a coalesced group that recently took less than this run on the event loop
    inline_group_max_micros: int = 2000
    #: the native front for direct callers (batching on or off): auto (if built), on (required), off
    native_front: str = "auto"
    #: serve the data plane's framed protocol (frames.py) beside a unix: listen
    frames: bool = True
    #: the replica's memory limit in bytes (0: none known)
    memory_limit_bytes: int = 0
    #: the platform-wide cap on a request's size
    max_request_bytes_cap: int = DEFAULT_MAX_REQUEST_BYTES_CAP

    def max_request_bytes(self, rss_bytes: int = 0) -> int:
        """The largest request this replica takes with `rss_bytes` resident (see the module doc)."""
        return request_limit(self.memory_limit_bytes, rss_bytes, self.max_request_bytes_cap)


def request_limit(memory_limit: int, rss_bytes: int, cap: int) -> int:
    """The module doc's formula."""
    if memory_limit <= 0:
        return cap
    headroom = (memory_limit - rss_bytes) // REQUEST_MEMORY_FACTOR
    return max(min(cap, MIN_REQUEST_BYTES), min(cap, headroom))


def resident_bytes() -> int:
    """This process's resident memory (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_memory_limit() -> int:
    """$CLOUDML_MEMORY_LIMIT_BYTES (set by the runtime), else the cgroup's memory limit, else 0."""
    raw = os.environ.get("CLOUDML_MEMORY_LIMIT_BYTES", "").strip()
    if raw.isdigit():
        return int(raw)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 50:  # "max" or ~2^63: no limit
            return int(value)
    return 0


def _batching(raw: str | None) -> BatchingConfig:
    if not raw:
        return BatchingConfig()
    text = raw
    if not raw.lstrip().startswith("{"):
        with open(raw) as f:
            text = f.read()
    try:
        data = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--batching-config is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("--batching-config must be a JSON object")
    try:
        return BatchingConfig.from_dict(data)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.models.model_server",
        description="One model-server replica: serves one SavedModel version with TF Serving's gRPC API.",
    )
    p.add_argument("--model-name", required=True, help="the name requests address (ModelSpec.name)")
    p.add_argument("--version", required=True, type=int, help="the version number served (>= 1)")
    p.add_argument("--base-path", required=True, help="the SavedModel directory (holding saved_model.pb)")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="gRPC address to bind: unix:/path/replica.sock, or host:port (port 0: any free port)")
    p.add_argument("--port-file", help='JSON written once listening: {"pid", "address"} (and "grpc": port on '
                                       'TCP, "frame_address" with --frames on a unix: listen); once serving also "coalesce_max" and "max_request_bytes"; '
                                       'on a load failure {"error": ...}')
    p.add_argument("--batching-config", help="server-side batching as JSON (or a JSON file): enabled, "
                                             "max_batch_size, batch_timeout_micros, max_enqueued_batches, "
                                             "num_batch_threads")
    p.add_argument("--metrics-listen", help="Prometheus metrics over HTTP on unix:/path, or host:port "
                                            "(port 0: any free port)")
    p.add_argument("--tensor-content", action="store_true",
                   help="return Predict outputs in tensor_content (TF Serving's default is the typed fields)")
    p.add_argument("--warmup-iterations", type=int, default=1, help="times each warmup record is replayed")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish in-flight calls on SIGTERM")
    p.add_argument("--drain-delay", type=float, default=0.0,
                   help="seconds between health NOT_SERVING and refusing calls, on SIGTERM (default 0; the "
                        "models service passes its own)")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="TensorFlow intra-op threads (0: the CPUs divided by the threads that make TensorFlow "
                        "calls at once, which are num_batch_threads with batching and one per CPU without; "
                        "at least 1)")
    p.add_argument("--inter-op-threads", type=int, default=0, help="TensorFlow inter-op threads (0: auto)")
    p.add_argument("--inline-max-micros", type=int, default=100,
                   help="run a signature on the event loop while its calls take less than this many "
                        "microseconds (a thread hand-off costs more); 0: always on a thread")
    p.add_argument("--inline-group-max-micros", type=int, default=2000,
                   help="run the batch of a group of calls the gateway coalesced (PredictBatch) on the event "
                        "loop while the signature's batches take less than this many microseconds; 0: always "
                        "on a batch thread")
    p.add_argument("--native-front", default="auto", choices=("auto", "on", "off"),
                   help="put the native front (build/native/cloudml-dataplane) on the listening port, "
                        "so that direct callers get the native fast path (with batching on, their concurrent "
                        "Predict calls are also coalesced as the gateway coalesces its own); this process then "
                        "listens beside it; auto: if it is built")
    p.add_argument("--frames", default="on", choices=("on", "off"),
                   help="on a unix:DIR/NAME.sock listen, also serve the data plane's framed protocol on "
                        "unix:DIR/NAME.frame.sock (its port-file key: frame_address); never on TCP")
    p.add_argument("--memory-limit-bytes", type=int, default=None,
                   help="this replica's memory limit, from which its request size limit is derived (default: "
                        "$CLOUDML_MEMORY_LIMIT_BYTES, else the cgroup's limit; 0: none)")
    p.add_argument("--max-request-bytes-cap", type=int, default=DEFAULT_MAX_REQUEST_BYTES_CAP,
                   help="the platform-wide cap on a request's serialized size in bytes (default 64 MiB)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    if args.version < 1:
        p.error("--version must be >= 1")
    try:
        batching = _batching(args.batching_config)
    except (argparse.ArgumentTypeError, OSError) as err:
        p.error(str(err))
    if args.max_request_bytes_cap < 1:
        p.error("--max-request-bytes-cap must be >= 1")
    memory_limit = args.memory_limit_bytes if args.memory_limit_bytes is not None else default_memory_limit()
    return Settings(
        model_name=args.model_name,
        version=args.version,
        base_path=os.path.abspath(args.base_path),
        listen=args.listen,
        port_file=args.port_file,
        batching=batching,
        metrics_listen=args.metrics_listen,
        log_level=args.log_level,
        tensor_content=args.tensor_content,
        warmup_iterations=max(1, args.warmup_iterations),
        grace_seconds=args.grace,
        drain_delay=max(0.0, args.drain_delay),
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        inline_max_micros=max(0, args.inline_max_micros),
        inline_group_max_micros=max(0, args.inline_group_max_micros),
        native_front=args.native_front,
        frames=args.frames == "on",
        memory_limit_bytes=max(0, memory_limit),
        max_request_bytes_cap=args.max_request_bytes_cap,
    )
