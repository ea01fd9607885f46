"""Suggestion algorithms: Optuna's samplers through ask-and-tell, rebuilt
from recorded state on every call.

A study's sampler lives in etcd, not in a process: after each suggestion the
sampler object (its seeded random state included) is pickled and stored in
the same transaction that records the new trials. To suggest again, the
sampler is unpickled, an in-memory Optuna study is filled with every recorded
trial (`add_trial`: finished ones with their objective, active ones as
RUNNING, each with the `system_attrs` the sampler gave it, which is where
GridSampler and CmaEsSampler keep their own state), and `ask()` is called.

So suggestion is a pure function of what is stored: any tuner process can
serve it, a process killed at any point loses nothing, and after a restart
the suggestions continue exactly where they were, with the same random
stream. With one trial at a time, a study suggests exactly what standalone
Optuna suggests with the same sampler, seed and results (the integration
test compares the two); with several in parallel, the order in which results
arrive decides what the sampler has seen when it is asked, as with any
asynchronous Optuna study.

Mapping of the search space to Optuna distributions:

    double_range LINEAR/LOG   FloatDistribution(min, max, log=...)
    int_range                 IntDistribution(min, max', step), max' the last value reached by step
    categorical               CategoricalDistribution(values)
    discrete                  CategoricalDistribution(values): TPE and random treat the values as
                              unordered choices; CMA-ES samples them with its independent sampler

Trial states map to Optuna's: SUCCEEDED with an objective -> COMPLETE;
EARLY_STOPPED -> PRUNED (its last value as an intermediate value, as Optuna's
pruners leave it); FAILED, CANCELLED, or SUCCEEDED without a value -> FAIL;
PENDING and RUNNING -> RUNNING (TPE's constant liar and the grid see them).
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.tuner import spec as spec_mod

log = logging.getLogger(__name__)


@dataclass
class Observation:
    """What the algorithm knows about one existing trial."""

    number: int
    params: dict
    state: int
    value: float | None = None
    step: int = 0
    system_attrs: dict = field(default_factory=dict)


@dataclass
class Suggestion:
    params: dict
    system_attrs: dict = field(default_factory=dict)


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; the service logs its own."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def distributions(spec: pb.StudySpec) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for p in spec.parameters:
        kind = p.WhichOneof("domain")
        if kind == "double_range":
            r = p.double_range
            out[p.name] = FloatDistribution(r.min, r.max, log=r.scale == pb.SCALE_LOG)
        elif kind == "int_range":
            r = p.int_range
            step = r.step or 1
            high = r.min + (r.max - r.min) // step * step
            out[p.name] = IntDistribution(r.min, high, step=step)
        elif kind == "categorical":
            out[p.name] = CategoricalDistribution(list(p.categorical.values))
        elif kind == "discrete":
            out[p.name] = CategoricalDistribution(list(p.discrete.values))
    return out


def make_sampler(spec: pb.StudySpec):
    """A new sampler of the study's algorithm, seeded with its seed."""
    import optuna

    seed = spec.seed
    algorithm = spec.algorithm
    if algorithm == pb.ALGORITHM_GRID:
        return optuna.samplers.GridSampler(spec_mod.grid_of(spec), seed=seed)
    if algorithm == pb.ALGORITHM_RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == pb.ALGORITHM_TPE:
        return optuna.samplers.TPESampler(seed=seed)
    if algorithm == pb.ALGORITHM_CMAES:
        return optuna.samplers.CmaEsSampler(seed=seed, independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                            warn_independent_sampling=False)
    raise ValueError(f"algorithm {algorithm} has no sampler")


def _frozen(obs: Observation, dists: dict):
    from optuna.trial import TrialState, create_trial

    params = {k: v for k, v in obs.params.items() if k in dists}
    kwargs = dict(params=params, distributions={k: dists[k] for k in params}, system_attrs=obs.system_attrs)
    if obs.state == pb.TRIAL_STATE_SUCCEEDED and obs.value is not None:
        return create_trial(state=TrialState.COMPLETE, value=obs.value, **kwargs)
    if obs.state == pb.TRIAL_STATE_EARLY_STOPPED:
        inter = {obs.step: obs.value} if obs.value is not None else None
        return create_trial(state=TrialState.PRUNED, intermediate_values=inter, **kwargs)
    if obs.state in (pb.TRIAL_STATE_PENDING, pb.TRIAL_STATE_RUNNING):
        return create_trial(state=TrialState.RUNNING, **kwargs)
    return create_trial(state=TrialState.FAIL, **kwargs)


def suggest(spec: pb.StudySpec, observations: list[Observation], state: bytes | None,
            count: int) -> tuple[list[Suggestion], bytes | None]:
    """Up to `count` new parameter sets for trials numbered after the
    observations, and the sampler state to store with them. Fewer come back
    when the explicit list or the grid is used up."""
    observations = sorted(observations, key=lambda o: o.number)
    next_number = (observations[-1].number if observations else 0) + 1
    if spec.algorithm == pb.ALGORITHM_EXPLICIT:
        out = []
        for number in range(next_number, min(next_number + count, len(spec.params) + 1)):
            values = spec.params[number - 1].values
            out.append(Suggestion({k: spec_mod.value_of(values[k]) for k in sorted(values)}))
        return out, None

    import optuna

    sampler = pickle.loads(state) if state else make_sampler(spec)
    dists = distributions(spec)
    direction = "maximize" if spec.goal == pb.GOAL_MAXIMIZE else "minimize"
    study = optuna.create_study(direction=direction, sampler=sampler)
    study.add_trials([_frozen(o, dists) for o in observations])
    out = []
    limit = spec_mod.grid_size(spec) if spec.algorithm == pb.ALGORITHM_GRID else None
    for _ in range(count):
        if limit is not None and len(study.trials) >= limit:
            break  # every grid point has a trial
        trial = study.ask(fixed_distributions=dists)
        attrs = dict(study._storage.get_trial(trial._trial_id).system_attrs)
        out.append(Suggestion({k: _plain(trial.params[k]) for k in dists}, attrs))
    return out, pickle.dumps(sampler)


def _plain(value):
    """Optuna may hand back NumPy scalars; store plain Python values."""
    return value.item() if hasattr(value, "item") else value


def observation_of(trial: pb.Trial, system_attrs: dict | None = None) -> Observation:
    return Observation(
        number=trial.number,
        params={k: spec_mod.value_of(v) for k, v in trial.params.items()},
        state=trial.state,
        value=trial.objective_value if trial.HasField("objective_value") else None,
        step=trial.objective_step,
        system_attrs=dict(system_attrs or {}),
    )
