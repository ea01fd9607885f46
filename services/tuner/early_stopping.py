"""A trial's objective from its metric series, and the median stopping rule.

Pure functions over plain values (unit-tested in
tests/unit/test_tuner_early_stopping.py).

Objective (documented in the proto's `Objective`): the trial job's metric
series of its last attempt, from the coordinating replica (master, chief,
else the first that reported); FINAL takes the value at the highest step
(what the trained model ends with), BEST the best value by the goal (the
earliest step on a tie).

Median stopping rule (Vizier's, as Optuna's MedianPruner): a running trial
whose latest reported step is s (s >= start_step) is stopped when its best
value up to s is worse than the median of the completed (SUCCEEDED) trials'
values at s, provided at least `min_trials` completed trials have a value at
s. A completed trial's value "at s" is the last value it reported at a step
<= s, so trials that report on different step grids still compare.
"""
from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb

Curve = list[tuple[int, float]]  # (step, value), steps ascending and unique

_COORDINATORS = (jobs_pb.REPLICA_TYPE_MASTER, jobs_pb.REPLICA_TYPE_CHIEF)
MAX_CURVE_POINTS = 2000


def curve_of(series: list[jobs_pb.MetricSeries], metric: str) -> Curve:
    """The metric's points of the last attempt, from the coordinating replica,
    as a step-ascending curve (the last value reported for a step wins)."""
    candidates = [s for s in series if s.name == metric and s.points]
    if not candidates:
        return []

    def rank(s: jobs_pb.MetricSeries) -> int:
        if not s.HasField("replica"):
            return 2
        if s.replica.type in _COORDINATORS:
            return 0
        if s.replica.type == jobs_pb.REPLICA_TYPE_WORKER and s.replica.index == 0:
            return 1
        return 3

    chosen = min(candidates, key=rank)
    last_attempt = max(p.attempt for p in chosen.points)
    by_step: dict[int, float] = {}
    for p in chosen.points:
        if p.attempt == last_attempt:
            by_step[p.step] = p.value
    return sorted(by_step.items())


def objective_of(curve: Curve, goal: int, objective: int) -> tuple[float, int] | None:
    """(value, step) of the trial's objective, None without points."""
    if not curve:
        return None
    if objective == pb.OBJECTIVE_BEST:
        pick = max if goal == pb.GOAL_MAXIMIZE else min
        best = pick(v for _, v in curve)
        step = next(s for s, v in curve if v == best)
        return best, step
    step, value = curve[-1]
    return value, step


def downsample(curve: Curve, limit: int = MAX_CURVE_POINTS) -> Curve:
    """At most `limit` points, evenly spread, the first and last kept."""
    if len(curve) <= limit:
        return list(curve)
    stride = (len(curve) - 1) / (limit - 1)
    picked = sorted({round(i * stride) for i in range(limit)})
    return [curve[i] for i in picked]


def value_at(curve: Curve, step: int) -> float | None:
    """The last value reported at a step <= `step`; None before the first."""
    i = bisect.bisect_right([s for s, _ in curve], step)
    return curve[i - 1][1] if i else None


@dataclass
class Verdict:
    stop: bool
    reason: str = ""


def median_rule(goal: int, curve: Curve, completed: list[Curve], min_trials: int, start_step: int) -> Verdict:
    """Should a running trial with `curve` so far stop, given the completed
    trials' curves? (See the module docstring.)"""
    if not curve:
        return Verdict(False)
    step = curve[-1][0]
    if step < start_step:
        return Verdict(False)
    values = [v for v in (value_at(c, step) for c in completed) if v is not None]
    if len(values) < max(min_trials, 1):
        return Verdict(False)
    median = statistics.median(values)
    maximize = goal == pb.GOAL_MAXIMIZE
    best = max(v for _, v in curve) if maximize else min(v for _, v in curve)
    worse = best < median if maximize else best > median
    if not worse:
        return Verdict(False)
    return Verdict(True, f"best {best:.6g} up to step {step} is worse than the median {median:.6g} "
                         f"of {len(values)} completed trials at that step")
