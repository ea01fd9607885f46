"""Suggestion algorithms (services.tuner.algorithms) on plain values: no
services, no etcd. The sampler state is carried between calls exactly as the
service stores it (pickled bytes), so every test here is also a restart test:
each call rebuilds the sampler from bytes and recorded observations."""
from __future__ import annotations

import math
import pickle

import optuna
import pytest

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.tuner import algorithms
from services.tuner import spec as spec_mod
from services.tuner.algorithms import Observation

optuna.logging.set_verbosity(optuna.logging.WARNING)


def branin(x1: float, x2: float) -> float:
    b, c = 5.1 / (4 * math.pi**2), 5.0 / math.pi
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


def space_spec(algorithm, *parameters, seed=11, **fields) -> pb.StudySpec:
    spec = pb.StudySpec(goal=pb.GOAL_MINIMIZE, metric="objective", algorithm=algorithm, seed=seed,
                        parameters=list(parameters), max_trials=fields.pop("max_trials", 50), **fields)
    spec.trial_template.module_name = "t"
    return spec_mod.normalize(spec)


X1 = pb.ParameterSpec(name="x1", double_range=pb.DoubleRange(min=-5, max=10))
X2 = pb.ParameterSpec(name="x2", double_range=pb.DoubleRange(min=0, max=15))


def run(spec, n: int, objective, *, fail=()):
    """Sequential ask/record loop through `algorithms.suggest`, as the service does."""
    state, obs = None, []
    for number in range(1, n + 1):
        out, state = algorithms.suggest(spec, obs, state, 1)
        if not out:
            break
        s = out[0]
        if number in fail:
            obs.append(Observation(number, s.params, pb.TRIAL_STATE_FAILED, system_attrs=s.system_attrs))
        else:
            obs.append(Observation(number, s.params, pb.TRIAL_STATE_SUCCEEDED, objective(**s.params),
                                   system_attrs=s.system_attrs))
    return obs, state


def test_tpe_matches_standalone_optuna_with_the_same_seed():
    spec = space_spec(pb.ALGORITHM_TPE, X1, X2, seed=5)
    obs, _ = run(spec, 25, branin)
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5))
    reference.optimize(lambda t: branin(t.suggest_float("x1", -5, 10), t.suggest_float("x2", 0, 15)), n_trials=25)
    assert [o.params for o in obs] == [t.params for t in reference.trials]
    assert min(o.value for o in obs) == reference.best_value


@pytest.mark.parametrize("algorithm", [pb.ALGORITHM_TPE, pb.ALGORITHM_RANDOM, pb.ALGORITHM_CMAES])
def test_suggestions_are_a_function_of_seed_and_recorded_results(algorithm):
    spec = space_spec(algorithm, X1, X2, seed=9)
    first, state = run(spec, 12, branin)
    again, state2 = run(spec, 12, branin)
    assert [o.params for o in first] == [o.params for o in again]
    # Resuming from the stored state (a restarted service) suggests the same
    # next trial as the uninterrupted run, twice over (nothing is consumed).
    a, _ = algorithms.suggest(spec, first, state, 1)
    b, _ = algorithms.suggest(spec, first, state2, 1)
    assert a[0].params == b[0].params
    other = space_spec(algorithm, X1, X2, seed=10)
    assert [o.params for o in run(other, 12, branin)[0]] != [o.params for o in first]


def test_cmaes_matches_standalone_optuna():
    spec = space_spec(pb.ALGORITHM_CMAES, X1, X2, seed=3)
    obs, _ = run(spec, 15, branin)
    sampler = optuna.samplers.CmaEsSampler(seed=3, independent_sampler=optuna.samplers.RandomSampler(seed=3),
                                           warn_independent_sampling=False)
    reference = optuna.create_study(sampler=sampler)
    reference.optimize(lambda t: branin(t.suggest_float("x1", -5, 10), t.suggest_float("x2", 0, 15)), n_trials=15)
    assert [o.params for o in obs] == [t.params for t in reference.trials]


def test_grid_runs_every_combination_once_even_with_failures():
    spec = space_spec(pb.ALGORITHM_GRID,
                      pb.ParameterSpec(name="optimizer", categorical=pb.CategoricalValues(values=["ftrl", "sgd"])),
                      pb.ParameterSpec(name="learning_rate", discrete=pb.DiscreteValues(values=[0.1, 0.5])),
                      pb.ParameterSpec(name="batch", int_range=pb.IntRange(min=16, max=40, step=16)),
                      max_trials=0, seed=4)
    assert spec.max_trials == 8
    obs, state = run(spec, 20, lambda optimizer, learning_rate, batch: learning_rate + batch, fail={2, 5})
    combos = {(o.params["optimizer"], o.params["learning_rate"], o.params["batch"]) for o in obs}
    assert len(obs) == 8 and len(combos) == 8
    assert {o.params["batch"] for o in obs} == {16, 32}
    assert algorithms.suggest(spec, obs, state, 1)[0] == []  # used up
    again, _ = run(spec, 8, lambda optimizer, learning_rate, batch: 0.0)
    assert [o.params for o in again] == [o.params for o in obs]  # the seed fixes the order


