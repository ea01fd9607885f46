"""`TunerCore` in-process on a real etcd (a key namespace of its own on the
session etcd), with the jobs and auth services replaced by fakes:
SuggestTrials idempotency (client_id), limits, concurrent suggestions, the
sampler continuing across processes, and ShouldStopTrial."""
from __future__ import annotations

import asyncio
import math
import time

import optuna
import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from deploy.local.stack import EtcdTarget, fresh_namespace
from services.common import errors
from services.common.tokens import ROLE_MEMBER, Principal
from services.tuner.core import TunerCore
from services.tuner.store import TunerStore

optuna.logging.set_verbosity(optuna.logging.WARNING)


def branin(x1: float, x2: float) -> float:
    b, c = 5.1 / (4 * math.pi**2), 5.0 / math.pi
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


class FakeJobs:
    def __init__(self):
        self.validated = []
        self.cancelled = []
        self.series: dict[str, list[jobs_pb.MetricSeries]] = {}

    async def submit(self, tenant, name, spec, validate_only=False):
        self.validated.append((tenant, name, spec))
        return jobs_pb.TrainJob(name=name, tenant=tenant, spec=spec), False

    async def cancel(self, tenant, name):
        self.cancelled.append(name)
        return None

    async def metrics(self, tenant, name, metric):
        return self.series.get(name, [])


class FakeQuota:
    def __init__(self):
        self.held = set()

    async def reserve_study(self, tenant, owner):
        created = (tenant, owner) not in self.held
        self.held.add((tenant, owner))
        return created

    async def release(self, tenant, owner):
        released = (tenant, owner) in self.held
        self.held.discard((tenant, owner))
        return released


@pytest.fixture(scope="module")
def tuner_space(etcd_server):
    """The module's keyspace: a key namespace on the session etcd."""
    target = EtcdTarget(etcd_server.endpoint, fresh_namespace())
    yield target
    EtcdTarget(etcd_server.endpoint).delete_prefix(target.namespace + "/")


@pytest.fixture
async def etcd(tuner_space):
    client = await tuner_space.connect()
    yield client
    await client.close()


def make_core(etcd) -> TunerCore:
    return TunerCore(TunerStore(etcd), FakeJobs(), FakeQuota(), DATA_DIR)


_COUNTER = iter(range(10**6))


def caller() -> Principal:
    return Principal(f"t{next(_COUNTER)}-{int(time.time() * 1000) % 10**6}", ROLE_MEMBER, "AK", time.time() + 3600)


DATA_DIR = "/data"


def package_uri(tenant: str) -> str:
    """Where an uploaded package of `tenant` is: inside its storage (the core
    checks the template's paths; the fake jobs service reads no file)."""
    return f"file://{DATA_DIR}/storage/{tenant}/packages/0123456789abcdef/plain-trainer-1.0.tar.gz"


def branin_spec(tenant: str, **fields) -> pb.StudySpec:
    spec = pb.StudySpec(goal=pb.GOAL_MINIMIZE, metric="objective", algorithm=fields.pop("algorithm", pb.ALGORITHM_TPE),
                        max_trials=fields.pop("max_trials", 10), seed=fields.pop("seed", 1), **fields)
    spec.trial_template.trainer_uri = package_uri(tenant)
    spec.trial_template.module_name = "plain_trainer.task"
    spec.parameters.add(name="x1", double_range=pb.DoubleRange(min=-5, max=10))
    spec.parameters.add(name="x2", double_range=pb.DoubleRange(min=0, max=15))
    return spec


def params(trial) -> dict:
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in trial.params.items()}


async def finish(core: TunerCore, tenant: str, study: str, trial, value: float | None = None, step: int = 0):
    value = branin(**params(trial)) if value is None else value
    await core.end_trial(tenant, study, trial.number, pb.TRIAL_STATE_SUCCEEDED, "Succeeded", "",
                         objective=(value, step), curve=[(step, value)])


async def test_create_checks_the_template_with_the_jobs_service_and_holds_quota(etcd):
    core, who = make_core(etcd), caller()
    study, created = await core.create_study(who, "", "s", branin_spec(who.tenant))
    assert created and study.state == pb.STUDY_STATE_RUNNING and study.tenant == who.tenant
    (tenant, name, job), = core.jobs.validated
    assert name == "s-1" and job.output_path == f"{DATA_DIR}/storage/{who.tenant}/studies/s/1"
    assert job.trainer_uri == package_uri(who.tenant)
    assert job.env["CLOUDML_TRIAL_NUMBER"] == "1"
    assert core.quota.held == {(who.tenant, "tuner/s")}
    again, created = await core.create_study(who, "", "s", branin_spec(who.tenant))
    assert not created and again == study
    with pytest.raises(errors.NotFound):
        await core.get_study(caller(), who.tenant, "s")  # another tenant's member sees nothing


