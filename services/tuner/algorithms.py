"""Suggestion algorithms: Optuna's samplers through ask-and-tell, as a pure
function of recorded state.

A study's sampler lives in etcd, not in a process: after each suggestion the
sampler object (its seeded random state included) is pickled and stored in
the same transaction that records the new trials. To suggest, the sampler is
unpickled, an in-memory Optuna study is filled with every recorded
trial (`add_trial`: finished ones with their objective, active ones as
RUNNING, each with the `system_attrs` the sampler gave it, which is where
GridSampler and CmaEsSampler keep their own state), and `ask()` is called.
The service keeps that study in memory between suggestions (`LiveStudies`):
as long as the records are what it saw at its latest suggestion plus trials
that ended since, it is told only those, which is exactly the study a rebuild
would make; anything else rebuilds it.

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
import threading
from collections import OrderedDict
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


_quiet = False


def optuna_module():
    """Optuna, imported on first use: ~20 MB a tuner with no study to suggest
    for never loads. Quiet from then on (it logs every trial at INFO; the
    service logs its own)."""
    global _quiet
    import optuna

    if not _quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        _quiet = True
    return optuna


def quiet_optuna() -> None:
    optuna_module()


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
    optuna = optuna_module()

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
    when the explicit list or the grid is used up. Rebuilds the sampler's
    study from the observations (`LiveStudies.suggest` keeps it between calls
    and suggests exactly the same)."""
    if spec.algorithm == pb.ALGORITHM_EXPLICIT:
        return _explicit(spec, observations, count), None
    return LiveStudy(spec, sorted(observations, key=lambda o: o.number), state).ask(count)


def _explicit(spec: pb.StudySpec, observations: list[Observation], count: int) -> list[Suggestion]:
    next_number = max((o.number for o in observations), default=0) + 1
    out = []
    for number in range(next_number, min(next_number + count, len(spec.params) + 1)):
        values = spec.params[number - 1].values
        out.append(Suggestion({k: spec_mod.value_of(values[k]) for k in sorted(values)}))
    return out


def _fingerprint(obs: Observation) -> tuple:
    """What the sampler sees of a trial's outcome (as `_frozen` maps it)."""
    if obs.state == pb.TRIAL_STATE_SUCCEEDED and obs.value is not None:
        return ("COMPLETE", obs.value)
    if obs.state == pb.TRIAL_STATE_EARLY_STOPPED:
        return ("PRUNED", obs.step, obs.value) if obs.value is not None else ("PRUNED",)
    if obs.state in (pb.TRIAL_STATE_PENDING, pb.TRIAL_STATE_RUNNING):
        return _RUNNING
    return ("FAIL",)


_RUNNING = ("RUNNING",)


