"""Prometheus metrics of one model-server replica (served on `--metrics-listen`:
HTTP on a Unix socket `unix:/path`, which is how the models service starts
replicas so that only the platform reads them, or on `host:port`).

The standard `grpc_server_handled_total` / `grpc_server_handling_seconds`
(same names and labels as the platform services), plus:

- `cloudml_model_server_tf_runs_total`: TensorFlow session/function calls
  (a batch of requests counts once);
- `cloudml_model_server_batches_total` and `..._batch_requests` /
  `..._batch_rows`: formed batches and their sizes;
- `cloudml_model_server_warmup_requests_total`: warmup records replayed;
- `cloudml_model_server_state`: the replica's ModelVersionStatus state number;
- `cloudml_model_server_inflight_requests`: calls being handled now (what
  autoscaling on in-flight requests per replica reads).
"""
from __future__ import annotations

import os
import socketserver
import stat
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import MetricsHandler

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ("grpc_service", "grpc_method", "grpc_code")
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code.",
            labels, registry=self.registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds", "Time to handle an RPC, by status code.",
            labels, registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.tf_runs = Counter(
            "cloudml_model_server_tf_runs_total", "TensorFlow calls (a batch counts once).",
            registry=self.registry,
        )
        self.batches = Counter(
            "cloudml_model_server_batches_total", "Batches formed by the server-side batcher.",
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "cloudml_model_server_batch_requests", "Requests per batch.",
            registry=self.registry, buckets=_SIZE_BUCKETS,
        )
        self.batch_rows = Histogram(
            "cloudml_model_server_batch_rows", "Rows (0th-dimension size) per batch.",
            registry=self.registry, buckets=_SIZE_BUCKETS,
        )
        self.groups = Histogram(
            "cloudml_model_server_coalesced_group_calls",
            "Predict calls per PredictBatch group received (from a gateway or the replica's native front).",
            registry=self.registry, buckets=_SIZE_BUCKETS,
        )
        self.warmup_requests = Counter(
            "cloudml_model_server_warmup_requests_total", "Warmup records replayed.",
            registry=self.registry,
        )
        self.state = Gauge(
            "cloudml_model_server_state", "ModelVersionStatus state number of this replica.",
            registry=self.registry,
        )
        self.inflight = Gauge(
            "cloudml_model_server_inflight_requests", "PredictionService/ModelService calls being handled.",
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str], tuple] = {}

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        key = (service, method, code)
        child = self._children.get(key)
        if child is None:
            child = (self.handled.labels(*key), self.seconds.labels(*key))
            self._children[key] = child
        child[0].inc()
        child[1].observe(seconds)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_metrics(listen: str, registry: CollectorRegistry) -> str | int:
    """Serves `registry` over HTTP (GET /metrics) on a daemon thread. `listen`
    is `unix:/path` (returned as is; a stale socket there is replaced) or
    `host:port` (port 0: any free one; the bound port is returned)."""
    if not listen.startswith("unix:"):
        host, _, port = listen.rpartition(":")
        httpd, _ = start_http_server(int(port or 0), addr=host or "127.0.0.1", registry=registry)
        return httpd.server_port
    path = listen[len("unix:"):]
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    httpd = _UnixHTTPServer(path, MetricsHandler.factory(registry))
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return listen
