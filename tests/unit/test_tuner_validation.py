"""Study spec validation and defaults (services.tuner.spec), on plain messages."""
from __future__ import annotations

import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.common import errors
from services.tuner import spec as spec_mod


def template() -> jobs_pb.TrainJobSpec:
    return jobs_pb.TrainJobSpec(trainer_uri="file:///p/trainer-1.0.tar.gz", module_name="trainer.task",
                                job_args=["--max_epochs", "5"])


def double(name, lo, hi, log=False):
    return pb.ParameterSpec(name=name, double_range=pb.DoubleRange(
        min=lo, max=hi, scale=pb.SCALE_LOG if log else pb.SCALE_LINEAR))


def study(**fields) -> pb.StudySpec:
    spec = pb.StudySpec(trial_template=template(), goal=pb.GOAL_MINIMIZE, metric="loss", max_trials=10,
                        parameters=[double("lr", 1e-4, 1e-1, log=True),
                                    pb.ParameterSpec(name="optimizer", categorical=pb.CategoricalValues(
                                        values=["sgd", "ftrl"]))])
    for key, value in fields.items():
        if key in ("parameters", "params"):
            del getattr(spec, key)[:]
            getattr(spec, key).extend(value)
        elif key == "early_stopping":
            spec.early_stopping.CopyFrom(value)
        else:
            setattr(spec, key, value)
    return spec


def invalid(spec: pb.StudySpec) -> str:
    with pytest.raises(errors.InvalidArgument) as info:
        spec_mod.normalize(spec)
    return info.value.message


def param_set(**values) -> pb.ParameterSet:
    ps = pb.ParameterSet()
    for k, v in values.items():
        ps.values[k].CopyFrom(spec_mod.to_value(v))
    return ps


def test_defaults_fill_algorithm_seed_parallel_and_objective():
    out = spec_mod.normalize(study(), seed=99)
    assert out.algorithm == pb.ALGORITHM_TPE and out.seed == 99
    assert out.max_parallel_trials == 1 and out.objective == pb.OBJECTIVE_FINAL
    assert spec_mod.normalize(study()).HasField("seed")  # a random one, recorded


def test_explicit_params_default_to_their_count_and_explicit_algorithm():
    out = spec_mod.normalize(study(parameters=[], max_trials=0,
                                   params=[param_set(optimizer="ftrl", learning_rate=0.1),
                                           param_set(optimizer="sgd", learning_rate=0.5)]))
    assert out.algorithm == pb.ALGORITHM_EXPLICIT and out.max_trials == 2


def test_grid_defaults_to_its_size():
    spec = study(algorithm=pb.ALGORITHM_GRID, max_trials=0, parameters=[
        pb.ParameterSpec(name="optimizer", categorical=pb.CategoricalValues(values=["ftrl", "sgd"])),
        pb.ParameterSpec(name="learning_rate", discrete=pb.DiscreteValues(values=[0.1, 0.5])),
        pb.ParameterSpec(name="batch", int_range=pb.IntRange(min=32, max=128, step=32))])
    out = spec_mod.normalize(spec)
    assert out.max_trials == 2 * 2 * 4
    assert spec_mod.grid_of(out)["batch"] == [32, 64, 96, 128]


def test_early_stopping_min_trials_defaults_to_five():
    out = spec_mod.normalize(study(early_stopping=pb.EarlyStopping(enabled=True)))
    assert out.early_stopping.min_trials == 5