@pytest.mark.parametrize("field, value, error", [
    ("trainer_uri", "file:///p/plain-trainer-1.0.tar.gz", errors.PermissionDenied),
    ("trainer_uri", f"file://{DATA_DIR}/storage/someone-else/packages/plain-trainer-1.0.tar.gz",
     errors.PermissionDenied),
    ("trainer_uri", f"file://{DATA_DIR}/storage/TENANT/../someone-else/plain-trainer-1.0.tar.gz",
     errors.InvalidArgument),
    ("trainer_uri", "s3://bucket/plain-trainer-1.0.tar.gz", errors.InvalidArgument),
    ("output_path", "/tmp/out", errors.PermissionDenied),
], ids=["elsewhere", "another-tenant", "dotdot", "scheme-not-allowed", "output-elsewhere"])
async def test_create_refuses_template_paths_outside_the_tenants_storage(etcd, field, value, error):
    core, who = make_core(etcd), caller()
    spec = branin_spec(who.tenant)
    setattr(spec.trial_template, field, value.replace("TENANT", who.tenant))
    with pytest.raises(error) as info:
        await core.create_study(who, "", "s", spec)
    assert info.value.message.startswith(f"spec.trial_template.{field}"), info.value.message
    assert core.jobs.validated == [] and core.quota.held == set()
    with pytest.raises(errors.NotFound):
        await core.get_study(who, "", "s")


async def test_suggest_retry_with_the_same_client_id_returns_the_same_trials(etcd):
    core, who = make_core(etcd), caller()
    await core.create_study(who, "", "s", branin_spec(who.tenant, max_parallel_trials=3))
    first = await core.suggest_trials(who, "", "s", 2, "worker-a")
    assert [t.number for t in first] == [1, 2] and all(t.client_id == "worker-a" for t in first)
    assert await core.suggest_trials(who, "", "s", 2, "worker-a") == first
    assert await core.suggest_trials(who, "", "s", 1, "worker-a") == first  # all of its active trials
    other = await core.suggest_trials(who, "", "s", 5, "worker-b")
    assert [t.number for t in other] == [3]  # max_parallel_trials leaves room for one
    assert await core.suggest_trials(who, "", "s", 1, "worker-c") == []
    await finish(core, who.tenant, "s", first[0])
    assert await core.suggest_trials(who, "", "s", 1, "worker-a") == [first[1]]  # still has an active one
    await finish(core, who.tenant, "s", first[1])
    new = await core.suggest_trials(who, "", "s", 1, "worker-a")
    assert [t.number for t in new] == [4]
    study = await core.get_study(who, "", "s")
    assert study.trial_counts == pb.TrialCounts(pending=2, succeeded=2)
    assert study.best_trial.number in (1, 2)
    for bad in ((0, "x"), (101, "x"), (1, ""), (1, "x" * 129)):
        with pytest.raises(errors.InvalidArgument):
            await core.suggest_trials(who, "", "s", *bad)


async def test_suggest_stops_at_max_trials_and_when_not_running(etcd):
    core, who = make_core(etcd), caller()
    await core.create_study(who, "", "s", branin_spec(who.tenant, max_trials=2, max_parallel_trials=5))
    trials = await core.suggest_trials(who, "", "s", 5, "a")
    assert len(trials) == 2
    for trial in trials:
        await finish(core, who.tenant, "s", trial)
    assert await core.suggest_trials(who, "", "s", 1, "a") == []
    await core.cancel_study(who, "", "s")
    with pytest.raises(errors.FailedPrecondition):
        await core.suggest_trials(who, "", "s", 1, "a")
    assert core.quota.held == set()


async def test_concurrent_suggestions_get_distinct_trials(etcd):
    core, who = make_core(etcd), caller()
    await core.create_study(who, "", "s", branin_spec(who.tenant, max_parallel_trials=6,
                                                      algorithm=pb.ALGORITHM_RANDOM))
    cores = [core] + [make_core(etcd) for _ in range(2)]  # three "processes"
    results = await asyncio.gather(*(cores[i % 3].suggest(who.tenant, "s", 1, f"c{i}") for i in range(6)))
    numbers = sorted(t.number for r in results for t in r)
    assert numbers == [1, 2, 3, 4, 5, 6]
    points = {tuple(sorted(params(t[0]).items())) for t in results}
    assert len(points) == 6
    # The counts and the stored trials agree.
    study = await core.get_study(who, "", "s")
    assert study.trial_counts.pending == 6


