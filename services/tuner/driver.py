"""The driver: runs every RUNNING study's trials as train jobs (leader only).

One tuner process leads (etcd election under /cloudml/tuner/election/); its
`Driver` mirrors the studies and keeps one `StudyRunner` task per study that
needs work. A runner loops:

1. Reads the study and its trials (one etcd transaction).
2. Submits every PENDING trial that has no job yet as the train job
   "<study>-<n>" with the job spec recorded when the trial was suggested.
   The trial exists in etcd *before* its job is submitted, and SubmitJob is
   exactly-once (the same name and spec return the existing job), so a
   driver that dies anywhere around a submit resubmits on resume and gets the
   same job back: no trial is lost or run twice.
3. Follows each submitted trial's job with WatchJob (one stream per active
   trial; a resumed driver's first snapshot tells what happened while it was
   away): RUNNING marks the trial RUNNING; a final job ends the trial with
   its objective read from GetJobMetrics (see `early_stopping`).
4. Applies the median stopping rule to RUNNING trials every `poll_seconds`
   (and honours ShouldStopTrial's verdicts): the trial is marked to stop,
   then its job is cancelled; it ends EARLY_STOPPED.
5. Ends the study: FAILED after max_failed_trials failures or a trial job
   that cannot be submitted; SUCCEEDED (FAILED when no trial succeeded) once
   max_trials trials have ended.
6. Otherwise fills free slots: slot k asks SuggestTrials with client_id
   "driver-<k>", k < max_parallel_trials. A slot with an active trial gets
   that trial back instead of a new one (Vizier's client_id), which is what
   makes a resumed driver pick up exactly where it was.

A study in a final state (CANCELLED through the API, or ended above) is
cleaned up: its active trials are cancelled with their jobs and its `studies`
quota is returned; then its runner stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.common import errors
from services.common.etcd import Etcd, Mirror
from services.tuner import early_stopping
from services.tuner import spec as spec_mod
from services.tuner.core import ACTIVE, TunerCore, ts
from services.tuner.store import STUDIES, Snapshot, StudyRecord, TrialRecord, TunerStore, Unchanged, total_trials
from services.common.aio import wait_event

log = logging.getLogger(__name__)

JOB_FINAL = frozenset({jobs_pb.JOB_STATE_SUCCEEDED, jobs_pb.JOB_STATE_FAILED, jobs_pb.JOB_STATE_CANCELLED})
JOB_STARTED = frozenset({jobs_pb.JOB_STATE_RUNNING, jobs_pb.JOB_STATE_RESTARTING, jobs_pb.JOB_STATE_CANCELLING})
#: submit answers that no retry can fix: the trial (and the study) fail
PERMANENT = (errors.InvalidArgument, errors.AlreadyExists, errors.ResourceExhausted, errors.NotFound,
             errors.PermissionDenied)
#: a job created this long before its trial belongs to something else (e.g. a
#: deleted study of the same name): the trial must not adopt its results
STALE_JOB_SECONDS = 2.0


@dataclass
class DriverSettings:
    #: how often running trials' metrics are read for the median rule (and
    #: the longest a runner sleeps without news)
    poll_seconds: float = 1.0
    #: back-off after a failed call to another service
    retry_seconds: float = 1.0


def _seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


class Driver:
    def __init__(self, etcd: Etcd, core: TunerCore, store: TunerStore, jobs, settings: DriverSettings = DriverSettings()):
        self.etcd = etcd
        self.core = core
        self.store = store
        self.jobs = jobs
        self.settings = settings
        self.runners: dict[tuple[str, str], StudyRunner] = {}
        self._changed = asyncio.Event()
        self._backoff: dict[tuple[str, str], float] = {}

    @staticmethod
    def needs_work(record: StudyRecord) -> bool:
        study = record.study
        if study.state == pb.STUDY_STATE_RUNNING:
            return True
        return not record.released or study.trial_counts.pending + study.trial_counts.running > 0

    async def run(self) -> None:
        """The leader's loop; returns only by cancellation."""
        # Only studies with work left stay in memory; finished ones are read from etcd or the archive on demand.
        mirror = Mirror(self.etcd, STUDIES, decode=StudyRecord.decode, keep=self.needs_work)
        mirror.listeners.append(self._changed.set)
        mirror.start()
        try:
            await mirror.wait_synced(30)
            log.info("driver: leading; %d stud(ies) recorded", len(mirror.items))
            changed = True
            while True:
                self._changed.clear()
                self._reap()
                now = time.monotonic()
                for record in list(mirror.items.values()):
                    key = (record.study.tenant, record.study.name)
                    runner = self.runners.get(key)
                    if runner is not None:
                        if changed:  # e.g. cancelled through the API
                            runner.poke.set()
                    elif self.needs_work(record) and self._backoff.get(key, 0) <= now:
                        runner = StudyRunner(self, *key)
                        runner.start()
                        self.runners[key] = runner
                changed = await wait_event(self._changed, self.settings.poll_seconds)
        finally:
            await asyncio.gather(*(r.stop() for r in self.runners.values()), return_exceptions=True)
            self.runners.clear()
            await mirror.stop()

    def _reap(self) -> None:
        for key, runner in list(self.runners.items()):
            if runner.task is None or not runner.task.done():
                continue
            del self.runners[key]
            exc = None if runner.task.cancelled() else runner.task.exception()
            if exc is not None:
                message = exc.message if isinstance(exc, errors.CloudMLError) else repr(exc)
                level = logging.INFO if isinstance(exc, (errors.Unavailable, errors.Conflict)) else logging.ERROR
                log.log(level, "driver: runner of %s/%s stopped: %s; retrying", key[0], key[1], message,
                        exc_info=level == logging.ERROR and exc)
                self._backoff[key] = time.monotonic() + self.settings.retry_seconds
            else:
                self._backoff.pop(key, None)


