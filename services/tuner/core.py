"""Tuner domain logic on the API side: studies, trials, suggestions, early
stopping verdicts.

No gRPC here: methods take plain values and a `Principal`, return protobuf
messages and raise typed errors from `services.common.errors`. Every write is
a compare-and-swap (`services.tuner.store`), so every tuner process may serve
every RPC at once; the leader's driver (`services.tuner.driver`) runs the
trials through the same methods.

Quota: a RUNNING study holds one unit of its tenant's `studies` quota,
reserved through the auth service (owner "tuner/<study>") before the study
is recorded and returned when it reaches a final state (or is deleted).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time

from google.protobuf.timestamp_pb2 import Timestamp

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.common import errors, validation
from services.common.confine import Confiner
from services.common.tokens import Principal
from services.tuner import algorithms, early_stopping
from services.tuner import spec as spec_mod
from services.tuner.archiver import ArchivedStudy, StudyArchive
from services.tuner.store import (Snapshot, StudyRecord, TrialRecord, TunerStore, Unchanged, active_trials,
                                  total_trials)

log = logging.getLogger(__name__)

ACTIVE = (pb.TRIAL_STATE_PENDING, pb.TRIAL_STATE_RUNNING)
FINAL_TRIAL = (pb.TRIAL_STATE_SUCCEEDED, pb.TRIAL_STATE_FAILED, pb.TRIAL_STATE_EARLY_STOPPED,
               pb.TRIAL_STATE_CANCELLED)
FINAL_STUDY = (pb.STUDY_STATE_SUCCEEDED, pb.STUDY_STATE_FAILED, pb.STUDY_STATE_CANCELLED)
MAX_SUGGEST = 100
_NUMBER_RE = re.compile(r"[1-9][0-9]{0,5}")
CLIENT_ID_MAX = 128


def ts(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def owner_id(study: str) -> str:
    """The `studies` quota reservation of a study."""
    return f"tuner/{study}"


def _page_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _page_after(token: str, pattern) -> str:
    """The last name (or number) of the previous page; `pattern` is what it
    must look like."""
    if not token:
        return ""
    try:
        value = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        value = None
    if not value or not pattern.fullmatch(value):
        raise errors.InvalidArgument("page_token is not one this service issued")
    return value


def _check_states(states: list[int], enum, field: str = "states") -> frozenset[int]:
    for state in states:
        if state not in enum.values() or state == 0:
            raise errors.InvalidArgument(f"{field}: {state} is not a {enum.DESCRIPTOR.name}")
    return frozenset(states)


class TunerCore:
    def __init__(self, store: TunerStore, jobs, quota, data_dir: str, clock=time.time,
                 confiner: Confiner | None = None, archive: StudyArchive | None = None):
        self.store = store
        #: each running study's sampler kept in memory between suggestions (rebuilt whenever the records disagree)
        self.samplers = algorithms.LiveStudies()
        self.archive = archive
        self.jobs = jobs
        self.quota = quota
        self.data_dir = data_dir
        self.clock = clock
        # The jobs service checks every trial's paths again (validate_only and
        # at submit); this early check names the study's fields.
        self.confiner = confiner or (Confiner(os.path.join(data_dir, "storage")) if data_dir else None)

    # --- helpers ----------------------------------------------------------------------

    @staticmethod
    def _tenant(caller: Principal, tenant: str, name: str = "") -> str:
        """The tenant a request is about; NOT_FOUND when the caller may not see it."""
        tenant = tenant or caller.tenant
        validation.check_name(tenant, "tenant")
        if not caller.may_access(tenant):
            if name:
                raise errors.NotFound(f"study {name!r} not found")
            raise errors.NotFound(f"tenant {tenant!r} not found")
        return tenant

    async def _archived(self, tenant: str, name: str) -> ArchivedStudy | None:
        return await self.archive.get(tenant, name) if self.archive else None

    async def _find(self, tenant: str, name: str) -> StudyRecord | None:
        """A study, live or archived (then mod_revision 0)."""
        record = await self.store.get_study(tenant, name)
        if record is None:
            archived = await self._archived(tenant, name)
            record = archived.record if archived else None
        return record

    async def _load(self, caller: Principal, tenant: str, name: str, field: str = "name") -> tuple[str, StudyRecord]:
        """(tenant, study record; mod_revision 0 when archived). NOT_FOUND for a
        study the caller may not see, live or archived alike."""
        spec_mod.check_study_name(name, field)
        tenant = self._tenant(caller, tenant, name)
        record = await self._find(tenant, name)
        if record is None:
            raise errors.NotFound(f"study {name!r} not found in tenant {tenant!r}")
        return tenant, record

    async def _trials(self, tenant: str, study: str, record: StudyRecord) -> list[TrialRecord] | None:
        """An archived study's trials (None for a live one: read them from etcd)."""
        if record.mod_revision:
            return None
        archived = await self._archived(tenant, study)
        return archived.trials if archived else []

    def study_output(self, tenant: str, name: str, spec: pb.StudySpec) -> str:
        default = os.path.join(self.data_dir or "/tmp/cloudml", "storage", tenant, "studies", name)
        return spec_mod.study_output(spec, default)

    # --- studies --------------------------------------------------------------------------

    async def create_study(self, caller: Principal, tenant: str, name: str,
                           spec: pb.StudySpec) -> tuple[pb.Study, bool]:
        tenant = self._tenant(caller, tenant)
        spec_mod.check_study_name(name)
        existing = await self._find(tenant, name)  # an archived study's name stays taken
        if existing is not None:
            return self._same_or_conflict(existing, spec), False
        normalized = spec_mod.normalize(spec)
        await asyncio.to_thread(self._confine_template, tenant, normalized)
        trial_env = await self._check_template(tenant, name, normalized)

        created_reservation = await self.quota.reserve_study(tenant, owner_id(name))
        now = self.clock()
        study = pb.Study(name=name, tenant=tenant, spec=normalized, state=pb.STUDY_STATE_RUNNING,
                         reason="Created", message=f"created by {caller.tenant}", create_time=ts(now),
                         trial_counts=pb.TrialCounts())
        record = StudyRecord(study, trial_env=trial_env)
        try:
            created, other = await self.store.create_study(record)
        except Exception:
            if created_reservation:
                await self._release_quietly(tenant, name)
            raise
        if not created:
            # Another create won the race; the reservation is that study's now.
            if other is None:
                raise errors.Conflict(f"study {name!r} changed while being created; retry")
            return self._same_or_conflict(other, spec), False
        archived = await self._archived(tenant, name)
        if archived is not None:  # archived since the check above (the archiver points before it deletes)
            await self.store.delete_study(tenant, name, record.mod_revision)
            if created_reservation:
                await self._release_quietly(tenant, name)
            return self._same_or_conflict(archived.record, spec), False
        log.info("study %s/%s created: %s, %d trial(s), %d in parallel, seed %d", tenant, name,
                 pb.Algorithm.Name(normalized.algorithm), normalized.max_trials, normalized.max_parallel_trials,
                 normalized.seed)
        return study, True

    @staticmethod
    def _same_or_conflict(existing: StudyRecord, spec: pb.StudySpec) -> pb.Study:
        stored = existing.study.spec
        try:
            again = spec_mod.normalize(spec, seed=stored.seed)
        except errors.InvalidArgument:
            again = None
        if again == stored:
            return existing.study
        raise errors.AlreadyExists(
            f"study {existing.study.name!r} already exists in tenant {existing.study.tenant!r} with a different "
            "spec; choose another name, or delete it first")

    def _confine_template(self, tenant: str, spec: pb.StudySpec) -> None:
        """The template's trainer package and output inside the tenant's
        storage (or an allowed remote scheme): services.common.confine."""
        if self.confiner is None:
            return
        template = spec.trial_template
        if template.trainer_uri:
            self.confiner.check(tenant, template.trainer_uri.strip(), "spec.trial_template.trainer_uri")
        if template.output_path:
            self.confiner.check(tenant, template.output_path, "spec.trial_template.output_path")

    async def _check_template(self, tenant: str, name: str, spec: pb.StudySpec) -> bool:
        """Checks the first trial's train job with the jobs service
        (validate_only) and returns whether trial jobs can carry the
        CLOUDML_STUDY_NAME / CLOUDML_TRIAL_NUMBER environment."""
        params = spec_mod.first_params(spec)
        output = self.study_output(tenant, name, spec)
        job_name = spec_mod.trial_job_name(name, 1)
        for with_env in (True, False):
            job = spec_mod.trial_job_spec(spec, name, 1, params, output, with_env=with_env)
            try:
                await self.jobs.submit(tenant, job_name, job, validate_only=True)
                return with_env
            except errors.PermissionDenied as err:
                message = err.message
                if message.startswith("spec."):
                    message = "spec.trial_template." + message[len("spec."):]
                raise errors.PermissionDenied(message) from None
            except errors.InvalidArgument as err:
                if with_env and "spec.env" in err.message and "CLOUDML_" in err.message:
                    # A jobs service that reserves every CLOUDML_* key: trial
                    # jobs go without the two variables (the job name still
                    # says the trial: "<study>-<n>").
                    log.warning("the jobs service refuses %s in a job's env; trials of %s/%s run without it",
                                spec_mod.TRIAL_ENV, tenant, name)
                    continue
                message = err.message
                if message.startswith("spec."):
                    message = "spec.trial_template." + message[len("spec."):]
                raise errors.InvalidArgument(message) from None
        return False

    async def get_study(self, caller: Principal, tenant: str, name: str) -> pb.Study:
        return (await self._load(caller, tenant, name))[1].study

    async def list_studies(self, caller: Principal, tenant: str, states: list[int], page_size: int,
                           page_token: str) -> tuple[list[pb.Study], str]:
        tenant = self._tenant(caller, tenant)
        size = validation.check_page_size(page_size)
        wanted = _check_states(states, pb.StudyState)
        after = _page_after(page_token, spec_mod.STUDY_NAME_RE)
        out: list[pb.Study] = []
        while len(out) <= size:
            # etcd first, then the archive (a study moving meanwhile is in at least one).
            batch, more = await self.store.list_studies(tenant, after, size + 1)
            archived, more_archived = (await self.archive.page(tenant, after, size + 1) if self.archive
                                       else ([], False))
            merged = {s.name: s for s in archived}
            merged.update((r.study.name, r.study) for r in batch)
            # Names up to the last of each source that has more are complete.
            ends = []
            if more and batch:
                ends.append(batch[-1].study.name)
            if more_archived and archived:
                ends.append(archived[-1].name)
            bound = min(ends) if ends else None
            for name in sorted(merged):
                if bound is not None and name > bound:
                    break
                if not wanted or merged[name].state in wanted:
                    out.append(merged[name])
            if bound is None:
                break
            after = bound
        if len(out) > size:
            out = out[:size]
            return out, _page_token(out[-1].name)
        return out, ""

    async def cancel_study(self, caller: Principal, tenant: str, name: str) -> pb.Study:
        tenant, _ = await self._load(caller, tenant, name)
        now = self.clock()

        def mutate(record: StudyRecord) -> None:
            if record.study.state != pb.STUDY_STATE_RUNNING:
                raise Unchanged
            record.study.state = pb.STUDY_STATE_CANCELLED
            record.study.reason = "Cancelled"
            record.study.message = f"cancelled by {caller.tenant}"
            record.study.end_time.CopyFrom(ts(now))

        record = await self.store.update_study(tenant, name, mutate)
        if record is None:
            archived = await self._archived(tenant, name)
            if archived is None:
                raise errors.NotFound(f"study {name!r} not found in tenant {tenant!r}")
            return archived.record.study  # ended long ago: nothing to cancel
        try:
            await self.cleanup(tenant, name)
        except errors.CloudMLError as err:
            # The driver finishes the job (it cleans up every final study).
            log.info("cleanup of cancelled study %s/%s deferred: %s", tenant, name, err.message)
        return (await self.store.get_study(tenant, name) or record).study

    async def delete_study(self, caller: Principal, tenant: str, name: str, attempts: int = 8) -> None:
        """A study that just ended is still written by its driver for a moment
        (the quota it held given back, the last trial's cleanup): the delete
        reads it again and retries rather than answering ABORTED for that."""
        for _ in range(attempts):
            tenant, record = await self._load(caller, tenant, name)
            if record.study.state == pb.STUDY_STATE_RUNNING:
                raise errors.FailedPrecondition(f"study {name!r} is RUNNING; cancel it first")
            if not record.mod_revision:  # archived
                await self.archive.remove(tenant, name)
                return
            if self.archive:  # an archiver killed between its two steps left it in both
                await self.archive.remove(tenant, name)
            if not record.released:
                await self.quota.release(tenant, owner_id(name))
            if await self.store.delete_study(tenant, name, record.mod_revision):
                return
            await asyncio.sleep(0.05)
        raise errors.Conflict(f"study {name!r} changed while being deleted; retry")

    # --- trials ------------------------------------------------------------------------------

    async def list_trials(self, caller: Principal, tenant: str, study: str, states: list[int], page_size: int,
                          page_token: str) -> tuple[list[pb.Trial], str]:
        tenant, record = await self._load(caller, tenant, study, "study")
        size = validation.check_page_size(page_size)
        wanted = _check_states(states, pb.TrialState)
        token = _page_after(page_token, _NUMBER_RE)
        after = int(token) if token else 0
        archived = await self._trials(tenant, study, record)
        out: list[pb.Trial] = []
        more = True
        while more and len(out) <= size:
            if archived is not None:
                later = [t for t in archived if t.trial.number > after]
                batch, more = later[:size + 1], len(later) > size + 1
            else:
                batch, more = await self.store.list_trials(tenant, study, after, size + 1)
            for record in batch:
                after = record.trial.number
                if not wanted or record.trial.state in wanted:
                    out.append(record.trial)
            if not batch:
                break
        if len(out) > size:
            out = out[:size]
            return out, _page_token(str(out[-1].number))
        return out, ""

    async def _trial(self, tenant: str, study: str, record: StudyRecord, number: int) -> TrialRecord | None:
        archived = await self._trials(tenant, study, record)
        if archived is None:
            return await self.store.get_trial(tenant, study, number)
        return next((t for t in archived if t.trial.number == number), None)

    async def get_trial(self, caller: Principal, tenant: str, study: str, number: int) -> pb.Trial:
        tenant, study_record = await self._load(caller, tenant, study, "study")
        record = await self._trial(tenant, study, study_record, number)
        if record is None:
            raise errors.NotFound(f"study {study!r} has no trial {number}")
        return record.trial

    async def suggest_trials(self, caller: Principal, tenant: str, study: str, count: int,
                             client_id: str) -> list[pb.Trial]:
        if not 1 <= count <= MAX_SUGGEST:
            raise errors.InvalidArgument(f"count must be within 1..{MAX_SUGGEST} (got {count})")
        if not client_id or len(client_id) > CLIENT_ID_MAX:
            raise errors.InvalidArgument(f"client_id is required (at most {CLIENT_ID_MAX} characters)")
        spec_mod.check_study_name(study, "study")
        tenant = self._tenant(caller, tenant, study)
        return await self.suggest(tenant, study, count, client_id)

    async def suggest(self, tenant: str, study: str, count: int, client_id: str) -> list[pb.Trial]:
        """SuggestTrials without the caller checks (the driver's entry).

        The first attempt starts from the study as this process last read or
        wrote it, if it has it (`TunerStore.known_snapshot`), without reading
        etcd: it only goes as far as writing new trials, which the write's
        compare-and-swap on the study turns down if anything changed. Every
        other answer (the caller's own active trials, no room, an error) is
        given from a fresh read."""
        for attempt in range(50):
            snap = self.store.known_snapshot(tenant, study) if attempt == 0 else None
            fresh = snap is None
            if fresh:
                snap = await self.store.snapshot(tenant, study)
            if snap is None:
                archived = await self._archived(tenant, study)
                if archived is not None:
                    raise errors.FailedPrecondition(
                        f"study {study!r} is {pb.StudyState.Name(archived.record.study.state)}, not RUNNING")
                raise errors.NotFound(f"study {study!r} not found in tenant {tenant!r}")
            mine = [t.trial for t in snap.trials if t.trial.client_id == client_id and t.trial.state in ACTIVE]
            if not fresh and (mine or snap.study.state != pb.STUDY_STATE_RUNNING):
                continue  # answered from a fresh read
            if snap.study.state != pb.STUDY_STATE_RUNNING:
                raise errors.FailedPrecondition(
                    f"study {study!r} is {pb.StudyState.Name(snap.study.state)}, not RUNNING")
            if mine:
                return [_copy_trial(t) for t in mine]  # the snapshot's records are shared
            new = await self._new_trials(snap, count, client_id, final=fresh)
            if new is None:
                continue  # lost a race with another suggestion (or started from a stale study): read again
            return new
        raise errors.Conflict(f"too much contention suggesting trials of study {study!r}; retry")

    async def _new_trials(self, snap: Snapshot, count: int, client_id: str,
                          final: bool = True) -> list[pb.Trial] | None:
        """New trials written, or None when the write lost a race, or (not
        `final`: `snap` may be stale) when there would be none."""
        study = snap.study
        spec = study.spec
        counts = study.trial_counts
        total = total_trials(counts)
        room = min(count, spec.max_trials - total, spec.max_parallel_trials - active_trials(counts))
        if room <= 0:
            return [] if final else None
        observations = [_observation(t) for t in snap.trials]
        suggestions, state = await asyncio.to_thread(self.samplers.suggest, (study.tenant, study.name), spec,
                                                     observations, snap.algorithm, room)
        if not suggestions:
            return [] if final else None
        now = self.clock()
        output = self.study_output(study.tenant, study.name, spec)
        new = []
        for i, suggestion in enumerate(suggestions):
            number = total + i + 1
            trial = pb.Trial(study=study.name, tenant=study.tenant, number=number, state=pb.TRIAL_STATE_PENDING,
                             client_id=client_id, reason="Suggested", create_time=ts(now))
            for key, value in suggestion.params.items():
                trial.params[key].CopyFrom(spec_mod.to_value(value))
            job = spec_mod.trial_job_spec(spec, study.name, number, suggestion.params, output,
                                          with_env=snap.record.trial_env)
            new.append((TrialRecord(trial, suggestion.system_attrs), job))
        if not await self.store.add_trials(snap, new, state):
            return None
        for record, _ in new:
            log.info("study %s/%s: trial %d suggested for %s: %s", study.tenant, study.name, record.trial.number,
                     client_id, " ".join(spec_mod.trial_args(suggestion_params(record.trial))))
        return [record.trial for record, _ in new]

    # --- early stopping -------------------------------------------------------------------

    async def should_stop_trial(self, caller: Principal, tenant: str, study: str,
                                number: int) -> tuple[bool, str]:
        tenant, record = await self._load(caller, tenant, study, "study")
        trial_record = await self._trial(tenant, study, record, number)
        if trial_record is None:
            raise errors.NotFound(f"study {study!r} has no trial {number}")
        if trial_record.stop:
            return True, trial_record.stop
        if not record.study.spec.early_stopping.enabled or trial_record.trial.state != pb.TRIAL_STATE_RUNNING:
            return False, ""
        verdict = await self.evaluate_stop(record.study, trial_record.trial)
        if not verdict.stop:
            return False, ""
        await self.request_stop(tenant, study, number, verdict.reason)
        return True, verdict.reason

    async def evaluate_stop(self, study: pb.Study, trial: pb.Trial,
                            completed: list[early_stopping.Curve] | None = None) -> early_stopping.Verdict:
        """The median rule on the trial's metric so far."""
        spec = study.spec
        es = spec.early_stopping
        if completed is None:
            completed = list((await self.store.curves(study.tenant, study.name)).values())
        if len(completed) < max(es.min_trials, 1):
            return early_stopping.Verdict(False)
        job_name = trial.job_name or spec_mod.trial_job_name(study.name, trial.number)
        try:
            series = await self.jobs.metrics(study.tenant, job_name, spec.metric)
        except errors.NotFound:
            return early_stopping.Verdict(False)
        curve = early_stopping.curve_of(series, spec.metric)
        return early_stopping.median_rule(spec.goal, curve, completed, es.min_trials, es.start_step)

    async def request_stop(self, tenant: str, study: str, number: int, reason: str) -> None:
        def mutate(trial_record: TrialRecord, _: StudyRecord) -> None:
            if trial_record.stop or trial_record.trial.state in FINAL_TRIAL:
                raise Unchanged
            trial_record.stop = reason
            trial_record.trial.reason = "StopRequested"
            trial_record.trial.message = reason

        await self.store.update_trial(tenant, study, number, mutate)
        log.info("study %s/%s: trial %d to stop early: %s", tenant, study, number, reason)

    # --- the end of a study ----------------------------------------------------------------------

    async def finish(self, tenant: str, study: str, state: int, reason: str, message: str) -> StudyRecord | None:
        """Moves a RUNNING study to a final state (no-op otherwise), then
        cancels its active trials and returns its quota."""
        now = self.clock()

        def mutate(record: StudyRecord) -> None:
            if record.study.state != pb.STUDY_STATE_RUNNING:
                raise Unchanged
            record.study.state = state
            record.study.reason = reason
            record.study.message = message
            record.study.end_time.CopyFrom(ts(now))

        record = await self.store.update_study(tenant, study, mutate)
        if record is not None:
            log.info("study %s/%s %s: %s", tenant, study, pb.StudyState.Name(record.study.state), record.study.message)
            await self.cleanup(tenant, study)
        return record

    async def cleanup(self, tenant: str, study: str) -> None:
        """For a study in a final state: cancels every PENDING or RUNNING
        trial with its train job (the job first, so that a crash in between
        leaves the trial active and the next cleanup cancels it again), then
        returns the `studies` quota. Idempotent."""
        snap = await self.store.snapshot(tenant, study)
        if snap is None or snap.study.state not in FINAL_STUDY:
            return
        why = {pb.STUDY_STATE_CANCELLED: "StudyCancelled", pb.STUDY_STATE_FAILED: "StudyFailed"}.get(
            snap.study.state, "StudyEnded")
        for trial_record in snap.trials:
            trial = trial_record.trial
            if trial.state not in ACTIVE:
                continue
            await self.jobs.cancel(tenant, trial.job_name or spec_mod.trial_job_name(study, trial.number))
            await self.end_trial(tenant, study, trial.number, pb.TRIAL_STATE_CANCELLED, why,
                                 f"the study is {pb.StudyState.Name(snap.study.state)[len('STUDY_STATE_'):]}")
        if not snap.record.released:
            await self.quota.release(tenant, owner_id(study))

            def mark(record: StudyRecord) -> None:
                if record.released:
                    raise Unchanged
                record.released = True

            await self.store.update_study(tenant, study, mark)

    async def end_trial(self, tenant: str, study: str, number: int, state: int, reason: str, message: str, *,
                        objective: tuple[float, int] | None = None, curve=None,
                        start_time: Timestamp | None = None) -> TrialRecord | None:
        """Moves an active trial to a final state (a trial asked to stop ends
        EARLY_STOPPED whatever `state` says). No-op on a final trial."""
        now = self.clock()

        def mutate(trial_record: TrialRecord, _: StudyRecord) -> None:
            trial = trial_record.trial
            if trial.state in FINAL_TRIAL:
                raise Unchanged
            final, why, text = state, reason, message
            if trial_record.stop:
                final, why, text = pb.TRIAL_STATE_EARLY_STOPPED, "EarlyStopped", trial_record.stop
            trial.state = final
            trial.reason, trial.message = why, text
            if objective is not None:
                trial.objective_value, trial.objective_step = objective
            if start_time is not None and not trial.HasField("start_time") and start_time.seconds:
                trial.start_time.CopyFrom(start_time)
            trial.end_time.CopyFrom(ts(now))

        stored_curve = None
        if curve is not None:
            stored_curve = [[s, v] for s, v in early_stopping.downsample(curve)]
        result = await self.store.update_trial(tenant, study, number, mutate, curve=stored_curve)
        return result[0] if result else None

    async def _release_quietly(self, tenant: str, name: str) -> None:
        try:
            await self.quota.release(tenant, owner_id(name))
        except errors.CloudMLError as err:
            log.warning("could not return the studies quota of %s/%s: %s", tenant, name, err.message)


def _observation(record: TrialRecord) -> algorithms.Observation:
    """The sampler's view of a trial, computed once per record read."""
    obs = record.derived.get("observation")
    if obs is None:
        obs = record.derived["observation"] = algorithms.observation_of(record.trial, record.system_attrs)
    return obs


def _copy_trial(trial: pb.Trial) -> pb.Trial:
    out = pb.Trial()
    out.CopyFrom(trial)
    return out


def suggestion_params(trial: pb.Trial) -> dict:
    return {k: spec_mod.value_of(v) for k, v in trial.params.items()}