def test_grid_never_repeats_a_point_of_a_running_trial():
    spec = space_spec(pb.ALGORITHM_GRID,
                      pb.ParameterSpec(name="o", categorical=pb.CategoricalValues(values=["a", "b", "c"])),
                      max_trials=0)
    out, state = algorithms.suggest(spec, [], None, 2)
    pending = [Observation(i + 1, s.params, pb.TRIAL_STATE_RUNNING, system_attrs=s.system_attrs)
               for i, s in enumerate(out)]
    more, _ = algorithms.suggest(spec, pending, state, 3)
    assert len(more) == 1
    assert sorted(s.params["o"] for s in out + more) == ["a", "b", "c"]


def test_explicit_runs_each_set_once_in_order():
    spec = pb.StudySpec(goal=pb.GOAL_MAXIMIZE, metric="acc")
    spec.trial_template.module_name = "t"
    for optimizer, lr in (("ftrl", 0.1), ("sgd", 0.5), ("adam", 1)):
        ps = spec.params.add()
        ps.values["optimizer"].string_value = optimizer
        ps.values["learning_rate"].CopyFrom(spec_mod.to_value(lr))
    spec = spec_mod.normalize(spec)
    out, state = algorithms.suggest(spec, [], None, 2)
    assert [s.params for s in out] == [{"learning_rate": 0.1, "optimizer": "ftrl"},
                                       {"learning_rate": 0.5, "optimizer": "sgd"}]
    obs = [Observation(i + 1, s.params, pb.TRIAL_STATE_SUCCEEDED, 1.0) for i, s in enumerate(out)]
    rest, _ = algorithms.suggest(spec, obs, state, 5)
    assert [s.params for s in rest] == [{"learning_rate": 1, "optimizer": "adam"}]


def test_parallel_suggestions_differ_and_respect_the_space():
    lr = pb.ParameterSpec(name="lr", double_range=pb.DoubleRange(min=1e-5, max=1e-1, scale=pb.SCALE_LOG))
    n = pb.ParameterSpec(name="units", int_range=pb.IntRange(min=8, max=100, step=8))
    for algorithm in (pb.ALGORITHM_RANDOM, pb.ALGORITHM_TPE, pb.ALGORITHM_CMAES):
        spec = space_spec(algorithm, lr, n)
        out, _ = algorithms.suggest(spec, [], None, 4)
        assert len(out) == 4 and len({tuple(sorted(s.params.items())) for s in out}) == 4
        for s in out:
            assert 1e-5 <= s.params["lr"] <= 1e-1 and isinstance(s.params["units"], int)
            assert s.params["units"] % 8 == 0 and 8 <= s.params["units"] <= 96


def test_early_stopped_and_failed_trials_feed_the_sampler():
    spec = space_spec(pb.ALGORITHM_TPE, X1, X2, seed=2)
    obs, state = run(spec, 12, branin)
    obs[3] = Observation(4, obs[3].params, pb.TRIAL_STATE_EARLY_STOPPED, 50.0, step=3)
    obs[4] = Observation(5, obs[4].params, pb.TRIAL_STATE_CANCELLED)
    out, _ = algorithms.suggest(spec, obs, state, 1)
    assert -5 <= out[0].params["x1"] <= 10


# --- the live study (LiveStudies) against a rebuild from the records -----------------------

LR = pb.ParameterSpec(name="lr", double_range=pb.DoubleRange(min=1e-5, max=1e-1, scale=pb.SCALE_LOG))
UNITS = pb.ParameterSpec(name="units", int_range=pb.IntRange(min=8, max=100, step=8))
OPT = pb.ParameterSpec(name="opt", categorical=pb.CategoricalValues(values=["sgd", "adam", "ftrl"]))


def _ended(obs: Observation, rng) -> Observation:
    """`obs` (active) ended one of the ways a trial ends."""
    value = float(obs.number % 7) + rng.random()
    kind = rng.choice(["ok", "ok", "ok", "no-value", "stopped", "stopped-no-value", "failed", "cancelled"])
    base = dict(number=obs.number, params=obs.params, system_attrs=obs.system_attrs)
    if kind == "ok":
        return Observation(state=pb.TRIAL_STATE_SUCCEEDED, value=value, **base)
    if kind == "no-value":
        return Observation(state=pb.TRIAL_STATE_SUCCEEDED, **base)
    if kind == "stopped":
        return Observation(state=pb.TRIAL_STATE_EARLY_STOPPED, value=value, step=rng.randint(1, 9), **base)
    if kind == "stopped-no-value":
        return Observation(state=pb.TRIAL_STATE_EARLY_STOPPED, **base)
    return Observation(state=pb.TRIAL_STATE_FAILED if kind == "failed" else pb.TRIAL_STATE_CANCELLED, **base)


