"""Hyperparameter study specs from the seed's JSON layout (`cloudml hp submit -f`).

The train job's fields sit at the top level, as for `cloudml jobs submit -f`
(job_name, module_name, trainer_uri, job_args, cpu_limit, memory_limit, ...),
plus a `hyperparameters` object:

    {
      "job_name": "linear-hp",
      "module_name": "trainer.task",
      "trainer_uri": "./trainer-1.0.tar.gz",
      "job_args": "--max_epochs 10",
      "cpu_limit": "1", "memory_limit": "2G",
      "hyperparameters": {
        "goal": "MINIMIZE",
        "hyperparameterMetricTag": "loss",
        "params": [{"optimizer": "ftrl", "learning_rate": 0.1},
                   {"optimizer": "sgd", "learning_rate": 0.5}],
        "maxParallelTrials": 2
      }
    }

`hyperparameters` keys (snake_case or the seed's / Cloud ML Engine's camelCase):
  goal                     MINIMIZE | MAXIMIZE
  metric                   the metric the trials report (alias hyperparameterMetricTag)
  objective                final (default: the value at the last step) | best
  params                   EITHER the seed's explicit runs, each run once:
                             [{"optimizer": "ftrl", "learning_rate": 0.1}, ...]
                           OR Cloud ML Engine's search space (told apart by
                           "parameterName" in every item):
                             [{"parameterName": "lr", "type": "DOUBLE",
                               "minValue": 1e-4, "maxValue": 0.1,
                               "scaleType": "UNIT_LOG_SCALE"}, ...]
  parameters               a search space: [{name, type, ...}], type one of
                             DOUBLE      min, max, scale (LINEAR | LOG)
                             INTEGER     min, max, step
                             CATEGORICAL values
                             DISCRETE    values (numbers)
                           (Cloud ML Engine's parameterName/minValue/maxValue/
                           scaleType/categoricalValues/discreteValues are accepted)
  algorithm                grid | random | tpe | cmaes | explicit (and Cloud ML
                           Engine's GRID_SEARCH, RANDOM_SEARCH, ALGORITHM_UNSPECIFIED = tpe)
  seed                     makes the suggestions reproducible
  max_trials, max_parallel_trials, max_failed_trials
  early_stopping           true, or {enabled, min_trials, start_step}

A list mixing runs and parameter specs, or a search space given twice
(`params` and `parameters`), is refused with the two shapes shown.

`parse_hyperparameters` raises `ValueError` naming the field
(`hyperparameters.parameters[1].type`); the service checks the rest and
answers INVALID_ARGUMENT naming the field of the StudySpec.
"""
from __future__ import annotations

from typing import Any

GOALS = ("minimize", "maximize")
ALGORITHMS = ("grid", "random", "tpe", "cmaes", "explicit")
OBJECTIVES = ("final", "best")
TYPES = ("double", "integer", "categorical", "discrete")
_ALIASES = {
    "hyperparameterMetricTag": "metric", "hyperparameter_metric_tag": "metric", "metricTag": "metric",
    "maxTrials": "max_trials", "maxParallelTrials": "max_parallel_trials", "maxFailedTrials": "max_failed_trials",
    "earlyStopping": "early_stopping", "enableTrialEarlyStopping": "early_stopping",
}
KNOWN = {"goal", "metric", "objective", "params", "parameters", "algorithm", "seed", "max_trials",
         "max_parallel_trials", "max_failed_trials", "early_stopping"}
_PARAM_ALIASES = {"parameterName": "name", "minValue": "min", "maxValue": "max", "scaleType": "scale",
                  "categoricalValues": "values", "discreteValues": "values"}
_TYPE_ALIASES = {"int": "integer", "float": "double", "real": "double"}
_ALGORITHM_ALIASES = {"grid_search": "grid", "random_search": "random", "algorithm_unspecified": "tpe",
                      "bayesian": "tpe"}
RUNS_SHAPE = '"params": [{"optimizer": "ftrl", "learning_rate": 0.1}, {"optimizer": "sgd", "learning_rate": 0.5}]'
SPACE_SHAPE = ('"params": [{"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, '
               '"maxValue": 0.1, "scaleType": "UNIT_LOG_SCALE"}, {"parameterName": "optimizer", '
               '"type": "CATEGORICAL", "categoricalValues": ["ftrl", "sgd"]}]')
SHAPES = f"explicit runs: {RUNS_SHAPE}; or a search space: {SPACE_SHAPE}"
_SCALES = {"linear": "LINEAR", "unit_linear_scale": "LINEAR", "log": "LOG", "unit_log_scale": "LOG"}


def _pb():
    from cloudml.tuner.v1 import tuner_service_pb2

    return tuner_service_pb2


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number (got {value!r})")
    return float(value)


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{field} must be a whole number (got {value!r})")
    return value


