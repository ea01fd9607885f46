"""The gateway's per-model metrics merge its own counts with the data plane's reports."""
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cloudml.internal.v1 import dataplane_pb2
from services.gateway.model_metrics import BUCKETS, ModelRequestMetrics


def sample(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"{name}{labels} not in\n{text}")


def test_local_and_native_counts_add_up():
    registry = CollectorRegistry()
    metrics = ModelRequestMetrics(registry)
    metrics.observe("linear", "1", "Predict", "OK", 0.0007)
    metrics.observe("linear", "1", "Predict", "NOT_FOUND", 0.0001)
    native = [0] * (len(BUCKETS) + 1)
    native[0], native[-1] = 3, 1  # three under 0.5 ms, one over 10 s
    metrics.set_native(dataplane_pb2.DataplaneReport(
        fast_path_calls=4, slow_path_calls=2, stats=[dataplane_pb2.ModelRequestStat(
            model="linear", version="1", api="Predict", code="OK", count=4, latency_sum_seconds=12.0,
            latency_buckets=native)]))
    text = generate_latest(registry).decode()
    common = {"model": "linear", "version": "1", "api": "Predict"}
    assert sample(text, "cloudml_gateway_model_requests_total", code="OK", **common) == 5
    assert sample(text, "cloudml_gateway_model_requests_total", code="NOT_FOUND", **common) == 1
    assert sample(text, "cloudml_gateway_model_request_seconds_count", **common) == 6
    assert sample(text, "cloudml_gateway_model_request_seconds_sum", **common) == 12.0008
    assert sample(text, "cloudml_gateway_model_request_seconds_bucket", le="0.0005", **common) == 4
    assert sample(text, "cloudml_gateway_model_request_seconds_bucket", le="0.001", **common) == 5
    assert sample(text, "cloudml_gateway_model_request_seconds_bucket", le="10.0", **common) == 5
    assert sample(text, "cloudml_gateway_model_request_seconds_bucket", le="+Inf", **common) == 6
    assert sample(text, "cloudml_gateway_dataplane_calls_total", path="fast") == 4
    assert sample(text, "cloudml_gateway_dataplane_calls_total", path="control") == 2


def test_a_new_report_replaces_the_last():
    registry = CollectorRegistry()
    metrics = ModelRequestMetrics(registry)
    for count in (5, 7):
        metrics.set_native(dataplane_pb2.DataplaneReport(stats=[dataplane_pb2.ModelRequestStat(
            model="m", version="2", api="Classify", code="OK", count=count,
            latency_buckets=[count] + [0] * len(BUCKETS))]))
    text = generate_latest(registry).decode()
    assert sample(text, "cloudml_gateway_model_requests_total", model="m", version="2", api="Classify", code="OK") == 7
