"""Study spec files: the seed's layout (explicit runs under `params`) and
Cloud ML Engine's (parameter specs under `params`), the shipped
examples/studies/*.json, ambiguous specs refused with the right shapes shown,
and `cloudml hp submit --help`."""
from __future__ import annotations

import glob
import json
import os

import pytest

from cloudml import errors, hpspec
from cloudml.cli.main import main
from cloudml.tuner.v1 import tuner_service_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDIES = sorted(glob.glob(os.path.join(ROOT, "examples", "studies", "*.json")))


@pytest.fixture(autouse=True)
def packages_here(tmp_path, monkeypatch):
    """The example files name ./pkgs/*.tar.gz, as `python examples/build_packages.py pkgs` leaves them."""
    (tmp_path / "pkgs").mkdir()
    for name in ("trainer-1.0.tar.gz", "plain_trainer-1.0.tar.gz"):
        (tmp_path / "pkgs" / name).write_bytes(b"an sdist")
    monkeypatch.chdir(tmp_path)


def build(data: dict):
    job, hyper = hpspec.split_study(data, "study.json")
    return hpspec.build_study(job, hyper)


def test_every_example_study_parses_into_a_valid_spec():
    assert [os.path.basename(p) for p in STUDIES] == ["linear_runs.json", "linear_space.json", "plain_space.json"]
    for path in STUDIES:
        job, hyper = hpspec.load_study_file(path)
        name, spec = hpspec.build_study(job, hyper)
        assert name == json.load(open(path))["job_name"]
        assert spec.goal == pb.GOAL_MINIMIZE and spec.metric and spec.max_parallel_trials == 2
        assert spec.trial_template.module_name and spec.trial_template.replica_specs
        assert bool(spec.params) != bool(spec.parameters), path  # runs or a search space, never both


def test_seed_runs_stay_runs():
    _, spec = hpspec.build_study(*hpspec.load_study_file(os.path.join(ROOT, "examples", "studies",
                                                                        "linear_runs.json")))
    assert len(spec.params) == 4 and not spec.parameters
    assert spec.params[0].values["optimizer"].string_value == "ftrl"
    assert spec.params[1].values["learning_rate"].double_value == 0.5


def test_cloud_ml_engine_params_are_a_search_space():
    _, spec = hpspec.build_study(*hpspec.load_study_file(os.path.join(ROOT, "examples", "studies",
                                                                        "linear_space.json")))
    assert not spec.params and spec.max_trials == 8 and spec.algorithm == pb.ALGORITHM_TPE
    lr, optimizer, batch = spec.parameters
    assert lr.name == "learning_rate" and lr.double_range == pb.DoubleRange(min=0.001, max=0.5, scale=pb.SCALE_LOG)
    assert list(optimizer.categorical.values) == ["sgd", "ftrl"]
    assert list(batch.discrete.values) == [32.0, 64.0, 128.0]
    _, grid = hpspec.build_study(*hpspec.load_study_file(os.path.join(ROOT, "examples", "studies",
                                                                        "plain_space.json")))
    assert grid.algorithm == pb.ALGORITHM_GRID and [p.name for p in grid.parameters] == ["x1", "x2"]


def test_cloud_ml_engine_integer_and_random_search():
    _, spec = build({"job_name": "s", "module_name": "m", "trainer_uri": "s3://b/t.tar.gz", "hyperparameters": {
        "goal": "MAXIMIZE", "hyperparameterMetricTag": "accuracy", "maxTrials": 6, "algorithm": "RANDOM_SEARCH",
        "enableTrialEarlyStopping": True,
        "params": [{"parameterName": "units", "type": "INTEGER", "minValue": 8, "maxValue": 64}]}})
    assert spec.algorithm == pb.ALGORITHM_RANDOM and spec.early_stopping.enabled and spec.goal == pb.GOAL_MAXIMIZE
    assert spec.parameters[0].int_range == pb.IntRange(min=8, max=64, step=1)


@pytest.mark.parametrize("params, fragment", [
    # a run and a parameter spec in one list
    ([{"parameterName": "lr", "type": "DOUBLE", "minValue": 0.1, "maxValue": 1}, {"lr": 0.5}],
     "hyperparameters.params[1]: the list mixes parameter specs"),
    # a spec written with "name": it would silently run as --name=lr --type=DOUBLE
    ([{"name": "lr", "type": "DOUBLE", "minValue": 0.1, "maxValue": 1}],
     "hyperparameters.params[0] looks like a parameter spec without parameterName"),
    ([{"parameterName": "lr", "type": "DOUBLE", "minValue": 0.1, "maxValue": 1, "scaleType": "UNIT_REVERSE_LOG_SCALE"}],
     "hyperparameters.parameters[0].scale 'UNIT_REVERSE_LOG_SCALE'"),
    ([{"parameterName": "lr", "type": "FLOATY"}], "hyperparameters.parameters[0].type 'FLOATY'"),
])
def test_ambiguous_or_bad_params_are_refused_showing_the_shapes(params, fragment):
    with pytest.raises(errors.SpecError) as info:
        build({"job_name": "s", "module_name": "m", "trainer_uri": "s3://b/t.tar.gz",
               "hyperparameters": {"goal": "MINIMIZE", "metric": "loss", "params": params}})
    message = str(info.value)
    assert message.startswith(fragment), message
    if "mixes" in message or "looks like" in message:
        assert '"parameterName": "learning_rate", "type": "DOUBLE"' in message and '{"optimizer": "ftrl"' in message


def test_a_search_space_given_twice_is_refused():
    with pytest.raises(errors.SpecError, match="both params .* and parameters"):
        build({"job_name": "s", "module_name": "m", "trainer_uri": "s3://b/t.tar.gz", "hyperparameters": {
            "params": [{"parameterName": "a", "type": "DISCRETE", "discreteValues": [1]}],
            "parameters": [{"name": "b", "type": "DISCRETE", "values": [1]}]}})


def test_hp_submit_help_tells_the_two_shapes_of_params_apart(capsys):
    with pytest.raises(SystemExit):
        main(["hp", "submit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "params | parameters" not in text
    assert '"params" as explicit runs' in text and '"params" as Cloud ML Engine\'s search space' in text
    assert '"parameterName": "learning_rate", "type": "DOUBLE"' in text and "examples/studies/" in text


def test_a_bad_study_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLOUDML_CONFIG", str(tmp_path / "none.json"))
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"job_name": "s", "module_name": "m", "trainer_uri": "s3://b/t.tar.gz",
                                "hyperparameters": {"params": [{"name": "lr", "type": "DOUBLE", "minValue": 0.1}]}}))
    assert main(["hp", "submit", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: hyperparameters.params[0] looks like a parameter spec")
