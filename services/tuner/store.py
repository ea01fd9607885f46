"""The tuner service's etcd layout (everything under /cloudml/tuner/).

    studies/<tenant>/<study>             StudyRecord (JSON: the Study message + bookkeeping)
    trials/<tenant>/<study>/<nnnnn>      TrialRecord (JSON: the Trial message + sampler attrs, stop flag)
    jobspecs/<tenant>/<study>/<nnnnn>    cloudml.jobs.v1.TrainJobSpec the trial's job is submitted with
    algorithm/<tenant>/<study>           the study's sampler, pickled after its latest suggestion
    curves/<tenant>/<study>/<nnnnn>      JSON [[step, value], ...] of a SUCCEEDED trial's metric
    election/<lease>                     the driver's leader election

Invariants, kept by writing related keys in one transaction:

- A trial, its job spec, the sampler state after suggesting it and the
  study's trial counts change together (SuggestTrials), so after any crash the
  sampler state matches exactly the trials that exist.
- A trial's state and the study's trial counts and best trial change together
  (`TunerStore.update_trial`), so the summary always equals the trials.
"""
from __future__ import annotations

import base64
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.common import errors
from services.common.etcd import (KV, Etcd, cmp_absent, cmp_mod_revision, op_delete, op_delete_prefix, op_get,
                                  op_get_prefix, op_put)

PREFIX = "/cloudml/tuner/"
STUDIES = PREFIX + "studies/"
TRIALS = PREFIX + "trials/"
JOBSPECS = PREFIX + "jobspecs/"
ALGORITHM = PREFIX + "algorithm/"
CURVES = PREFIX + "curves/"
ELECTION = PREFIX + "election/"


def study_key(tenant: str, study: str) -> str:
    return f"{STUDIES}{tenant}/{study}"


def studies_prefix(tenant: str = "") -> str:
    return f"{STUDIES}{tenant}/" if tenant else STUDIES


def trials_prefix(tenant: str, study: str) -> str:
    return f"{TRIALS}{tenant}/{study}/"


def trial_key(tenant: str, study: str, number: int) -> str:
    return f"{trials_prefix(tenant, study)}{number:05d}"


def jobspec_key(tenant: str, study: str, number: int) -> str:
    return f"{JOBSPECS}{tenant}/{study}/{number:05d}"


def algorithm_key(tenant: str, study: str) -> str:
    return f"{ALGORITHM}{tenant}/{study}"


def curves_prefix(tenant: str, study: str) -> str:
    return f"{CURVES}{tenant}/{study}/"


def curve_key(tenant: str, study: str, number: int) -> str:
    return f"{curves_prefix(tenant, study)}{number:05d}"


def _b64(message) -> str:
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode()


def _unb64(cls, text: str):
    return cls.FromString(base64.b64decode(text))


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


@dataclass
class StudyRecord:
    study: pb.Study
    #: the trials' jobs get CLOUDML_STUDY_NAME / CLOUDML_TRIAL_NUMBER in their env
    #: (False when the jobs service refused those keys at creation)
    trial_env: bool = True
    #: the `studies` quota reservation has been returned (final studies)
    released: bool = False
    mod_revision: int = 0

    def encode(self) -> bytes:
        return json.dumps({"study": _b64(self.study), "trial_env": self.trial_env,
                           "released": self.released}, sort_keys=True).encode()

    @classmethod
    def decode(cls, kv: KV) -> "StudyRecord":
        data = json.loads(kv.value)
        return cls(_unb64(pb.Study, data["study"]), data.get("trial_env", True), data.get("released", False),
                   kv.mod_revision)


