"""Objectives from metric series and the median stopping rule, on plain values."""
from __future__ import annotations

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.tuner.early_stopping import curve_of, downsample, median_rule, objective_of, value_at

MIN, MAX = pb.GOAL_MINIMIZE, pb.GOAL_MAXIMIZE


def series(name, points, replica=(jobs_pb.REPLICA_TYPE_MASTER, 0)):
    s = jobs_pb.MetricSeries(name=name, source=jobs_pb.METRIC_SOURCE_REPORTED)
    if replica:
        s.replica.type, s.replica.index = replica
    for step, value, attempt in points:
        s.points.add(step=step, value=value, attempt=attempt)
    return s


def test_curve_takes_the_last_attempt_of_the_coordinator():
    worker = series("loss", [(0, 9.0, 1), (1, 8.0, 1)], replica=(jobs_pb.REPLICA_TYPE_WORKER, 1))
    master = series("loss", [(0, 5.0, 1), (1, 4.0, 1), (2, 3.0, 1), (0, 2.0, 2), (1, 1.0, 2)])
    assert curve_of([worker, master], "loss") == [(0, 2.0), (1, 1.0)]
    assert curve_of([worker], "loss") == [(0, 9.0), (1, 8.0)]
    assert curve_of([series("acc", [(0, 1.0, 1)])], "loss") == []


def test_objective_final_or_best():
    curve = [(0, 3.0), (1, 1.0), (2, 2.0)]
    assert objective_of(curve, MIN, pb.OBJECTIVE_FINAL) == (2.0, 2)
    assert objective_of(curve, MIN, pb.OBJECTIVE_UNSPECIFIED) == (2.0, 2)
    assert objective_of(curve, MIN, pb.OBJECTIVE_BEST) == (1.0, 1)
    assert objective_of(curve, MAX, pb.OBJECTIVE_BEST) == (3.0, 0)
    assert objective_of([], MIN, pb.OBJECTIVE_FINAL) is None


def test_value_at_uses_the_last_report_up_to_the_step():
    curve = [(0, 5.0), (10, 3.0), (20, 1.0)]
    assert value_at(curve, 15) == 3.0 and value_at(curve, 20) == 1.0 and value_at(curve, 99) == 1.0
    assert value_at([(5, 1.0)], 2) is None


def completed():
    return [[(s, 1.0 + 1.0 / (s + 1)) for s in range(10)] for _ in range(3)] + [[(s, 0.5) for s in range(10)]]


def test_median_rule_stops_a_clearly_worse_trial():
    verdict = median_rule(MIN, [(0, 50.0), (1, 40.0), (2, 30.0)], completed(), min_trials=3, start_step=0)
    assert verdict.stop and "median" in verdict.reason and "step 2" in verdict.reason


def test_median_rule_keeps_good_trials_and_uses_the_best_so_far():
    assert not median_rule(MIN, [(0, 0.9), (1, 0.8)], completed(), 3, 0).stop
    # worse now, but its best up to this step beats the median
    assert not median_rule(MIN, [(0, 0.2), (1, 9.0)], completed(), 3, 0).stop


def test_median_rule_waits_for_min_trials_and_start_step():
    bad = [(0, 50.0), (1, 40.0)]
    assert not median_rule(MIN, bad, completed()[:2], 3, 0).stop
    assert not median_rule(MIN, bad, completed(), 3, start_step=5).stop
    assert not median_rule(MIN, [], completed(), 3, 0).stop
    # completed trials without a value at or before the step do not count
    late = [[(s, 1.0) for s in range(5, 10)] for _ in range(4)]
    assert not median_rule(MIN, bad, late, 3, 0).stop


def test_median_rule_maximize():
    done = [[(0, 0.9), (1, 0.95)] for _ in range(5)]
    assert median_rule(MAX, [(0, 0.1), (1, 0.2)], done, 5, 0).stop
    assert not median_rule(MAX, [(0, 0.1), (1, 0.97)], done, 5, 0).stop


def test_downsample_keeps_ends():
    curve = [(s, float(s)) for s in range(10_000)]
    small = downsample(curve, 100)
    assert len(small) == 100 and small[0] == (0, 0.0) and small[-1] == (9999, 9999.0)
    assert downsample(curve[:5], 100) == curve[:5]