async def test_the_sampler_continues_across_processes_as_one_optuna_study(etcd):
    who = caller()
    await make_core(etcd).create_study(who, "", "s", branin_spec(who.tenant, seed=77, max_trials=15))
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=77))
    reference.optimize(lambda t: branin(t.suggest_float("x1", -5, 10), t.suggest_float("x2", 0, 15)), n_trials=15)
    for n in range(15):  # each suggestion by a fresh core: a restarted service
        core = make_core(etcd)
        (trial,) = await core.suggest(who.tenant, "s", 1, "driver-0")
        assert params(trial) == reference.trials[n].params
        await finish(core, who.tenant, "s", trial)
    study = await make_core(etcd).get_study(who, "", "s")
    assert study.best_trial.objective_value == reference.best_value


async def test_a_long_lived_core_suggests_what_a_fresh_core_per_suggestion_suggests(etcd):
    """Same seed, same results, three trials in parallel ending out of
    order: a core that keeps its sampler's study and the study's trials in
    memory between suggestions (told only what changed) and a new core for
    every suggestion (a restarted tuner, rebuilding from etcd) suggest the
    same trials."""
    who = caller()
    long_lived = make_core(etcd)
    for name in ("kept", "fresh"):
        await long_lived.create_study(who, "", name, branin_spec(who.tenant, seed=5, max_trials=24,
                                                                 max_parallel_trials=3))
    suggested = {"kept": {}, "fresh": {}}  # number -> trial
    ended = {"kept": set(), "fresh": set()}
    for round_ in range(10):
        for name in ("kept", "fresh"):
            core = long_lived if name == "kept" else make_core(etcd)
            for slot in range(3):  # a slot with an active trial gets it back
                trials = await core.suggest(who.tenant, name, 1, f"driver-{slot}")
                suggested[name].update((t.number, t) for t in trials)
            active = [n for n in sorted(suggested[name]) if n not in ended[name]]
            # The oldest two end (the second one FAILED every other round); the newest keeps running.
            for number in active[:2]:
                if number == active[1] and round_ % 2:
                    await core.end_trial(who.tenant, name, number, pb.TRIAL_STATE_FAILED, "Failed", "")
                else:
                    await finish(core, who.tenant, name, suggested[name][number])
                ended[name].add(number)
    assert len(suggested["kept"]) == 3 + 2 * 9
    assert ({n: params(t) for n, t in suggested["kept"].items()}
            == {n: params(t) for n, t in suggested["fresh"].items()})
    assert long_lived.samplers.rebuilds == 1  # built at its first suggestion, then kept


async def test_snapshot_reads_only_the_trials_changed_since_its_last_read_or_write(etcd):
    core, other, who = make_core(etcd), make_core(etcd), caller()  # two tuner processes
    await core.create_study(who, "", "s", branin_spec(who.tenant, max_parallel_trials=4))
    read = []  # trials each snapshot of core.store brought

    class Counting:
        async def txn(self, compare, success, failure=()):
            ok, resp = await etcd.txn(compare, success, failure)
            if len(success) == 3 and not compare:  # a snapshot: study, trials, sampler state
                read.append(len(resp.responses[1].response_range.kvs))
            return ok, resp

        def __getattr__(self, name):
            return getattr(etcd, name)

    core.store.etcd = Counting()

    async def same_as_a_full_read():
        snap = await core.store.snapshot(who.tenant, "s")
        full = await TunerStore(etcd).snapshot(who.tenant, "s")
        assert [t.trial for t in snap.trials] == [t.trial for t in full.trials]
        assert [(t.mod_revision, t.stop, t.system_attrs) for t in snap.trials] == [
            (t.mod_revision, t.stop, t.system_attrs) for t in full.trials]
        assert snap.record == full.record and snap.algorithm == full.algorithm
        assert (snap.algorithm_revision, snap.revision) == (full.algorithm_revision, full.revision)
        return snap

    trials = await core.suggest(who.tenant, "s", 3, "a")
    await same_as_a_full_read()
    assert read == [0, 0]  # the trials it wrote itself are known
    await finish(core, who.tenant, "s", trials[0])
    await same_as_a_full_read()
    assert read[-1] == 0
    # Another process's changes: read, and only those.
    await finish(other, who.tenant, "s", trials[1])
    await other.request_stop(who.tenant, "s", trials[2].number, "median rule")
    snap = await same_as_a_full_read()
    assert read[-1] == 2
    assert snap.trials[1].trial.state == pb.TRIAL_STATE_SUCCEEDED and snap.trials[2].stop == "median rule"
    # A suggestion starting from what core knows, stale since the other
    # process suggested for the same client: the write is turned down, and
    # the fresh read answers with that trial.
    (theirs,) = await other.suggest(who.tenant, "s", 1, "b")
    assert await core.suggest(who.tenant, "s", 1, "b") == [theirs]
    (fourth,) = await core.suggest(who.tenant, "s", 1, "c")
    assert fourth.number == 5
    await same_as_a_full_read()
    # Deleted and created again under the same name: nothing of the old study shows.
    await core.cancel_study(who, "", "s")
    await core.delete_study(who, "", "s")
    assert await core.store.snapshot(who.tenant, "s") is None
    await core.create_study(who, "", "s", branin_spec(who.tenant, max_parallel_trials=4))
    assert (await same_as_a_full_read()).trials == []
    (again,) = await core.suggest(who.tenant, "s", 1, "a")
    assert again.number == 1 and again.state == pb.TRIAL_STATE_PENDING
    await same_as_a_full_read()