@dataclass
class TrialRecord:
    trial: pb.Trial
    #: what the sampler recorded on the trial (Optuna system_attrs: grid ids,
    #: CMA-ES state), given back when the sampler's study is rebuilt
    system_attrs: dict = field(default_factory=dict)
    #: set once the median rule (driver or ShouldStopTrial) decided to stop it;
    #: the trial then ends EARLY_STOPPED however its job ends
    stop: str = ""
    mod_revision: int = 0
    #: what readers computed from this record (a record read is never changed,
    #: and snapshots share unchanged ones: see `TunerStore.snapshot`)
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    def encode(self) -> bytes:
        return json.dumps({"trial": _b64(self.trial), "system_attrs": self.system_attrs, "stop": self.stop},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, kv: KV) -> "TrialRecord":
        data = json.loads(kv.value)
        return cls(_unb64(pb.Trial, data["trial"]), data.get("system_attrs") or {}, data.get("stop", ""),
                   kv.mod_revision)


@dataclass
class Snapshot:
    """A study and all its trials, read in one transaction."""

    record: StudyRecord
    trials: list[TrialRecord]
    algorithm: bytes | None = None
    algorithm_revision: int = 0
    revision: int = 0

    @property
    def study(self) -> pb.Study:
        return self.record.study


class Unchanged(Exception):
    """Raised by a mutate function: nothing to write."""


# --- the study summary --------------------------------------------------------------

_COUNT_FIELD = {
    pb.TRIAL_STATE_PENDING: "pending",
    pb.TRIAL_STATE_RUNNING: "running",
    pb.TRIAL_STATE_SUCCEEDED: "succeeded",
    pb.TRIAL_STATE_FAILED: "failed",
    pb.TRIAL_STATE_EARLY_STOPPED: "early_stopped",
    pb.TRIAL_STATE_CANCELLED: "cancelled",
}


def count_trial(counts: pb.TrialCounts, state: int, delta: int) -> None:
    name = _COUNT_FIELD.get(state)
    if name:
        setattr(counts, name, getattr(counts, name) + delta)


def total_trials(counts: pb.TrialCounts) -> int:
    return sum(getattr(counts, name) for name in _COUNT_FIELD.values())


def active_trials(counts: pb.TrialCounts) -> int:
    return counts.pending + counts.running


def better(goal: int, a: float, b: float) -> bool:
    """a strictly better than b under the goal."""
    return a > b if goal == pb.GOAL_MAXIMIZE else a < b


def apply_to_summary(study: pb.Study, old: pb.Trial | None, new: pb.Trial) -> None:
    """Keeps trial_counts and best_trial in step with one trial's change."""
    if old is not None:
        count_trial(study.trial_counts, old.state, -1)
    count_trial(study.trial_counts, new.state, +1)
    if new.state == pb.TRIAL_STATE_SUCCEEDED and new.HasField("objective_value"):
        best = study.best_trial if study.HasField("best_trial") else None
        if (best is None or better(study.spec.goal, new.objective_value, best.objective_value)
                or (new.objective_value == best.objective_value and new.number < best.number)):
            study.best_trial.CopyFrom(new)


@dataclass
class _Known:
    """A RUNNING study as this store last read or wrote it."""

    #: the study key's create_revision: a study deleted and created again under
    #: the same name starts over
    create_revision: int
    #: number -> record; replaced, never changed in place
    trials: dict[int, TrialRecord]
    snapshot: Snapshot


