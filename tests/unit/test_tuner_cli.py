"""`cloudml hp` without a platform: the seed-layout spec file, flags, and the
describe/trials/list output (the service is replaced by canned responses)."""
from __future__ import annotations

import json
import os

import pytest

from cloudml import hpspec
from cloudml.cli.commands import hp
from cloudml.cli.main import main
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.sdk.studies import Studies
from cloudml.sdk.types import parameter_text
from cloudml.tuner.v1 import tuner_service_pb2 as pb

SEED = {
    "job_name": "linear-hp",
    "module_name": "trainer.task",
    "trainer_uri": "s3://bucket/trainer-1.0.tar.gz",
    "job_args": "--max_epochs 10",
    "cpu_limit": "0.5",
    "memory_limit": "1G",
    "hyperparameters": {
        "goal": "MINIMIZE",
        "hyperparameterMetricTag": "loss",
        "params": [{"optimizer": "ftrl", "learning_rate": 0.1}, {"optimizer": "sgd", "learning_rate": 0.5}],
        "maxParallelTrials": 2,
    },
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("CLOUDML_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDML_CONFIG", str(tmp_path / "config.json"))
    # The SDK client is built (no call leaves: the service is faked below).
    monkeypatch.setenv("CLOUDML_ACCESS_KEY", "AKUNIT")
    monkeypatch.setenv("CLOUDML_SECRET_KEY", "unit-secret")


def fake_service(monkeypatch, fake):
    """Puts `fake` in place of the SDK's TunerService calls (client.studies)."""
    monkeypatch.setattr(Studies, "_rpc", lambda self, method, request: fake(self, method, request))
    return fake


def write(tmp_path, data) -> str:
    path = tmp_path / "hp.json"
    path.write_text(json.dumps(data))
    return str(path)


class FakeService:
    """Stands in for the SDK's TunerService calls: records requests, answers from canned data."""

    def __init__(self, study=None, trials=()):
        self.requests = []
        self.study = study
        self.trials = list(trials)

    def __call__(self, ctx, method, request):
        self.requests.append((method, request))
        if method == "CreateStudy":
            study = pb.Study(name=request.name, spec=request.spec, state=pb.STUDY_STATE_RUNNING)
            return pb.CreateStudyResponse(study=study, created=True)
        if method == "GetStudy":
            return pb.GetStudyResponse(study=self.study)
        if method == "ListTrials":
            return pb.ListTrialsResponse(trials=[t for t in self.trials
                                                 if not request.states or t.state in request.states])
        if method == "ListStudies":
            return pb.ListStudiesResponse(studies=[self.study])
        if method == "CancelStudy":
            return pb.CancelStudyResponse(study=self.study)
        raise AssertionError(method)


def test_seed_layout_becomes_a_study_spec(tmp_path, monkeypatch, capsys):
    fake = FakeService()
    fake_service(monkeypatch, fake)
    assert main(["hp", "submit", "-f", write(tmp_path, SEED), "-o", "json"]) == 0
    (method, request), = fake.requests
    assert method == "CreateStudy" and request.name == "linear-hp"
    spec = request.spec
    assert spec.goal == pb.GOAL_MINIMIZE and spec.metric == "loss" and spec.max_parallel_trials == 2
    assert [{k: parameter_text(v) for k, v in ps.values.items()} for ps in spec.params] == [
        {"optimizer": "ftrl", "learning_rate": "0.1"}, {"optimizer": "sgd", "learning_rate": "0.5"}]
    template = spec.trial_template
    assert template.module_name == "trainer.task" and list(template.job_args) == ["--max_epochs", "10"]
    assert template.replica_specs[0].type == jobs_pb.REPLICA_TYPE_MASTER
    assert template.replica_specs[0].resources.cpu_millis == 500
    assert template.replica_specs[0].resources.memory_bytes == 10**9
    assert json.loads(capsys.readouterr().out)["created"] is True


def test_flags_override_the_file(tmp_path, monkeypatch):
    fake = FakeService()
    fake_service(monkeypatch, fake)
    data = dict(SEED, hyperparameters={
        "goal": "maximize", "metric": "accuracy", "algorithm": "random", "max_trials": 5,
        "parameters": [
            {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 1e-4, "maxValue": 0.1,
             "scaleType": "UNIT_LOG_SCALE"},
            {"name": "optimizer", "type": "CATEGORICAL", "values": ["sgd", "adam"]},
            {"name": "units", "type": "INTEGER", "min": 8, "max": 64, "step": 8},
            {"name": "batch", "type": "DISCRETE", "discreteValues": [32, 64]},
        ],
        "early_stopping": {"min_trials": 3, "start_step": 2},
    })
    assert main(["hp", "submit", "-f", write(tmp_path, data), "--name", "other", "--max-trials", "20",
                 "--parallel", "3", "--algorithm", "tpe", "--seed", "42"]) == 0
    request = fake.requests[0][1]
    spec = request.spec
    assert request.name == "other" and spec.max_trials == 20 and spec.max_parallel_trials == 3
    assert spec.algorithm == pb.ALGORITHM_TPE and spec.seed == 42 and spec.goal == pb.GOAL_MAXIMIZE
    lr, optimizer, units, batch = spec.parameters
    assert lr.double_range == pb.DoubleRange(min=1e-4, max=0.1, scale=pb.SCALE_LOG)
    assert list(optimizer.categorical.values) == ["sgd", "adam"]
    assert units.int_range == pb.IntRange(min=8, max=64, step=8)
    assert list(batch.discrete.values) == [32.0, 64.0]
    assert spec.early_stopping == pb.EarlyStopping(enabled=True, min_trials=3, start_step=2)


@pytest.mark.parametrize("hyper, field", [
    ({"goal": "smallest"}, "hyperparameters.goal"),
    ({"algorithm": "hyperband"}, "hyperparameters.algorithm"),
    ({"parameters": [{"name": "x", "type": "COMPLEX"}]}, "hyperparameters.parameters[0].type"),
    ({"parameters": [{"name": "x", "type": "DOUBLE", "min": "a", "max": 1}]}, "hyperparameters.parameters[0].min"),
    ({"params": [{"lr": [1]}]}, "hyperparameters.params[0].lr"),
    ({"maxTrials": "many"}, "hyperparameters.max_trials"),
    ({"trials": 3}, "hyperparameters: unknown field"),
])
def test_bad_hyperparameters_name_the_field(hyper, field):
    with pytest.raises(ValueError) as info:
        hpspec.parse_hyperparameters(hyper)
    assert str(info.value).startswith(field), info.value


def test_file_errors_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["hp", "submit"])
    assert main(["hp", "submit", "-f", write(tmp_path, {"job_name": "x"})]) == 2
    assert "hyperparameters" in capsys.readouterr().err
    assert main(["hp", "submit", "-f", write(tmp_path, dict(SEED, bogus=1))]) == 2
    assert "bogus" in capsys.readouterr().err


