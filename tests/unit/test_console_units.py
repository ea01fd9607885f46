"""The console's small pieces, one layer each: the request figures it shows
per model version (never another tenant's), replica names, the CSRF token."""
from types import SimpleNamespace

import pytest

from cloudml.internal.v1 import dataplane_pb2
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from services.gateway.console.api import ConsoleApi, parse_replica, replica_name
from services.gateway.console.app import Refused, csrf_of
from services.gateway.model_metrics import BUCKETS, ModelRequestMetrics


def test_snapshot_adds_both_processes_and_counts_errors():
    metrics = ModelRequestMetrics()
    metrics.observe("linear", "1", "Predict", "OK", 0.002)
    metrics.observe("linear", "1", "Predict", "INVALID_ARGUMENT", 0.001)
    metrics.observe("other", "1", "Predict", "OK", 0.5)
    metrics.set_native(dataplane_pb2.DataplaneReport(stats=[dataplane_pb2.ModelRequestStat(
        model="linear", version="1", api="Predict", code="OK", count=3, latency_sum_seconds=0.003,
        latency_buckets=[3] + [0] * len(BUCKETS))]))
    snapshot = metrics.snapshot({"linear"})
    assert list(snapshot) == [("linear", "1")]
    figures = snapshot[("linear", "1")]
    assert (figures["requests"], figures["errors"]) == (5, 1) and figures["seconds"] == pytest.approx(0.006)


def figures_for(routes, observed, tenant, model):
    metrics = ModelRequestMetrics()
    for label, version in observed:
        metrics.observe(label, version, "Predict", "OK", 0.001)
    router = SimpleNamespace(table=SimpleNamespace(routes={key: None for key in routes}), metrics=metrics)
    api = ConsoleApi(SimpleNamespace(rest=SimpleNamespace(router=router)))
    return api._request_figures(tenant, model)


def test_request_figures_of_a_name_only_this_tenant_uses_include_bare_and_qualified_calls():
    figures = figures_for({("acme", "linear")}, [("linear", "1"), ("acme.linear", "1"), ("linear", "2")],
                          "acme", "linear")
    assert {v: f["requests"] for v, f in figures.items()} == {"1": 2, "2": 1}


def test_request_figures_of_a_shared_name_never_count_another_tenants_calls():
    routes = {("acme", "linear"), ("rival", "linear")}
    observed = [("linear", "1"), ("linear", "1"), ("acme.linear", "1")]
    figures = figures_for(routes, observed, "acme", "linear")
    assert {v: f["requests"] for v, f in figures.items()} == {"1": 1}  # only the qualified (public) call
    assert figures_for(routes, [("linear", "1")], "acme", "linear") is None  # "not shown", not a zero


def test_replica_names_round_trip_and_bad_ones_are_refused():
    assert replica_name(parse_replica("worker-3")) == "worker-3"
    assert parse_replica("master-0") == jobs_pb.ReplicaId(type=jobs_pb.REPLICA_TYPE_MASTER, index=0)
    assert replica_name(jobs_pb.ReplicaId()) == "job"
    for bad in ("worker", "worker-x", "bogus-0", "-1", "worker-99999", "unspecified-0"):
        with pytest.raises(Refused):
            parse_replica(bad)


def test_csrf_token_depends_on_the_session_token_and_reveals_nothing_of_it():
    a, b = csrf_of("token-a"), csrf_of("token-b")
    assert a != b and len(a) == 40 and "token" not in a and csrf_of("token-a") == a