class TunerStore:
    def __init__(self, etcd: Etcd, cache_size: int = 64):
        self.etcd = etcd
        #: (tenant, study) -> what this store last read or wrote of it, for the
        #: `cache_size` RUNNING studies used most recently
        self._known: OrderedDict[tuple[str, str], _Known] = OrderedDict()
        self.cache_size = cache_size

    # --- studies --------------------------------------------------------------------

    async def get_study(self, tenant: str, name: str) -> StudyRecord | None:
        kv = await self.etcd.get(study_key(tenant, name))
        return StudyRecord.decode(kv) if kv else None

    async def create_study(self, record: StudyRecord) -> tuple[bool, StudyRecord | None]:
        """Creates the record if absent; (created, existing record otherwise)."""
        study = record.study
        key = study_key(study.tenant, study.name)
        ok, resp = await self.etcd.txn([cmp_absent(key)], [op_put(key, record.encode())], [op_get(key)])
        if ok:
            record.mod_revision = resp.header.revision
            return True, None
        kvs = resp.responses[0].response_range.kvs
        return False, (StudyRecord.decode(KV.from_pb(kvs[0])) if kvs else None)

    async def list_studies(self, tenant: str, after: str, limit: int) -> tuple[list[StudyRecord], bool]:
        prefix = studies_prefix(tenant)
        start = prefix + after + "\0" if after else None
        kvs, _, more = await self.etcd.get_prefix(prefix, start=start, limit=limit)
        return [StudyRecord.decode(kv) for kv in kvs], more

    async def all_studies(self) -> list[StudyRecord]:
        kvs, _, _ = await self.etcd.get_prefix(STUDIES)
        return [StudyRecord.decode(kv) for kv in kvs]

    async def update_study(self, tenant: str, name: str,
                           mutate: Callable[[StudyRecord], None]) -> StudyRecord | None:
        """CAS read-modify-write of a study record; None when it is gone.
        `mutate` may raise Unchanged (then the current record is returned)."""
        key = study_key(tenant, name)
        for _ in range(100):
            kv = await self.etcd.get(key)
            if kv is None:
                return None
            record = StudyRecord.decode(kv)
            try:
                mutate(record)
            except Unchanged:
                return record
            ok, resp = await self.etcd.txn([cmp_mod_revision(key, kv.mod_revision)], [op_put(key, record.encode())])
            if ok:
                record.mod_revision = resp.header.revision
                return record
        raise errors.Conflict(f"too much contention on study {name!r}; retry")

    async def delete_study(self, tenant: str, name: str, revision: int) -> bool:
        key = study_key(tenant, name)
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(key, revision)],
            [op_delete(key), op_delete(algorithm_key(tenant, name)), op_delete_prefix(trials_prefix(tenant, name)),
             op_delete_prefix(f"{JOBSPECS}{tenant}/{name}/"), op_delete_prefix(curves_prefix(tenant, name))],
        )
        return ok

    # --- snapshots and trials -------------------------------------------------------------

    async def snapshot(self, tenant: str, name: str) -> Snapshot | None:
        """The study, its trials (by number) and its sampler state at one
        revision. A RUNNING study is remembered between calls (`_Known`), so
        a read brings only the trials changed since the previous read or
        write. Every change of a trial or of the sampler state changes the
        study key in the same transaction, and a study deleted and created
        again has a new create_revision, which is what makes that sound; the
        trial counts are checked against the trials as well. The records are
        shared between snapshots: read them, never change them."""
        key = (tenant, name)
        known = self._known.get(key)
        since = known.snapshot.revision + 1 if known else 0
        _, resp = await self.etcd.txn([], [op_get(study_key(tenant, name)),
                                           op_get_prefix(trials_prefix(tenant, name), min_mod_revision=since),
                                           op_get(algorithm_key(tenant, name))])
        study_r, trials_r, algo_r = (r.response_range for r in resp.responses)
        if not study_r.kvs:
            self._known.pop(key, None)
            return None
        study_kv = KV.from_pb(study_r.kvs[0])
        record = StudyRecord.decode(study_kv)
        trials = {}
        if known is not None:
            if known.create_revision != study_kv.create_revision:
                self._known.pop(key, None)  # deleted and created again: nothing carries over
                return await self.snapshot(tenant, name)
            trials = dict(known.trials)  # as of known.snapshot.revision; `known` itself is never changed
        for kv in trials_r.kvs:
            trial = TrialRecord.decode(KV.from_pb(kv))
            trials[trial.trial.number] = trial
        consistent = len(trials) == total_trials(record.study.trial_counts)
        if not consistent and known is not None:
            # Not the history remembered: read it all again.
            self._known.pop(key, None)
            return await self.snapshot(tenant, name)
        algo = algo_r.kvs[0] if algo_r.kvs else None
        snap = Snapshot(record, [trials[n] for n in sorted(trials)], algo.value if algo else None,
                        algo.mod_revision if algo else 0, resp.header.revision)
        if consistent:
            self._remember(key, _Known(study_kv.create_revision, trials, snap))
        else:
            self._known.pop(key, None)  # records to read whole each time
        return snap

    def known_snapshot(self, tenant: str, name: str) -> Snapshot | None:
        """The study as this store last read or wrote it (RUNNING then), without
        asking etcd: possibly stale, so only for a write that compares the
        study's mod_revision (as `add_trials` does) and reads again if it fails."""
        known = self._known.get((tenant, name))
        return known.snapshot if known else None

    def _remember(self, key: tuple[str, str], known: _Known) -> None:
        """Keeps `known` unless what is kept is later (reads and writes finish
        in any order) or the study is no longer RUNNING (nothing to suggest)."""
        if known.snapshot.study.state != pb.STUDY_STATE_RUNNING:
            self._known.pop(key, None)
            return
        kept = self._known.get(key)
        if kept is None or kept.snapshot.revision < known.snapshot.revision:
            self._known[key] = known
        self._known.move_to_end(key)
        while len(self._known) > self.cache_size:
            self._known.popitem(last=False)

    def _written(self, key: tuple[str, str], base_study_revision: int, record: StudyRecord,
                 trials: list[TrialRecord], revision: int, algorithm: tuple[bytes | None, int] | None = None) -> None:
        """After a transaction at `revision` that compared the study key with
        `base_study_revision` and wrote `record` and `trials` (and the sampler
        state): if what is kept is that base, it plus this write is the study
        at `revision` (nothing else can have changed in between)."""
        known = self._known.get(key)
        if known is None or known.snapshot.record.mod_revision != base_study_revision:
            return
        merged = dict(known.trials)
        for trial in trials:
            merged[trial.trial.number] = trial
        base = known.snapshot
        algo, algo_revision = algorithm if algorithm is not None else (base.algorithm, base.algorithm_revision)
        snap = Snapshot(record, [merged[n] for n in sorted(merged)], algo, algo_revision, revision)
        if len(merged) == total_trials(record.study.trial_counts):
            self._remember(key, _Known(known.create_revision, merged, snap))
        else:
            self._known.pop(key, None)

    async def get_trial(self, tenant: str, name: str, number: int) -> TrialRecord | None:
        kv = await self.etcd.get(trial_key(tenant, name, number))
        return TrialRecord.decode(kv) if kv else None

    async def list_trials(self, tenant: str, name: str, after: int, limit: int) -> tuple[list[TrialRecord], bool]:
        prefix = trials_prefix(tenant, name)
        start = f"{prefix}{after:05d}\0" if after else None
        kvs, _, more = await self.etcd.get_prefix(prefix, start=start, limit=limit)
        return [TrialRecord.decode(kv) for kv in kvs], more

    async def get_jobspec(self, tenant: str, name: str, number: int) -> jobs_pb.TrainJobSpec | None:
        kv = await self.etcd.get(jobspec_key(tenant, name, number))
        return jobs_pb.TrainJobSpec.FromString(kv.value) if kv else None

    async def add_trials(self, snap: Snapshot, new: list[tuple[TrialRecord, jobs_pb.TrainJobSpec]],
                         algorithm: bytes | None) -> bool:
        """Creates trials (and their job specs), the new sampler state and the
        study's counts in one transaction, if neither the study nor the
        sampler state changed since `snap`. False on a lost race."""
        study = pb.Study()
        study.CopyFrom(snap.study)
        record = StudyRecord(study, snap.record.trial_env, snap.record.released)
        tenant, name = study.tenant, study.name
        compares = [cmp_mod_revision(study_key(tenant, name), snap.record.mod_revision),
                    cmp_mod_revision(algorithm_key(tenant, name), snap.algorithm_revision)]
        ops = []
        for trial_record, job_spec in new:
            number = trial_record.trial.number
            apply_to_summary(study, None, trial_record.trial)
            key = trial_key(tenant, name, number)
            compares.append(cmp_absent(key))
            ops.append(op_put(key, trial_record.encode()))
            ops.append(op_put(jobspec_key(tenant, name, number), job_spec.SerializeToString(deterministic=True)))
        if algorithm is not None:
            ops.append(op_put(algorithm_key(tenant, name), algorithm))
        ops.append(op_put(study_key(tenant, name), record.encode()))
        ok, resp = await self.etcd.txn(compares, ops)
        if ok:
            revision = resp.header.revision
            record.mod_revision = revision
            kept = [TrialRecord(_copy(t.trial), dict(t.system_attrs), t.stop, revision) for t, _ in new]
            self._written((tenant, name), snap.record.mod_revision, record, kept, revision,
                          (algorithm, revision) if algorithm is not None else None)
        return ok

    async def update_trial(self, tenant: str, name: str, number: int,
                           mutate: Callable[[TrialRecord, StudyRecord], None],
                           curve: list[list[float]] | None = None) -> tuple[TrialRecord, StudyRecord] | None:
        """CAS update of one trial together with its study's summary. `mutate`
        changes the trial record in place (it may raise Unchanged). `curve`,
        when given, is stored with the change if the trial ends SUCCEEDED
        (the median rule compares running trials with those curves). None when the study or trial is
        gone."""
        skey, tkey = study_key(tenant, name), trial_key(tenant, name, number)
        for _ in range(100):
            _, resp = await self.etcd.txn([], [op_get(skey), op_get(tkey)])
            study_r, trial_r = (r.response_range for r in resp.responses)
            if not study_r.kvs or not trial_r.kvs:
                return None
            skv, tkv = KV.from_pb(study_r.kvs[0]), KV.from_pb(trial_r.kvs[0])
            record, trial_record = StudyRecord.decode(skv), TrialRecord.decode(tkv)
            old = pb.Trial()
            old.CopyFrom(trial_record.trial)
            try:
                mutate(trial_record, record)
            except Unchanged:
                return trial_record, record
            apply_to_summary(record.study, old, trial_record.trial)
            ops = [op_put(tkey, trial_record.encode()), op_put(skey, record.encode())]
            if curve is not None and trial_record.trial.state == pb.TRIAL_STATE_SUCCEEDED:
                ops.append(op_put(curve_key(tenant, name, number), json.dumps(curve).encode()))
            ok, resp = await self.etcd.txn(
                [cmp_mod_revision(skey, skv.mod_revision), cmp_mod_revision(tkey, tkv.mod_revision)], ops)
            if ok:
                trial_record.mod_revision = record.mod_revision = resp.header.revision
                kept_record = StudyRecord(_copy(record.study), record.trial_env, record.released, record.mod_revision)
                kept = TrialRecord(_copy(trial_record.trial), dict(trial_record.system_attrs), trial_record.stop,
                                   trial_record.mod_revision)
                self._written((tenant, name), skv.mod_revision, kept_record, [kept], resp.header.revision)
                return trial_record, record
        raise errors.Conflict(f"too much contention on study {name!r}; retry")

    async def curves(self, tenant: str, name: str) -> dict[int, list[tuple[int, float]]]:
        """{trial number: [(step, value), ...]} of the study's SUCCEEDED trials."""
        kvs, _, _ = await self.etcd.get_prefix(curves_prefix(tenant, name))
        out = {}
        for kv in kvs:
            out[int(kv.key.rsplit("/", 1)[1])] = [(int(s), float(v)) for s, v in json.loads(kv.value)]
        return out