@pytest.mark.parametrize("fields, field", [
    (dict(parameters=[]), "spec.parameters"),
    (dict(parameters=[double("lr", 0.5, 0.1)]), "spec.parameters[0].double_range"),
    (dict(parameters=[pb.ParameterSpec(name="n", int_range=pb.IntRange(min=5, max=1))]), "spec.parameters[0].int_range"),
    (dict(algorithm=42), "spec.algorithm"),
    (dict(goal=7), "spec.goal"),
    (dict(goal=pb.GOAL_UNSPECIFIED), "spec.goal"),
    (dict(parameters=[double("lr", 0.0, 1.0, log=True)]), "spec.parameters[0].double_range.min"),
    (dict(parameters=[double("lr", -1.0, 1.0, log=True)]), "spec.parameters[0].double_range.min"),
    (dict(parameters=[pb.ParameterSpec(name="o", categorical=pb.CategoricalValues())]),
     "spec.parameters[0].categorical.values"),
    (dict(parameters=[pb.ParameterSpec(name="o", discrete=pb.DiscreteValues(values=[1, 1]))]),
     "spec.parameters[0].discrete.values"),
    (dict(parameters=[double("lr", 0, 1), double("lr", 0, 2)]), "spec.parameters[1].name"),
    (dict(parameters=[double("output_path", 0, 1)]), "spec.parameters[0].name"),
    (dict(parameters=[double("bad-name", 0, 1)]), "spec.parameters[0].name"),
    (dict(parameters=[pb.ParameterSpec(name="x")]), "spec.parameters[0]"),
    (dict(metric=""), "spec.metric"),
    (dict(metric="a b"), "spec.metric"),
    (dict(objective=9), "spec.objective"),
    (dict(max_trials=0), "spec.max_trials"),
    (dict(max_trials=10_001), "spec.max_trials"),
    (dict(max_parallel_trials=-1), "spec.max_parallel_trials"),
    (dict(max_failed_trials=-1), "spec.max_failed_trials"),
    (dict(seed=2**32), "spec.seed"),
    (dict(algorithm=pb.ALGORITHM_GRID), "spec.algorithm"),
    (dict(algorithm=pb.ALGORITHM_EXPLICIT), "spec.algorithm"),
    (dict(params=[param_set(lr=0.1)]), "spec.params and spec.parameters"),
    (dict(early_stopping=pb.EarlyStopping(enabled=True, start_step=-1)), "spec.early_stopping.start_step"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_spec_names_the_field(fields, field):
    message = invalid(study(**fields))
    assert message.startswith(field), message


def test_explicit_params_must_name_the_same_parameters():
    message = invalid(study(parameters=[], params=[param_set(a=1, b=2), param_set(a=1)]))
    assert message.startswith("spec.params[1]")
    message = invalid(study(parameters=[], max_trials=3, params=[param_set(a=1), param_set(a=2)]))
    assert message.startswith("spec.max_trials")
    message = invalid(study(parameters=[], algorithm=pb.ALGORITHM_TPE, params=[param_set(a=1)]))
    assert message.startswith("spec.algorithm")


def test_missing_template_and_bad_job_args_line():
    spec = study()
    spec.ClearField("trial_template")
    assert invalid(spec).startswith("spec.trial_template")
    spec = study()
    spec.trial_template.job_args_line = "--a 'unbalanced"
    assert invalid(spec).startswith("spec.trial_template.job_args_line")


def test_study_name_leaves_room_for_trial_numbers():
    spec_mod.check_study_name("a" * 52)
    with pytest.raises(errors.InvalidArgument):
        spec_mod.check_study_name("a" * 53)
    with pytest.raises(errors.InvalidArgument):
        spec_mod.check_study_name("Upper")


@pytest.mark.parametrize("value, text", [(0.1, "0.1"), (1e-05, "1e-05"), (32.0, "32"), (32, "32"), (-2.5, "-2.5"),
                                         ("ftrl", "ftrl"), (3.141592653589793, "3.141592653589793")])
def test_values_on_the_command_line(value, text):
    assert spec_mod.format_value(value) == text
    assert spec_mod.format_value(spec_mod.to_value(value)) == text


def test_trial_job_spec_appends_parameters_output_path_and_env():
    spec = spec_mod.normalize(study())
    spec.trial_template.job_args_line = "--batch_size 64"
    job = spec_mod.trial_job_spec(spec, "s", 3, {"optimizer": "sgd", "lr": 0.01}, "/data/s")
    assert list(job.job_args) == ["--max_epochs", "5", "--batch_size", "64", "--lr=0.01", "--optimizer=sgd",
                                  "--output_path=/data/s/3"]
    assert job.job_args_line == "" and job.output_path == "/data/s/3"
    assert dict(job.env) == {"CLOUDML_STUDY_NAME": "s", "CLOUDML_TRIAL_NUMBER": "3"}
    assert not spec_mod.trial_job_spec(spec, "s", 3, {}, "/o", with_env=False).env
    assert spec_mod.trial_job_name("s", 3) == "s-3"
    spec.trial_template.output_path = "s3://bucket/out/"
    assert spec_mod.study_output(spec, "/default") == "s3://bucket/out"