@pytest.mark.parametrize("algorithm,parameters", [
    (pb.ALGORITHM_TPE, (LR, UNITS, OPT)), (pb.ALGORITHM_RANDOM, (LR, UNITS, OPT)),
    (pb.ALGORITHM_CMAES, (X1, X2, UNITS)),
    (pb.ALGORITHM_GRID, (OPT, pb.ParameterSpec(name="units", int_range=pb.IntRange(min=8, max=96, step=8)))),
])
def test_a_live_study_suggests_exactly_what_a_rebuild_from_the_records_suggests(algorithm, parameters):
    """Several trials in parallel, ending in every way, 1 to 3 asked at a
    time: the study kept in memory (told only what ended) and a study
    rebuilt from the records with the stored sampler state give the same
    parameters, the same sampler attrs and the same state to store."""
    import random

    rng = random.Random(algorithm)
    spec = space_spec(algorithm, *parameters, seed=21, max_trials=0 if algorithm == pb.ALGORITHM_GRID else 40)
    live = algorithms.LiveStudies()
    obs, state = [], None
    for _ in range(25):
        obs = [_ended(o, rng) if o.state == pb.TRIAL_STATE_RUNNING and rng.random() < 0.6 else o for o in obs]
        count = rng.randint(1, 3)
        expected, expected_state = algorithms.suggest(spec, obs, state, count)
        got, state = live.suggest(("t", "s"), spec, list(reversed(obs)), state, count)
        assert [(s.params, s.system_attrs) for s in got] == [(s.params, s.system_attrs) for s in expected]
        assert pickle.loads(state).__class__ is pickle.loads(expected_state).__class__
        if not got:
            break
        obs += [Observation(len(obs) + i + 1, s.params, pb.TRIAL_STATE_PENDING, system_attrs=s.system_attrs)
                for i, s in enumerate(got)]
    assert live.rebuilds == 1  # built once, then only told what ended
    # The next suggestion's random stream is the stored one: a new process
    # (nothing in memory) suggests the same.
    assert algorithms.suggest(spec, obs, state, 1)[0] == live.suggest(("t", "s"), spec, obs, state, 1)[0]


def test_a_live_study_rebuilds_when_the_records_are_not_what_it_saw():
    spec = space_spec(pb.ALGORITHM_TPE, X1, X2, seed=8)
    live = algorithms.LiveStudies()
    obs, state = run(spec, 6, branin)

    def check(observations, stored):
        """(studies built, suggestion recorded as RUNNING + observations, state)"""
        before = live.rebuilds
        got = live.suggest("k", spec, observations, stored, 1)
        assert got == algorithms.suggest(spec, observations, stored, 1)
        (s,), new_state = got
        new = Observation(len(observations) + 1, s.params, pb.TRIAL_STATE_RUNNING, system_attrs=s.system_attrs)
        return live.rebuilds - before, observations + [new], new_state

    assert check(obs, state)[0] == 1  # first use
    # Its suggestion was never recorded (a lost race): the stored state is the old one.
    assert check(obs, state)[0] == 1
    # Recorded: kept.
    built, seven, state7 = check(obs, state)
    assert built == 1
    built, eight, state8 = check(seven, state7)
    assert built == 0
    # Another process suggested two trials from the same records meanwhile.
    (a, b), other = algorithms.suggest(spec, seven, state7, 2)
    nine = seven + [Observation(8, a.params, pb.TRIAL_STATE_RUNNING, system_attrs=a.system_attrs),
                    Observation(9, b.params, pb.TRIAL_STATE_RUNNING, system_attrs=b.system_attrs)]
    built, ten, state10 = check(nine, other)
    assert built == 1
    # A final trial's outcome changed, or a trial vanished: not this study's history.
    changed = list(ten)
    changed[0] = Observation(1, ten[0].params, pb.TRIAL_STATE_SUCCEEDED, ten[0].value + 1)
    assert check(changed, state10)[0] == 1
    built, eleven, state11 = check(ten, state10)
    assert built == 1
    assert check(eleven[1:], state11)[0] == 1
    # Running trials that ended since: told, not rebuilt.
    built, eleven, state11 = check(ten, state10)
    ended = [Observation(o.number, o.params, pb.TRIAL_STATE_SUCCEEDED, branin(**o.params),
                         system_attrs=o.system_attrs) if o.state == pb.TRIAL_STATE_RUNNING else o for o in eleven]
    assert check(ended, state11)[0] == 0


def test_live_studies_keep_the_latest_used_up_to_their_capacity():
    spec = space_spec(pb.ALGORITHM_RANDOM, X1, seed=1)
    live = algorithms.LiveStudies(capacity=2)
    states = {}
    for key in ("a", "b", "c"):
        states[key] = live.suggest(key, spec, [], None, 1)
    assert list(live._live) == ["b", "c"]