class LiveStudy:
    """A study's sampler with its in-memory Optuna study, fed incrementally.

    Built from the stored sampler state and the recorded trials exactly as a
    fresh suggestion builds them; afterwards `update` only tells it what
    changed (a RUNNING trial that ended), and `ask` adds the new trials the
    way `study.ask` does. The Optuna study then holds the same trials in the
    same order, states, values and system_attrs as a rebuild from the same
    records would, and the sampler is the very object whose pickle was
    stored, so the next suggestion is the same either way (a test compares
    the two). Anything it cannot explain as such an update (a trial it does
    not know, a final trial that changed, another sampler state stored)
    makes `update` refuse, and the caller rebuilds."""

    def __init__(self, spec: pb.StudySpec, observations: list[Observation], state: bytes | None):
        """`observations` sorted by number."""
        optuna = optuna_module()

        self.spec = spec
        self.dists = distributions(spec)
        self.sampler = pickle.loads(state) if state else make_sampler(spec)
        direction = "maximize" if spec.goal == pb.GOAL_MAXIMIZE else "minimize"
        self.study = optuna.create_study(direction=direction, sampler=self.sampler)
        self.study.add_trials([_frozen(o, self.dists) for o in observations])
        storage, study_id = self.study._storage, self.study._study_id
        trials = storage.get_all_trials(study_id, deepcopy=False)
        #: trial number (the service's) -> (Optuna trial id, fingerprint)
        self.trials = {o.number: (t._trial_id, _fingerprint(o)) for o, t in zip(observations, trials)}
        self.last = observations[-1].number if observations else 0
        #: the sampler state stored after this object's latest suggestion (None before one)
        self.state: bytes | None = None
        self.grid_size = spec_mod.grid_size(spec) if spec.algorithm == pb.ALGORITHM_GRID else None

    def update(self, spec: pb.StudySpec, observations: list[Observation], state: bytes | None) -> bool:
        """Brings the study up to `observations` (what is recorded now) if it
        is the same study since this object's latest suggestion: same spec,
        `state` the sampler state it stored, the same trials, only RUNNING ones
        ended. False (and nothing changed) otherwise."""
        if state is None or state != self.state or len(observations) != len(self.trials) or spec != self.spec:
            return False
        ended = []
        for obs in observations:
            known = self.trials.get(obs.number)
            if known is None:
                return False
            fingerprint = _fingerprint(obs)
            if fingerprint != known[1]:
                if known[1] != _RUNNING:
                    return False  # a final trial does not change
                ended.append((obs, fingerprint))
        if ended:
            from optuna.trial import TrialState

            storage = self.study._storage
            for obs, fingerprint in ended:
                trial_id = self.trials[obs.number][0]
                if fingerprint[0] == "COMPLETE":
                    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [obs.value])
                elif fingerprint[0] == "PRUNED":
                    if obs.value is not None:
                        storage.set_trial_intermediate_value(trial_id, obs.step, obs.value)
                    storage.set_trial_state_values(trial_id, TrialState.PRUNED)
                else:
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)
                self.trials[obs.number] = (trial_id, fingerprint)
        return True

    def ask(self, count: int) -> tuple[list[Suggestion], bytes]:
        """Up to `count` suggestions (fewer once the grid is used up) for the
        trials after the last, and the sampler state to store with them."""
        study, storage = self.study, self.study._storage
        out = []
        for _ in range(count):
            if self.grid_size is not None and len(self.trials) >= self.grid_size:
                break  # every grid point has a trial
            trial = study.ask(fixed_distributions=self.dists)
            attrs = dict(storage.get_trial(trial._trial_id).system_attrs)
            params = trial.params  # a deep copy each time it is read
            out.append(Suggestion({k: _plain(params[k]) for k in self.dists}, attrs))
            self.last += 1
            self.trials[self.last] = (trial._trial_id, _RUNNING)
        self.state = pickle.dumps(self.sampler)
        return out, self.state


class LiveStudies:
    """The `LiveStudy` of each study that suggested lately in this process
    (at most `capacity`, least recently used dropped), keyed by whatever names
    a study (tenant, name). A live study is only used when `LiveStudy.update`
    vouches that the records are what it last saw plus ended trials; after a
    restart, another process's suggestion, a lost race or anything else it is
    rebuilt from the records, so suggestions are the same as `suggest`'s."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._live: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.rebuilds = 0  # how often a study was (re)built: tests and benchmarks read it

    def suggest(self, key, spec: pb.StudySpec, observations: list[Observation], state: bytes | None,
                count: int) -> tuple[list[Suggestion], bytes | None]:
        """As `suggest`. Called from worker threads; two calls for one key at
        once each get their own study (the second builds one)."""
        if spec.algorithm == pb.ALGORITHM_EXPLICIT:
            return _explicit(spec, observations, count), None
        with self._lock:
            live = self._live.pop(key, None)  # in use: no one else may touch it
        observations = sorted(observations, key=lambda o: o.number)
        if live is None or not live.update(spec, observations, state):
            live = LiveStudy(spec, observations, state)
            self.rebuilds += 1
        out, new_state = live.ask(count)
        with self._lock:
            self._live[key] = live
            self._live.move_to_end(key)
            while len(self._live) > self.capacity:
                self._live.popitem(last=False)
        return out, new_state


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
