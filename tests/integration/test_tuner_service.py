"""The tuner service as real processes: the session's etcd and auth service, a
jobs service and a tuner service process, and the example trainers
(examples/trainers: `linear` with TensorFlow, `plain` computing Branin)
installed into real environments and run by the local runtime.

One stack serves the module (`stack`); the kill -9 test kills and restarts
the stack's tuner process. Packages are built once (`built`) and uploaded
(JobsService/UploadPackage) into each test's tenant's storage (`packages`),
as a user would; templates name the stored copies.
"""
from __future__ import annotations

import math
import os
import time

import grpc
import optuna
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from tests.integration.conftest import ADMIN_ACCESS_KEY
from tests.integration.tuner_stack import (TunerClient, TunerStack, build_trainers, categorical, discrete, double, params_of,
                                           template)

Code = grpc.StatusCode
TF_MEMORY = 1536 << 20


def branin(x1: float, x2: float) -> float:
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5.0 / math.pi
    r, s, t = 6.0, 10.0, 1.0 / (8 * math.pi)
    return a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


def expect_error(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, f"expected {code.name}, got {info.value.code().name}: {info.value.details()}"
    return info.value


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    """{trainer: sdist path} on this machine, outside any tenant's storage."""
    return build_trainers(str(tmp_path_factory.mktemp("tuner-packages")), str(tmp_path_factory.mktemp("tuner-src")))


@pytest.fixture(scope="module")
def stack(etcd_server, auth_service, tmp_path_factory):
    stack = TunerStack(str(tmp_path_factory.mktemp("tuner-stack")), etcd_server.endpoint, ADMIN_ACCESS_KEY,
                       auth_service.admin_secret, envs_dir=str(tmp_path_factory.mktemp("tuner-envs")))
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def member(auth_service):
    return auth_service.new_tenant("hp")


@pytest.fixture
def client(stack, member):
    return stack.client(member.token, member.tenant)


@pytest.fixture
def packages(client, built):
    """{trainer: URI} of the packages in the member's storage (uploaded on first use)."""
    return client.packages(built)


def plain_template(packages, steps: int = 1, sleep: float = 0.0):
    """The plain Branin trainer: `steps` reports of `objective`, `sleep` seconds apart."""
    return template(packages["plain"], "plain_trainer.task", ["--steps", str(steps), "--sleep", str(sleep)])


def branin_space():
    return [double("x1", -5.0, 10.0), double("x2", 0.0, 15.0)]


def usage(auth_service, tenant: str):
    return auth_service.admin.call("GetQuota", auth_pb.GetQuotaRequest(tenant=tenant)).usage


# --- the seed's grid ----------------------------------------------------------------------


def test_seed_grid_on_linear_trainer_succeeds_with_best_trial_by_goal(client, member, auth_service, packages, stack):
    spec = pb.StudySpec(
        trial_template=template(packages["linear"], "trainer.task", ["--max_epochs", "5"], memory=TF_MEMORY),
        goal=pb.GOAL_MINIMIZE, metric="loss", algorithm=pb.ALGORITHM_GRID, seed=7, max_parallel_trials=2,
        parameters=[categorical("optimizer", "ftrl", "sgd"), discrete("learning_rate", 0.1, 0.5)])
    created = client.create("linear-grid", spec)
    assert created.created and created.study.state == pb.STUDY_STATE_RUNNING
    assert created.study.spec.max_trials == 4  # the grid's size
    assert usage(auth_service, member.tenant).studies == 1

    study = client.wait("linear-grid", timeout=300)
    assert study.state == pb.STUDY_STATE_SUCCEEDED, study
    trials = client.trials("linear-grid")
    assert [t.number for t in trials] == [1, 2, 3, 4]
    assert all(t.state == pb.TRIAL_STATE_SUCCEEDED for t in trials), trials
    assert sorted((p["optimizer"], p["learning_rate"]) for p in map(params_of, trials)) == [
        ("ftrl", 0.1), ("ftrl", 0.5), ("sgd", 0.1), ("sgd", 0.5)]
    best = min(trials, key=lambda t: (t.objective_value, t.number))
    assert study.best_trial.number == best.number and study.best_trial.objective_value == best.objective_value
    assert study.trial_counts.succeeded == 4

    # Trials ran as the jobs "<study>-<n>" with --name=value arguments and
    # their own output path; never more than two at once.
    for trial in trials:
        job = client.job(f"linear-grid-{trial.number}")
        assert trial.job_name == job.name and job.state == jobs_pb.JOB_STATE_SUCCEEDED
        p = params_of(trial)
        args = list(job.spec.job_args)
        assert args[:2] == ["--max_epochs", "5"]
        assert f"--optimizer={p['optimizer']}" in args and f"--learning_rate={p['learning_rate']}" in args
        assert args[-1] == f"--output_path={job.spec.output_path}" and job.spec.output_path.endswith(f"/{trial.number}")
        assert trial.objective_step == 4  # the final epoch's value
    spans = [(t.start_time.ToNanoseconds(), t.end_time.ToNanoseconds()) for t in trials]
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2
    assert usage(auth_service, member.tenant).studies == 0


# --- TPE against standalone Optuna --------------------------------------------------------


def test_tpe_on_branin_finds_what_standalone_optuna_finds(client, packages):
    seed, budget = 20240, 20
    spec = pb.StudySpec(trial_template=plain_template(packages), goal=pb.GOAL_MINIMIZE, metric="objective",
                        algorithm=pb.ALGORITHM_TPE, seed=seed, max_trials=budget, max_parallel_trials=1,
                        parameters=branin_space())
    client.create("branin-tpe", spec)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    reference.optimize(lambda t: branin(t.suggest_float("x1", -5.0, 10.0), t.suggest_float("x2", 0.0, 15.0)),
                       n_trials=budget)

    study = client.wait("branin-tpe", timeout=300)
    assert study.state == pb.STUDY_STATE_SUCCEEDED, study
    trials = client.trials("branin-tpe")
    assert len(trials) == budget and all(t.state == pb.TRIAL_STATE_SUCCEEDED for t in trials)
    for trial in trials:  # the objective is the trainer's Branin value of the suggested point
        p = params_of(trial)
        assert trial.objective_value == pytest.approx(branin(p["x1"], p["x2"]), rel=1e-12)
    # Tolerance: one trial at a time, the service's sampler sees exactly what
    # standalone Optuna sees (same sampler, seed, results), so the best must
    # agree up to float formatting: 1e-9 relative.
    assert study.best_trial.objective_value == pytest.approx(reference.best_value, rel=1e-9)
    ours = [params_of(t) for t in trials]
    theirs = [t.params for t in reference.trials]
    for o, r in zip(ours, theirs):  # and it suggested the same points, in the same order
        assert o["x1"] == pytest.approx(r["x1"], rel=1e-12) and o["x2"] == pytest.approx(r["x2"], rel=1e-12)


# --- median early stopping ----------------------------------------------------------------


def test_median_rule_stops_clearly_bad_trials(client, packages):
    # Good points report 5 steps (1 s), bad ones would report 30 (6 s); the
    # trainer's curve keeps the final ranking at every step.
    good = {"x1": math.pi, "x2": 2.275, "steps": 5}     # Branin's minimum, 0.398
    bad = {"x1": -5.0, "x2": 0.0, "steps": 30}          # 308.1
    sets = [good, dict(good, x2=2.5), dict(good, x2=2.0), bad, dict(bad, x2=1.0), dict(good, x2=2.4)]
    spec = pb.StudySpec(trial_template=template(packages["plain"], "plain_trainer.task", ["--sleep", "0.2"]),
                        goal=pb.GOAL_MINIMIZE, metric="objective", max_parallel_trials=1,
                        early_stopping=pb.EarlyStopping(enabled=True, min_trials=3, start_step=1))
    for values in sets:
        ps = spec.params.add()
        for k, v in values.items():
            ps.values[k].CopyFrom(pb.ParameterValue(int_value=v) if k == "steps" else pb.ParameterValue(double_value=v))
    client.create("stopping", spec)
    study = client.wait("stopping", timeout=300)
    assert study.state == pb.STUDY_STATE_SUCCEEDED, study
    trials = {t.number: t for t in client.trials("stopping")}
    states = {n: pb.TrialState.Name(t.state) for n, t in trials.items()}
    assert states == {1: "TRIAL_STATE_SUCCEEDED", 2: "TRIAL_STATE_SUCCEEDED", 3: "TRIAL_STATE_SUCCEEDED",
                      4: "TRIAL_STATE_EARLY_STOPPED", 5: "TRIAL_STATE_EARLY_STOPPED", 6: "TRIAL_STATE_SUCCEEDED"}
    full_run = 30 * 0.2
    for n in (4, 5):
        trial = trials[n]
        assert trial.reason == "EarlyStopped" and "median" in trial.message
        assert client.job(f"stopping-{n}").state == jobs_pb.JOB_STATE_CANCELLED
        ran = (trial.end_time.ToNanoseconds() - trial.start_time.ToNanoseconds()) / 1e9
        assert ran < full_run * 0.75, f"trial {n} ran {ran:.1f}s of a {full_run:.0f}s run"
        assert trial.objective_step < 29 and trial.objective_value > 300
    assert study.best_trial.number == 1 and study.trial_counts.early_stopped == 2


# --- kill -9 ------------------------------------------------------------------------------------


def test_tuner_killed_mid_study_resumes_and_runs_exactly_max_trials(stack, member, packages):
    client = stack.client(member.token, member.tenant)
    spec = pb.StudySpec(trial_template=plain_template(packages, steps=4, sleep=0.3), goal=pb.GOAL_MINIMIZE,
                        metric="objective", algorithm=pb.ALGORITHM_TPE, seed=3, max_trials=8,
                        max_parallel_trials=2, parameters=branin_space())
    client.create("resume", spec)

    def kill_when(done: int) -> TunerClient:
        """kill -9 the tuner once `done` trials succeeded while others run,
        then start a new one (it leads once the old lease expires)."""
        current = client
        deadline = time.monotonic() + 120
        while True:
            counts = current.get("resume").trial_counts
            if counts.succeeded >= done and counts.running + counts.pending >= 1:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
        stack.tuner.kill()
        stack.start_tuner()
        return stack.client(member.token, member.tenant)

    client = kill_when(2)
    client = kill_when(5)
    study = client.wait("resume", timeout=240)
    assert study.state == pb.STUDY_STATE_SUCCEEDED, study
    trials = client.trials("resume")
    assert [t.number for t in trials] == list(range(1, 9))
    assert all(t.state == pb.TRIAL_STATE_SUCCEEDED for t in trials), [(t.number, t.state, t.message) for t in trials]
    jobs = client.jobs.ListJobs(jobs_pb.ListJobsRequest(page_size=1000), metadata=client.md, timeout=20).jobs
    names = sorted(j.name for j in jobs if j.name.startswith("resume-"))
    assert names == sorted(f"resume-{n}" for n in range(1, 9))  # each trial's job exactly once
    assert all(j.attempts == 1 for j in jobs if j.name.startswith("resume-"))
    assert len({(p["x1"], p["x2"]) for p in map(params_of, trials)}) == 8


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_study_cancels_running_trials_and_returns_quota(client, member, auth_service, packages):
    spec = pb.StudySpec(trial_template=plain_template(packages, steps=100, sleep=0.2), goal=pb.GOAL_MINIMIZE,
                        metric="objective", algorithm=pb.ALGORITHM_RANDOM, seed=1, max_trials=4,
                        max_parallel_trials=2, parameters=branin_space())
    client.create("to-cancel", spec)
    deadline = time.monotonic() + 60
    while client.get("to-cancel").trial_counts.running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    study = client.cancel("to-cancel")
    assert study.state == pb.STUDY_STATE_CANCELLED
    trials = client.trials("to-cancel")
    assert [pb.TrialState.Name(t.state) for t in trials] == ["TRIAL_STATE_CANCELLED"] * 2
    for trial in trials:
        assert client.jobs.GetJob(jobs_pb.GetJobRequest(name=trial.job_name), metadata=client.md).job.state in (
            jobs_pb.JOB_STATE_CANCELLING, jobs_pb.JOB_STATE_CANCELLED)
    assert usage(auth_service, member.tenant).studies == 0
    assert client.cancel("to-cancel").state == pb.STUDY_STATE_CANCELLED  # again: unchanged
    time.sleep(1.5)  # the driver starts nothing more
    assert len(client.trials("to-cancel")) == 2
    client.call("DeleteStudy", pb.DeleteStudyRequest(name="to-cancel"))
    expect_error(Code.NOT_FOUND, client.get, "to-cancel")


# --- bad specs --------------------------------------------------------------------------------------


def _bad_spec(packages, **changes) -> pb.StudySpec:
    spec = pb.StudySpec(trial_template=plain_template(packages), goal=pb.GOAL_MINIMIZE, metric="objective",
                        algorithm=pb.ALGORITHM_TPE, max_trials=5, parameters=branin_space())
    for key, value in changes.items():
        if key == "parameters":
            del spec.parameters[:]
            spec.parameters.extend(value)
        elif key == "trainer_uri":  # a function of the uploaded package's URI
            spec.trial_template.trainer_uri = value(spec.trial_template.trainer_uri)
        elif key == "output_path":
            spec.trial_template.output_path = value
        else:
            setattr(spec, key, value)
    return spec


@pytest.mark.parametrize("changes, field", [
    (dict(parameters=[]), "spec.parameters"),
    (dict(parameters=[double("lr", 0.5, 0.1)]), "spec.parameters[0].double_range"),
    (dict(algorithm=42), "spec.algorithm"),
    (dict(goal=7), "spec.goal"),
    (dict(goal=pb.GOAL_UNSPECIFIED), "spec.goal"),
    (dict(parameters=[double("lr", 0.0, 0.1, log=True)]), "spec.parameters[0].double_range.min"),
    (dict(parameters=[categorical("opt")]), "spec.parameters[0].categorical.values"),
    (dict(metric=""), "spec.metric"),
    (dict(algorithm=pb.ALGORITHM_GRID), "spec.algorithm"),
    # In the tenant's storage, but no such file (found by the jobs service's check).
    (dict(trainer_uri=lambda uri: os.path.dirname(uri) + "-gone/trainer-1.0.tar.gz"),
     "spec.trial_template.trainer_uri"),
    (dict(trainer_uri=lambda uri: os.path.dirname(uri) + "/../x/trainer-1.0.tar.gz"),
     "spec.trial_template.trainer_uri"),
    (dict(trainer_uri=lambda uri: "s3://bucket/trainer-1.0.tar.gz"), "spec.trial_template.trainer_uri"),
    (dict(output_path="relative/out"), "spec.trial_template.output_path"),
], ids=["empty-space", "min-gt-max", "unknown-algorithm", "unknown-goal", "no-goal", "log-min-zero",
        "empty-categorical", "no-metric", "grid-over-double", "missing-package", "dotdot-package",
        "scheme-not-allowed", "relative-output"])
def test_create_study_bad_spec_is_invalid_argument_naming_the_field(client, packages, changes, field):
    err = expect_error(Code.INVALID_ARGUMENT, client.create, "bad", _bad_spec(packages, **changes))
    assert err.details().startswith(field) or f" {field}" in err.details(), err.details()
    expect_error(Code.NOT_FOUND, client.get, "bad")


@pytest.mark.parametrize("field, value", [
    ("trainer_uri", lambda uri, built: "file:///no/such/trainer-1.0.tar.gz"),
    ("trainer_uri", lambda uri, built: "file://" + built["plain"]),
    ("trainer_uri", lambda uri, built: uri.replace("/storage/hp-", "/storage/other-")),
    ("output_path", lambda uri, built: "/tmp/outside"),
], ids=["elsewhere", "built-on-this-machine", "another-tenants-storage", "output-elsewhere"])
def test_create_study_with_a_path_outside_the_tenants_storage_is_permission_denied(client, member, packages, built,
                                                                                   field, value):
    spec = _bad_spec(packages)
    setattr(spec.trial_template, field, value(spec.trial_template.trainer_uri, built))
    err = expect_error(Code.PERMISSION_DENIED, client.create, "outside", spec)
    assert err.details().startswith(f"spec.trial_template.{field}"), err.details()
    assert f"outside tenant {member.tenant!r}" in err.details(), err.details()
    expect_error(Code.NOT_FOUND, client.get, "outside")


def test_create_study_is_idempotent_and_names_conflict(client, packages):
    spec = pb.StudySpec(trial_template=plain_template(packages), goal=pb.GOAL_MINIMIZE, metric="objective",
                        algorithm=pb.ALGORITHM_RANDOM, max_trials=2, parameters=branin_space())
    first = client.create("twice", spec)
    again = client.create("twice", spec)
    assert first.created and not again.created and again.study.spec.seed == first.study.spec.seed
    other = pb.StudySpec()
    other.CopyFrom(spec)
    other.max_trials = 3
    expect_error(Code.ALREADY_EXISTS, client.create, "twice", other)
    client.wait("twice", timeout=120)
    expect_error(Code.INVALID_ARGUMENT, client.create, "x" * 53, spec)


def test_studies_quota_zero_is_resource_exhausted(client, member, auth_service, packages):
    limits = auth_service.admin.call("GetQuota", auth_pb.GetQuotaRequest(tenant=member.tenant)).limits
    limits.studies = 0
    auth_service.admin.call("SetQuota", auth_pb.SetQuotaRequest(tenant=member.tenant, limits=limits))
    spec = pb.StudySpec(trial_template=plain_template(packages), goal=pb.GOAL_MINIMIZE, metric="objective",
                        max_trials=2, parameters=branin_space())
    err = expect_error(Code.RESOURCE_EXHAUSTED, client.create, "no-quota", spec)
    assert "studies" in err.details()


# --- failures and the trial RPCs ----------------------------------------------------------------


def test_too_many_failed_trials_fail_the_study(client, packages):
    # --steps=0 makes the trainer exit 2 (a usage error): its job FAILS.
    spec = pb.StudySpec(trial_template=template(packages["plain"], "plain_trainer.task"), goal=pb.GOAL_MINIMIZE,
                        metric="objective", max_parallel_trials=1, max_failed_trials=2)
    for steps in (0, 1, 0, 1, 1):
        ps = spec.params.add()
        ps.values["x1"].double_value, ps.values["x2"].double_value = 1.0, 2.0
        ps.values["steps"].int_value = steps
    client.create("failing", spec)
    study = client.wait("failing", timeout=120)
    assert study.state == pb.STUDY_STATE_FAILED and study.reason == "TooManyFailedTrials", study
    trials = client.trials("failing")
    assert [pb.TrialState.Name(t.state) for t in trials] == [
        "TRIAL_STATE_FAILED", "TRIAL_STATE_SUCCEEDED", "TRIAL_STATE_FAILED"]
    assert trials[0].reason and "failed" in trials[0].message
    assert study.best_trial.number == 2 and study.trial_counts.failed == 2


def test_trial_rpcs_answer_with_status_codes(client, packages):
    spec = pb.StudySpec(trial_template=plain_template(packages), goal=pb.GOAL_MINIMIZE, metric="objective",
                        algorithm=pb.ALGORITHM_RANDOM, max_trials=1, parameters=branin_space())
    client.create("rpcs", spec)
    study = client.wait("rpcs", timeout=120)
    assert study.state == pb.STUDY_STATE_SUCCEEDED
    trial = client.call("GetTrial", pb.GetTrialRequest(study="rpcs", number=1)).trial
    assert trial.job_name == "rpcs-1" and trial.client_id == "driver-0" and trial.HasField("objective_value")
    expect_error(Code.NOT_FOUND, client.call, "GetTrial", pb.GetTrialRequest(study="rpcs", number=2))
    expect_error(Code.NOT_FOUND, client.call, "ListTrials", pb.ListTrialsRequest(study="nope"))
    expect_error(Code.FAILED_PRECONDITION, client.call, "SuggestTrials",
                 pb.SuggestTrialsRequest(study="rpcs", count=1, client_id="me"))
    expect_error(Code.INVALID_ARGUMENT, client.call, "SuggestTrials",
                 pb.SuggestTrialsRequest(study="rpcs", count=0, client_id="me"))
    assert client.call("ShouldStopTrial", pb.ShouldStopTrialRequest(study="rpcs", number=1)).should_stop is False
    listed = client.call("ListStudies", pb.ListStudiesRequest(states=[pb.STUDY_STATE_SUCCEEDED])).studies
    assert "rpcs" in [s.name for s in listed]
    page = client.call("ListStudies", pb.ListStudiesRequest(page_size=1))
    assert len(page.studies) == 1
    expect_error(Code.INVALID_ARGUMENT, client.call, "ListStudies", pb.ListStudiesRequest(page_token="%%%"))
    client.call("DeleteStudy", pb.DeleteStudyRequest(name="rpcs"))
    expect_error(Code.NOT_FOUND, client.get, "rpcs")
