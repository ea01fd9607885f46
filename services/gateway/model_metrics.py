"""Per-model Prometheus metrics of the gateway's TF Serving APIs.

Model calls are answered in two places: by the Python gateway (first calls of
a caller and model, errors, REST) and by the native data plane (the cached
fast path). Both count here under the same metric names, so a scrape sees one
series per (model, version, API, code) whichever process answered:

- `cloudml_gateway_model_requests_total{model,version,api,code}`
- `cloudml_gateway_model_request_seconds{model,version,api}` (histogram)
- `cloudml_gateway_dataplane_calls_total{path="fast"|"control"|"direct"|...}`:
  model calls the data plane answered from its decision cache / sent to this
  process, and platform calls it relayed straight to their service;
  `path="coalesced"` counts the fast-path Predict calls it sent to a batching
  replica inside a PredictBatch call (a subset of "fast"), `path="rest"`
  the REST predict calls it answered itself, JSON converted in C++ (a
  subset of "fast" too), `path="framed"` the fast-path calls it sent to a
  replica over its framed socket rather than gRPC (dataplane/frame.h; a
  subset of "fast").

The data plane reports its cumulative figures about once a second, so its
share of a scrape may lag by that much.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from cloudml.internal.v1 import dataplane_pb2

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class _Series:
    __slots__ = ("count", "total", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, the last is +Inf; not cumulative


class ModelRequestMetrics:
    """A Prometheus collector over the gateway's and the data plane's counts."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self._lock = threading.Lock()  # scrapes may come from another thread
        self._local: dict[tuple[str, str, str, str], _Series] = {}
        self._native: dict[tuple[str, str, str, str], _Series] = {}
        self._paths = {"fast": 0, "control": 0, "direct": 0, "coalesced": 0, "rest": 0, "framed": 0}
        if registry is not None:
            registry.register(self)

    def observe(self, model: str, version: str, api: str, code: str, seconds: float) -> None:
        with self._lock:
            series = self._local.get((model, version, api, code))
            if series is None:
                series = self._local[(model, version, api, code)] = _Series()
            series.count += 1
            series.total += seconds
            index = 0
            while index < len(BUCKETS) and seconds > BUCKETS[index]:
                index += 1
            series.buckets[index] += 1

    def set_native(self, report: dataplane_pb2.DataplaneReport) -> None:
        """Replaces the data plane's figures (they are cumulative)."""
        native: dict[tuple[str, str, str, str], _Series] = {}
        for stat in report.stats:
            series = _Series()
            series.count, series.total = stat.count, stat.latency_sum_seconds
            if len(stat.latency_buckets) == len(series.buckets):
                series.buckets = list(stat.latency_buckets)
            native[(stat.model, stat.version, stat.api, stat.code)] = series
        with self._lock:
            self._native = native
            self._paths = {"fast": report.fast_path_calls, "control": report.slow_path_calls,
                           "direct": sum(relay.count for relay in report.relays),
                           "coalesced": report.coalesced_calls, "rest": report.rest_fast_path_calls,
                           "framed": report.framed_calls}

    def snapshot(self, models: set[str]) -> dict[tuple[str, str], dict]:
        """Cumulative figures per (model label, version) of the labels in
        `models`, both processes' together: requests, errors (code != OK),
        seconds (the sum of latencies). For the console's per-version rates."""
        out: dict[tuple[str, str], dict] = {}
        with self._lock:
            for source in (self._local, self._native):
                for (model, version, _api, code), series in source.items():
                    if model not in models:
                        continue
                    figures = out.setdefault((model, version), {"requests": 0, "errors": 0, "seconds": 0.0})
                    figures["requests"] += series.count
                    figures["errors"] += series.count if code != "OK" else 0
                    figures["seconds"] += series.total
        return out

    def describe(self):
        return []  # registered without a trial collect()

    def collect(self):
        requests = CounterMetricFamily("cloudml_gateway_model_requests", "Model API requests through the gateway.",
                                       labels=("model", "version", "api", "code"))
        latency = HistogramMetricFamily("cloudml_gateway_model_request_seconds",
                                        "Latency of model API requests through the gateway.",
                                        labels=("model", "version", "api"))
        paths = CounterMetricFamily("cloudml_gateway_dataplane_calls",
                                    "Model calls the native data plane answered from its decision cache (fast) "
                                    "or sent to the gateway process (control); platform calls it relayed "
                                    "straight to their service (direct); REST predict calls it answered "
                                    "itself, JSON included (rest; also in fast).", labels=("path",))
        with self._lock:
            counts: dict[tuple[str, str, str, str], int] = {}
            histograms: dict[tuple[str, str, str], _Series] = {}
            for source in (self._local, self._native):
                for key, series in source.items():
                    counts[key] = counts.get(key, 0) + series.count
                    merged = histograms.get(key[:3])
                    if merged is None:
                        merged = histograms[key[:3]] = _Series()
                    merged.count += series.count
                    merged.total += series.total
                    merged.buckets = [a + b for a, b in zip(merged.buckets, series.buckets)]
            path_counts = dict(self._paths)
        for key, count in sorted(counts.items()):
            requests.add_metric(key, count)
        for key, series in sorted(histograms.items()):
            cumulative, running = [], 0
            for bound, n in zip((*map(floatToGoString, BUCKETS), "+Inf"), series.buckets):
                running += n
                cumulative.append((bound, running))
            latency.add_metric(key, cumulative, series.total)
        for path, count in path_counts.items():
            paths.add_metric((path,), count)
        yield requests
        yield latency
        yield paths