def parameter_value(value: Any, field: str):
    """A JSON value as a ParameterValue: whole numbers as ints, other numbers
    as doubles, strings as they are (true/false as "true"/"false")."""
    pb = _pb()
    if isinstance(value, bool):
        return pb.ParameterValue(string_value="true" if value else "false")
    if isinstance(value, int):
        return pb.ParameterValue(int_value=value)
    if isinstance(value, float):
        return pb.ParameterValue(double_value=value)
    if isinstance(value, str):
        return pb.ParameterValue(string_value=value)
    raise ValueError(f"{field} must be a number or a string (got {value!r})")


def _parameter(raw: Any, i: int):
    pb = _pb()
    where = f"hyperparameters.parameters[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object such as {{\"name\": \"lr\", \"type\": \"DOUBLE\", ...}}")
    data = {_PARAM_ALIASES.get(k, k): v for k, v in raw.items()}
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name is required")
    kind = str(data.get("type", "")).lower()
    kind = _TYPE_ALIASES.get(kind, kind)
    if not kind and "values" in data:
        kind = "categorical" if all(isinstance(v, str) for v in data["values"]) else "discrete"
    spec = pb.ParameterSpec(name=name)
    if kind == "double":
        scale = str(data.get("scale", "linear")).lower()
        if scale not in _SCALES:
            raise ValueError(f"{where}.scale {data.get('scale')!r}: expected LINEAR or LOG "
                             "(UNIT_LINEAR_SCALE or UNIT_LOG_SCALE)")
        spec.double_range.CopyFrom(pb.DoubleRange(
            min=_number(data.get("min"), f"{where}.min"), max=_number(data.get("max"), f"{where}.max"),
            scale=pb.Scale.Value(f"SCALE_{_SCALES[scale]}")))
    elif kind == "integer":
        spec.int_range.CopyFrom(pb.IntRange(
            min=_integer(data.get("min"), f"{where}.min"), max=_integer(data.get("max"), f"{where}.max"),
            step=_integer(data.get("step", 1), f"{where}.step")))
    elif kind == "categorical":
        values = data.get("values")
        if not isinstance(values, list):
            raise ValueError(f"{where}.values must be a list")
        spec.categorical.values.extend(str(v) for v in values)
        if not values:
            spec.categorical.SetInParent()
    elif kind == "discrete":
        values = data.get("values")
        if not isinstance(values, list):
            raise ValueError(f"{where}.values must be a list of numbers")
        spec.discrete.values.extend(_number(v, f"{where}.values[{j}]") for j, v in enumerate(values))
        if not values:
            spec.discrete.SetInParent()
    else:
        raise ValueError(f"{where}.type {data.get('type')!r}: expected one of {', '.join(t.upper() for t in TYPES)}")
    return spec


def _enum(value: Any, field: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"{field} {value!r}: expected one of {', '.join(c.upper() for c in choices)}")
    return text.upper()


def _looks_like_parameter_spec(item: Any) -> bool:
    """An item of Cloud ML Engine's search space rather than one run."""
    return isinstance(item, dict) and "parameterName" in item


def _is_search_space(params: Any) -> bool:
    """True when every item of `params` is a parameter spec, False when none
    is; ValueError (showing both shapes) when they are mixed."""
    if not isinstance(params, list) or not params:
        return False
    specs = [_looks_like_parameter_spec(p) for p in params]
    if all(specs):
        return True
    if any(specs):
        first_run = specs.index(False)
        raise ValueError(f"hyperparameters.params[{first_run}]: the list mixes parameter specs "
                         f"(parameterName) and runs; use one shape. {SHAPES}")
    for i, item in enumerate(params):
        if not isinstance(item, dict) or "name" not in item:
            continue
        kind = str(item.get("type", "")).strip().lower()
        if _TYPE_ALIASES.get(kind, kind) in TYPES or {"minValue", "maxValue", "categoricalValues",
                                                      "discreteValues", "scaleType"} & set(item):
            raise ValueError(f"hyperparameters.params[{i}] looks like a parameter spec without parameterName; "
                             f"write \"parameterName\", or put specs under \"parameters\". {SHAPES}")
    return False