def finished_study():
    spec = pb.StudySpec(goal=pb.GOAL_MINIMIZE, metric="loss", algorithm=pb.ALGORITHM_GRID, seed=7, max_trials=4,
                        max_parallel_trials=2)
    trials = []
    for n, (opt, lr, loss) in enumerate([("ftrl", 0.1, 0.05), ("sgd", 0.1, 0.002), ("ftrl", 0.5, 0.01),
                                         ("sgd", 0.5, 0.004)], start=1):
        trial = pb.Trial(study="linear-hp", number=n, state=pb.TRIAL_STATE_SUCCEEDED, objective_value=loss,
                         objective_step=9, job_name=f"linear-hp-{n}", reason="Succeeded")
        trial.params["optimizer"].string_value = opt
        trial.params["learning_rate"].double_value = lr
        trials.append(trial)
    study = pb.Study(name="linear-hp", tenant="team", spec=spec, state=pb.STUDY_STATE_SUCCEEDED,
                     reason="Succeeded", best_trial=trials[1], trial_counts=pb.TrialCounts(succeeded=4))
    return study, trials


def test_describe_shows_goal_count_best_trial_then_every_trial(monkeypatch, capsys):
    study, trials = finished_study()
    fake_service(monkeypatch, FakeService(study, trials))
    assert main(["hp", "describe", "linear-hp"]) == 0
    out = capsys.readouterr().out
    assert "Goal:" in out and "MINIMIZE loss (final value)" in out
    assert "Trial count:" in out and "4 of 4" in out
    assert "Best trial:" in out and "trial 2: loss=0.002 at step 9, learning_rate=0.1 optimizer=sgd" in out
    lines = out.split("Trials:\n", 1)[1].splitlines()
    assert lines[0].split() == ["TRIAL", "STATE", "LOSS", "STEP", "PARAMS", "JOB", "REASON"]
    assert lines[2].split()[:4] == ["2", "succeeded", "0.002", "9"] and len(lines) == 5

    assert main(["hp", "describe", "linear-hp", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["study"]["best_trial"]["number"] == 2 and len(data["trials"]) == 4


def test_trials_list_and_cancel(monkeypatch, capsys):
    study, trials = finished_study()
    fake = FakeService(study, trials)
    fake_service(monkeypatch, fake)
    assert main(["hp", "trials", "linear-hp", "--state", "succeeded", "-o", "json"]) == 0
    assert [t["number"] for t in json.loads(capsys.readouterr().out)] == [1, 2, 3, 4]
    assert list(fake.requests[-1][1].states) == [pb.TRIAL_STATE_SUCCEEDED]
    assert main(["hp", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "STATE", "GOAL", "TRIALS", "BEST", "CREATED"]
    assert "linear-hp" in out and "4/4" in out and "0.002 (#2)" in out
    assert main(["hp", "cancel", "linear-hp", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "STUDY_STATE_SUCCEEDED"


def test_watch_prints_progress_and_exits_by_the_end_state(monkeypatch, capsys):
    study, trials = finished_study()
    fake_service(monkeypatch, FakeService(study, trials))
    assert main(["hp", "watch", "linear-hp"]) == 0
    err = capsys.readouterr().err
    assert ("succeeded  4/4 trials done (4 succeeded), 0 running, 0 queued; best loss=0.002 "
            "(trial 2: learning_rate=0.1 optimizer=sgd)") in err, err
    assert err.splitlines()[-1] == "study linear-hp: SUCCEEDED Succeeded"
    failed = pb.Study(name="broken", spec=study.spec, state=pb.STUDY_STATE_FAILED, reason="TooManyFailedTrials",
                      trial_counts=pb.TrialCounts(failed=2, pending=1))
    fake_service(monkeypatch, FakeService(failed))
    assert main(["hp", "watch", "broken"]) == 1
    err = capsys.readouterr().err
    assert "0/4 trials done (2 failed), 0 running, 1 queued" not in err  # failed trials are done
    assert "2/4 trials done (2 failed), 0 running, 1 queued" in err, err
    assert err.splitlines()[-1] == "study broken: FAILED TooManyFailedTrials"