class StudyRunner:
    def __init__(self, driver: Driver, tenant: str, name: str):
        self.driver = driver
        self.core = driver.core
        self.store = driver.store
        self.jobs = driver.jobs
        self.settings = driver.settings
        self.tenant = tenant
        self.name = name
        self.poke = asyncio.Event()
        self.task: asyncio.Task | None = None
        #: trial number -> its job's latest snapshot (None: the job is gone)
        self.job_of: dict[int, jobs_pb.TrainJob | None] = {}
        self.watchers: dict[int, asyncio.Task] = {}
        self.cancel_sent: set[int] = set()
        self.next_check = 0.0
        self._curves: tuple[int, list] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"study:{self.tenant}/{self.name}")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def run(self) -> None:
        try:
            while True:
                self.poke.clear()
                snap = await self.store.snapshot(self.tenant, self.name)
                if snap is None:
                    return  # deleted
                if snap.study.state != pb.STUDY_STATE_RUNNING:
                    await self.core.cleanup(self.tenant, self.name)
                    return
                if await self.step(snap):
                    continue  # something changed: read again at once
                await wait_event(self.poke, self._sleep(snap.study.spec))
        finally:
            for task in self.watchers.values():
                task.cancel()
            await asyncio.gather(*self.watchers.values(), return_exceptions=True)

    def _sleep(self, spec: pb.StudySpec) -> float:
        """Until the next early-stopping check; news (a job changed, the study
        changed) pokes earlier. Without early stopping, poll_seconds is only
        a safety net."""
        if not spec.early_stopping.enabled:
            return self.settings.poll_seconds
        return max(0.05, min(self.settings.poll_seconds, self.next_check - time.monotonic()))

    # --- one pass -------------------------------------------------------------------------------

    async def step(self, snap: Snapshot) -> bool:
        """One pass over the study; True when it changed something."""
        changed = False
        for record in snap.trials:
            if record.trial.state in ACTIVE:
                changed |= await self._advance(snap, record)
            else:
                self._forget(record.trial.number)
        if changed:
            return True
        study = snap.study
        spec = study.spec
        counts = study.trial_counts
        if spec.max_failed_trials and counts.failed >= spec.max_failed_trials:
            await self.core.finish(self.tenant, self.name, pb.STUDY_STATE_FAILED, "TooManyFailedTrials",
                                   f"{counts.failed} trial(s) failed (max_failed_trials {spec.max_failed_trials})")
            return True
        if spec.early_stopping.enabled and time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + self.settings.poll_seconds
            if await self._early_stop(snap):
                return True
        active = counts.pending + counts.running
        total = total_trials(counts)
        if total >= spec.max_trials and active == 0:
            await self._complete(study)
            return True
        if total < spec.max_trials and active < spec.max_parallel_trials:
            return await self._fill(snap)
        return False

    async def _complete(self, study: pb.Study) -> None:
        counts = study.trial_counts
        summary = (f"{total_trials(counts)} trial(s): {counts.succeeded} succeeded, {counts.failed} failed, "
                   f"{counts.early_stopped} early stopped, {counts.cancelled} cancelled")
        if counts.succeeded:
            best = study.best_trial
            await self.core.finish(self.tenant, self.name, pb.STUDY_STATE_SUCCEEDED, "Succeeded",
                                   f"{summary}; best trial {best.number} {study.spec.metric}="
                                   f"{best.objective_value:.6g}")
        else:
            await self.core.finish(self.tenant, self.name, pb.STUDY_STATE_FAILED, "NoSucceededTrial", summary)

    async def _fill(self, snap: Snapshot) -> bool:
        spec = snap.study.spec
        busy = {r.trial.client_id for r in snap.trials if r.trial.state in ACTIVE}
        made = False
        for k in range(spec.max_parallel_trials):
            slot = f"driver-{k}"
            if slot in busy:
                continue
            try:
                trials = await self.core.suggest(self.tenant, self.name, 1, slot)
            except errors.FailedPrecondition:
                return True  # no longer RUNNING: the next pass cleans up
            if not trials:
                break
            made = True
        if not made:
            # The algorithm had nothing left (a used-up grid or list) before
            # max_trials: the study ends once nothing runs any more.
            fresh = await self.store.snapshot(self.tenant, self.name)
            if (fresh is not None and fresh.study.state == pb.STUDY_STATE_RUNNING
                    and fresh.study.trial_counts.pending + fresh.study.trial_counts.running == 0
                    and total_trials(fresh.study.trial_counts) == total_trials(snap.study.trial_counts)):
                await self._complete(fresh.study)
                return True
        return made

    # --- one trial ------------------------------------------------------------------------------

    async def _advance(self, snap: Snapshot, record: TrialRecord) -> bool:
        trial = record.trial
        number = trial.number
        if not trial.job_name:
            return await self._submit(snap, record)
        if number not in self.watchers:
            self._watch(number, trial.job_name)
        if record.stop and number not in self.cancel_sent:
            await self.jobs.cancel(self.tenant, trial.job_name)
            self.cancel_sent.add(number)
        if number not in self.job_of:
            return False
        job = self.job_of[number]
        if job is None:
            await self.core.end_trial(self.tenant, self.name, number, pb.TRIAL_STATE_FAILED, "JobLost",
                                      f"train job {trial.job_name} no longer exists")
            return True
        if job.state in JOB_FINAL:
            await self._record_end(snap.study, record, job)
            return True
        if job.state in JOB_STARTED and trial.state == pb.TRIAL_STATE_PENDING:
            now = time.time()

            def running(r: TrialRecord, _: StudyRecord) -> None:
                if r.trial.state != pb.TRIAL_STATE_PENDING:
                    raise Unchanged
                r.trial.state = pb.TRIAL_STATE_RUNNING
                if not r.stop:
                    r.trial.reason, r.trial.message = "Running", f"job {r.trial.job_name} is running"
                r.trial.start_time.CopyFrom(ts(now))

            await self.store.update_trial(self.tenant, self.name, number, running)
            return True
        return False

    async def _submit(self, snap: Snapshot, record: TrialRecord) -> bool:
        trial = record.trial
        number = trial.number
        job_name = spec_mod.trial_job_name(self.name, number)
        job_spec = await self.store.get_jobspec(self.tenant, self.name, number)
        if job_spec is None:  # written with the trial; only a damaged store lacks it
            job_spec = spec_mod.trial_job_spec(snap.study.spec, self.name, number, _params(trial),
                                               self.core.study_output(self.tenant, self.name, snap.study.spec),
                                               with_env=snap.record.trial_env)
        try:
            job, created = await self.jobs.submit(self.tenant, job_name, job_spec)
        except PERMANENT as err:
            await self._submit_failed(number, job_name, err.message)
            return True
        except errors.CloudMLError as err:
            log.info("study %s/%s: submitting %s failed (%s); will retry", self.tenant, self.name, job_name,
                     err.message)
            await asyncio.sleep(self.settings.retry_seconds)
            return False
        if not created and _seconds(job.create_time) < _seconds(trial.create_time) - STALE_JOB_SECONDS:
            await self._submit_failed(number, job_name,
                                      f"a train job named {job_name!r} already exists from before this trial; "
                                      "delete it (or name the study differently)")
            return True

        def submitted(r: TrialRecord, study: StudyRecord) -> None:
            if r.trial.job_name:
                raise Unchanged
            r.trial.job_name = job_name
            if r.trial.state == pb.TRIAL_STATE_PENDING and not r.stop:
                r.trial.reason, r.trial.message = "Submitted", f"job {job_name} submitted"

        result = await self.store.update_trial(self.tenant, self.name, number, submitted)
        if result is None or result[0].trial.state not in ACTIVE or result[1].study.state != pb.STUDY_STATE_RUNNING:
            # The study was cancelled (or the trial ended) while the job was submitted.
            await self.jobs.cancel(self.tenant, job_name)
        else:
            log.info("study %s/%s: trial %d submitted as job %s%s", self.tenant, self.name, number, job_name,
                     "" if created else " (it existed: resubmission)")
        return True

    async def _submit_failed(self, number: int, job_name: str, message: str) -> None:
        text = f"train job {job_name} could not be submitted: {message}"
        await self.core.end_trial(self.tenant, self.name, number, pb.TRIAL_STATE_FAILED, "SubmitFailed", text)
        await self.core.finish(self.tenant, self.name, pb.STUDY_STATE_FAILED, "TrialSubmitFailed", text)

    async def _record_end(self, study: pb.Study, record: TrialRecord, job: jobs_pb.TrainJob) -> None:
        trial = record.trial
        spec = study.spec
        curve: early_stopping.Curve = []
        try:
            series = await self.jobs.metrics(self.tenant, trial.job_name, spec.metric)
            curve = early_stopping.curve_of(series, spec.metric)
        except errors.NotFound:
            pass
        objective = early_stopping.objective_of(curve, spec.goal, spec.objective)
        start = trial.start_time if trial.HasField("start_time") else job.start_time
        if job.state == jobs_pb.JOB_STATE_SUCCEEDED:
            if objective is None:
                state, reason = pb.TRIAL_STATE_FAILED, "MetricMissing"
                message = f"job {job.name} succeeded but reported no {spec.metric!r} values"
            else:
                state, reason = pb.TRIAL_STATE_SUCCEEDED, "Succeeded"
                message = f"{spec.metric}={objective[0]:.6g} at step {objective[1]}"
        elif job.state == jobs_pb.JOB_STATE_FAILED:
            state, reason = pb.TRIAL_STATE_FAILED, job.reason or "JobFailed"
            message = f"job {job.name} failed: {job.message}"
        else:
            state, reason, message = pb.TRIAL_STATE_CANCELLED, "JobCancelled", f"job {job.name} was cancelled"
        ended = await self.core.end_trial(self.tenant, self.name, trial.number, state, reason, message,
                                          objective=objective, curve=curve, start_time=start)
        if ended is not None:
            log.info("study %s/%s: trial %d %s: %s", self.tenant, self.name, trial.number,
                     pb.TrialState.Name(ended.trial.state), ended.trial.message)
        self._forget(trial.number)

    # --- early stopping -------------------------------------------------------------------------

    async def _early_stop(self, snap: Snapshot) -> bool:
        study = snap.study
        running = [r for r in snap.trials if r.trial.state == pb.TRIAL_STATE_RUNNING and not r.stop]
        if not running:
            return False
        completed = await self._completed_curves(study)
        if len(completed) < max(study.spec.early_stopping.min_trials, 1):
            return False
        stopped = False
        for record in running:
            try:
                verdict = await self.core.evaluate_stop(study, record.trial, completed)
            except errors.Unavailable:
                continue
            if verdict.stop:
                await self.core.request_stop(self.tenant, self.name, record.trial.number, verdict.reason)
                await self.jobs.cancel(self.tenant, record.trial.job_name)
                self.cancel_sent.add(record.trial.number)
                stopped = True
        return stopped

    async def _completed_curves(self, study: pb.Study) -> list:
        succeeded = study.trial_counts.succeeded
        if self._curves is None or self._curves[0] != succeeded:
            curves = await self.store.curves(self.tenant, self.name)
            self._curves = (succeeded, list(curves.values()))
        return self._curves[1]

    # --- following jobs -------------------------------------------------------------------------

    def _watch(self, number: int, job_name: str) -> None:
        self.watchers[number] = asyncio.create_task(self._follow(number, job_name),
                                                    name=f"watch:{self.tenant}/{job_name}")

    async def _follow(self, number: int, job_name: str) -> None:
        delay = 0.2
        while True:
            try:
                async for job in self.jobs.watch(self.tenant, job_name):
                    self.job_of[number] = job
                    self.poke.set()
                    delay = 0.2
                    if job.state in JOB_FINAL:
                        return
            except asyncio.CancelledError:
                raise
            except errors.NotFound:
                self.job_of[number] = None
                self.poke.set()
                return
            except errors.CloudMLError as err:
                log.debug("watch of %s interrupted: %s", job_name, err.message)
            except Exception:  # noqa: BLE001 - keep following whatever happens
                log.exception("watch of %s failed", job_name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _forget(self, number: int) -> None:
        task = self.watchers.pop(number, None)
        if task is not None:
            task.cancel()
        self.job_of.pop(number, None)
        self.cancel_sent.discard(number)


def _params(trial: pb.Trial) -> dict:
    return {k: spec_mod.value_of(v) for k, v in trial.params.items()}