def parse_hyperparameters(raw: Any, spec=None):
    """Fills a StudySpec (new, or `spec`) from the `hyperparameters` object."""
    pb = _pb()
    spec = spec if spec is not None else pb.StudySpec()
    if not isinstance(raw, dict):
        raise ValueError("hyperparameters must be an object with goal, metric and params or parameters")
    data = {}
    for key, value in raw.items():
        key = _ALIASES.get(key, key)
        if key not in KNOWN:
            raise ValueError(f"hyperparameters: unknown field {key!r}; known: {', '.join(sorted(KNOWN))}")
        data[key] = value
    if "goal" in data:
        spec.goal = pb.Goal.Value("GOAL_" + _enum(data["goal"], "hyperparameters.goal", GOALS))
    if "metric" in data:
        spec.metric = str(data["metric"])
    if "objective" in data:
        spec.objective = pb.Objective.Value("OBJECTIVE_" + _enum(data["objective"], "hyperparameters.objective",
                                                                  OBJECTIVES))
    if "algorithm" in data:
        algorithm = _ALGORITHM_ALIASES.get(str(data["algorithm"]).strip().lower(), data["algorithm"])
        spec.algorithm = pb.Algorithm.Value("ALGORITHM_" + _enum(algorithm, "hyperparameters.algorithm",
                                                                  ALGORITHMS))
    if "params" in data and _is_search_space(data["params"]):
        if "parameters" in data:
            raise ValueError("hyperparameters: both params (here a search space) and parameters give a search "
                             f"space; keep one. Shapes: {SHAPES}")
        data["parameters"] = data.pop("params")
    if "params" in data:
        params = data["params"]
        if not isinstance(params, list):
            raise ValueError(f"hyperparameters.params must be a list of objects; {SHAPES}")
        for i, item in enumerate(params):
            if not isinstance(item, dict):
                raise ValueError(f"hyperparameters.params[{i}] must be an object of name: value")
            ps = spec.params.add()
            for name, value in item.items():
                ps.values[str(name)].CopyFrom(parameter_value(value, f"hyperparameters.params[{i}].{name}"))
    if "parameters" in data:
        if not isinstance(data["parameters"], list):
            raise ValueError("hyperparameters.parameters must be a list of parameter objects")
        spec.parameters.extend(_parameter(p, i) for i, p in enumerate(data["parameters"]))
    for key in ("max_trials", "max_parallel_trials", "max_failed_trials"):
        if key in data:
            setattr(spec, key, _integer(data[key], f"hyperparameters.{key}"))
    if "seed" in data:
        spec.seed = _integer(data["seed"], "hyperparameters.seed")
    es = data.get("early_stopping")
    if isinstance(es, bool):
        spec.early_stopping.enabled = es
    elif isinstance(es, dict):
        unknown = set(es) - {"enabled", "min_trials", "start_step", "minTrials", "startStep"}
        if unknown:
            raise ValueError(f"hyperparameters.early_stopping: unknown field(s) {', '.join(sorted(unknown))}")
        spec.early_stopping.enabled = bool(es.get("enabled", True))
        spec.early_stopping.min_trials = _integer(es.get("min_trials", es.get("minTrials", 0)),
                                                  "hyperparameters.early_stopping.min_trials")
        spec.early_stopping.start_step = _integer(es.get("start_step", es.get("startStep", 0)),
                                                  "hyperparameters.early_stopping.start_step")
    elif es is not None:
        raise ValueError("hyperparameters.early_stopping must be true/false or {enabled, min_trials, start_step}")
    return spec


# --- a whole study file ------------------------------------------------------------------


def split_study(data: dict, where: str, note=lambda message: None) -> tuple[dict, dict]:
    """(train job fields, hyperparameters) of a study in the seed's layout:
    the job's fields at the top level plus a `hyperparameters` object."""
    from cloudml.errors import SpecError
    from cloudml.specs import check_seed_fields

    if not isinstance(data, dict):
        raise SpecError(f"{where} must hold a JSON object")
    data = dict(data)
    hyper = data.pop("hyperparameters", None)
    if hyper is None:
        raise SpecError(f"{where}: a study needs a `hyperparameters` object (goal, metric, params or parameters)")
    check_seed_fields(data, where, note, extra=frozenset({"hyperparameters"}))
    return data, hyper


def load_study_file(path: str, note=lambda message: None) -> tuple[dict, dict]:
    """(train job fields, hyperparameters) of a seed-layout JSON file."""
    from cloudml.specs import read_json_object

    return split_study(read_json_object(path), path, note)


def build_study(job: dict, hyper: dict, *, name: str | None = None, max_trials: int | None = None,
                parallel: int | None = None, algorithm: str | None = None, seed: int | None = None):
    """(name, StudySpec) from a study's parts; the keywords override the file."""
    from cloudml.errors import SpecError
    from cloudml.specs import build_spec, flags

    pb = _pb()
    name = name or job.get("job_name")
    if not name:
        raise SpecError("a study needs a name: job_name in the file, or --name")
    _, template = build_spec(flags(name=str(name)), job)
    spec = pb.StudySpec(trial_template=template)
    try:
        parse_hyperparameters(hyper, spec)
    except ValueError as err:
        raise SpecError(str(err)) from None
    if max_trials is not None:
        spec.max_trials = max_trials
    if parallel is not None:
        spec.max_parallel_trials = parallel
    if algorithm:
        spec.algorithm = pb.Algorithm.Value(f"ALGORITHM_{algorithm.upper()}")
    if seed is not None:
        spec.seed = seed
    return str(name), spec