async def test_a_stale_study_in_memory_never_answers_without_a_fresh_read(etcd):
    core, other, who = make_core(etcd), make_core(etcd), caller()
    await core.create_study(who, "", "s", branin_spec(who.tenant, max_trials=3, max_parallel_trials=1))
    (first,) = await core.suggest(who.tenant, "s", 1, "a")
    # core still thinks trial 1 runs (no room); the other process ended it.
    await finish(other, who.tenant, "s", first)
    (second,) = await core.suggest(who.tenant, "s", 1, "b")
    assert second.number == 2
    # core thinks the study runs; the other process cancelled it.
    await other.cancel_study(who, "", "s")
    with pytest.raises(errors.FailedPrecondition):
        await core.suggest(who.tenant, "s", 1, "c")


def curve_series(points) -> list[jobs_pb.MetricSeries]:
    s = jobs_pb.MetricSeries(name="objective", source=jobs_pb.METRIC_SOURCE_REPORTED)
    s.replica.type = jobs_pb.REPLICA_TYPE_MASTER
    for step, value in points:
        s.points.add(step=step, value=value, attempt=1)
    return [s]


async def test_should_stop_trial_applies_the_median_rule_and_records_it(etcd):
    core, who = make_core(etcd), caller()
    spec = branin_spec(who.tenant, max_parallel_trials=5,
                       early_stopping=pb.EarlyStopping(enabled=True, min_trials=2))
    await core.create_study(who, "", "s", spec)
    done = await core.suggest(who.tenant, "s", 2, "a")
    for trial, value in zip(done, (1.0, 2.0)):
        await core.end_trial(who.tenant, "s", trial.number, pb.TRIAL_STATE_SUCCEEDED, "Succeeded", "",
                             objective=(value, 5), curve=[(s, value + 5 - s) for s in range(6)])
    good, bad = await core.suggest(who.tenant, "s", 2, "b")
    for trial in (good, bad):
        await core.store.update_trial(who.tenant, "s", trial.number, lambda r, _: r.trial.__setattr__(
            "state", pb.TRIAL_STATE_RUNNING))
    core.jobs.series["s-3"] = curve_series([(0, 5.0), (1, 4.0)])
    core.jobs.series["s-4"] = curve_series([(0, 50.0), (1, 40.0)])
    assert await core.should_stop_trial(who, "", "s", good.number) == (False, "")
    stop, reason = await core.should_stop_trial(who, "", "s", bad.number)
    assert stop and "median" in reason
    core.jobs.series["s-4"] = curve_series([(0, 0.1)])  # the verdict stands once given
    assert (await core.should_stop_trial(who, "", "s", bad.number))[0]
    ended = await core.end_trial(who.tenant, "s", bad.number, pb.TRIAL_STATE_SUCCEEDED, "Succeeded", "")
    assert ended.trial.state == pb.TRIAL_STATE_EARLY_STOPPED and ended.trial.reason == "EarlyStopped"
    with pytest.raises(errors.NotFound):
        await core.should_stop_trial(who, "", "s", 99)
