"""A study's spec: validation, defaults, parameter values and trial arguments.

Pure functions of protobuf messages and plain values (no etcd, no gRPC), so
every rule is unit-tested on its own (tests/unit/test_tuner_validation.py).
Errors are `InvalidArgument` naming the field, e.g.
`spec.parameters[1].double_range.min`.
"""
from __future__ import annotations

import math
import re
import secrets
import shlex

from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.common import errors

STUDY_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: so that "<study>-<trial number>" stays a job name (DNS label of at most 63)
STUDY_NAME_MAX = 52
PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PARAM_NAME_MAX = 64
METRIC_RE = re.compile(r"[A-Za-z0-9_./-]{1,128}")
MAX_TRIALS = 10_000
MAX_PARALLEL = 100
MAX_PARAMETERS = 100
MAX_VALUES = 10_000
SEED_MAX = 2**32 - 1
DEFAULT_MIN_TRIALS = 5
RESERVED_PARAMS = frozenset({"output_path"})
#: environment variables a trial's job gets (besides what the jobs service sets)
STUDY_ENV, TRIAL_ENV = "CLOUDML_STUDY_NAME", "CLOUDML_TRIAL_NUMBER"

bad = errors.InvalidArgument


def check_study_name(name: str, field: str = "name") -> str:
    if not name:
        raise bad(f"{field} is required")
    if len(name) > STUDY_NAME_MAX or not STUDY_NAME_RE.fullmatch(name):
        raise bad(f"{field} {name!r} is invalid: use lower-case letters, digits and '-', starting and ending "
                  f"with a letter or digit, at most {STUDY_NAME_MAX} characters (trial jobs are named "
                  f"<study>-<trial number>)")
    return name


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


# --- parameter values -----------------------------------------------------------------


def value_of(message: pb.ParameterValue):
    """A ParameterValue as a Python float, int or str."""
    kind = message.WhichOneof("kind")
    if kind == "double_value":
        return message.double_value
    if kind == "int_value":
        return message.int_value
    if kind == "string_value":
        return message.string_value
    return None


def to_value(value) -> pb.ParameterValue:
    if isinstance(value, bool):
        return pb.ParameterValue(string_value=str(value).lower())
    if isinstance(value, int):
        return pb.ParameterValue(int_value=value)
    if isinstance(value, float):
        return pb.ParameterValue(double_value=value)
    if isinstance(value, str):
        return pb.ParameterValue(string_value=value)
    # numpy scalars and the like
    if hasattr(value, "item"):
        return to_value(value.item())
    raise TypeError(f"not a parameter value: {value!r}")


def format_value(value) -> str:
    """The command-line form: ints in decimal, doubles in their shortest
    round-trip form without a fraction when integral ("0.1", "1e-05", "32"),
    strings as they are."""
    if isinstance(value, pb.ParameterValue):
        value = value_of(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(value)
    return str(value)


def trial_args(params: dict) -> list[str]:
    """`--name=value` for each parameter, in name order."""
    return [f"--{name}={format_value(params[name])}" for name in sorted(params)]


# --- the search space -------------------------------------------------------------------


def int_values(r: pb.IntRange) -> list[int]:
    step = r.step or 1
    return list(range(r.min, r.max + 1, step))


def grid_of(spec: pb.StudySpec) -> dict[str, list]:
    """Every dimension's values for GRID (no double ranges), in spec order."""
    grid = {}
    for p in spec.parameters:
        kind = p.WhichOneof("domain")
        if kind == "int_range":
            grid[p.name] = int_values(p.int_range)
        elif kind == "categorical":
            grid[p.name] = list(p.categorical.values)
        elif kind == "discrete":
            grid[p.name] = list(p.discrete.values)
        else:
            raise bad(f"spec.parameters: GRID cannot enumerate the double range {p.name!r}")
    return grid


def grid_size(spec: pb.StudySpec) -> int:
    size = 1
    for values in grid_of(spec).values():
        size *= len(values)
    return size


def first_params(spec: pb.StudySpec) -> dict:
    """A representative parameter set (to check a trial's job up front)."""
    if spec.params:
        return {k: value_of(v) for k, v in spec.params[0].values.items()}
    params = {}
    for p in spec.parameters:
        kind = p.WhichOneof("domain")
        if kind == "double_range":
            params[p.name] = p.double_range.min
        elif kind == "int_range":
            params[p.name] = p.int_range.min
        elif kind == "categorical":
            params[p.name] = p.categorical.values[0]
        elif kind == "discrete":
            params[p.name] = p.discrete.values[0]
    return params


# --- validation ----------------------------------------------------------------------------


def _check_param_name(name: str, where: str, seen: set[str]) -> None:
    if not name:
        raise bad(f"{where} is required")
    if len(name) > PARAM_NAME_MAX or not PARAM_NAME_RE.fullmatch(name):
        raise bad(f"{where} {name!r} must match [A-Za-z_][A-Za-z0-9_]* (at most {PARAM_NAME_MAX} characters)")
    if name in RESERVED_PARAMS:
        raise bad(f"{where} {name!r} is reserved: the tuner sets --output_path for every trial")
    if name in seen:
        raise bad(f"{where} {name!r} is a duplicate parameter")
    seen.add(name)


def _check_parameter(p: pb.ParameterSpec, i: int, seen: set[str]) -> None:
    where = f"spec.parameters[{i}]"
    _check_param_name(p.name, f"{where}.name", seen)
    kind = p.WhichOneof("domain")
    if kind is None:
        raise bad(f"{where} ({p.name}) needs a domain: double_range, int_range, categorical or discrete")
    if kind == "double_range":
        r = p.double_range
        if not (math.isfinite(r.min) and math.isfinite(r.max)):
            raise bad(f"{where}.double_range: min and max must be finite numbers")
        if r.min > r.max:
            raise bad(f"{where}.double_range: min {r.min:g} > max {r.max:g}")
        if r.scale not in pb.Scale.values():
            raise bad(f"{where}.double_range.scale {r.scale} is not a Scale (LINEAR or LOG)")
        if r.scale == pb.SCALE_LOG and r.min <= 0:
            raise bad(f"{where}.double_range.min must be > 0 on a LOG scale (got {r.min:g})")
    elif kind == "int_range":
        r = p.int_range
        if r.step < 0:
            raise bad(f"{where}.int_range.step must be >= 1 (got {r.step})")
        if r.min > r.max:
            raise bad(f"{where}.int_range: min {r.min} > max {r.max}")
    elif kind == "categorical":
        values = list(p.categorical.values)
        if not values:
            raise bad(f"{where}.categorical.values is empty: list at least one value")
        if len(values) > MAX_VALUES:
            raise bad(f"{where}.categorical.values: at most {MAX_VALUES} values")
        if len(set(values)) != len(values):
            raise bad(f"{where}.categorical.values has duplicates")
    elif kind == "discrete":
        values = list(p.discrete.values)
        if not values:
            raise bad(f"{where}.discrete.values is empty: list at least one value")
        if len(values) > MAX_VALUES:
            raise bad(f"{where}.discrete.values: at most {MAX_VALUES} values")
        if not all(math.isfinite(v) for v in values):
            raise bad(f"{where}.discrete.values must be finite numbers")
        if len(set(values)) != len(values):
            raise bad(f"{where}.discrete.values has duplicates")


def _check_params(spec: pb.StudySpec) -> None:
    if len(spec.params) > MAX_TRIALS:
        raise bad(f"spec.params: at most {MAX_TRIALS} parameter sets")
    names = None
    for i, ps in enumerate(spec.params):
        where = f"spec.params[{i}]"
        if not ps.values:
            raise bad(f"{where} is empty: name at least one parameter")
        seen: set[str] = set()
        for name in sorted(ps.values):
            _check_param_name(name, f"{where}.values key", seen)
            if ps.values[name].WhichOneof("kind") is None:
                raise bad(f"{where}.values[{name!r}] has no value")
            value = value_of(ps.values[name])
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f"{where}.values[{name!r}] must be a finite number")
        if names is None:
            names = seen
        elif seen != names:
            raise bad(f"{where} names {sorted(seen)}, but spec.params[0] names {sorted(names)}; "
                      "every set names the same parameters")


def normalize(spec: pb.StudySpec, seed: int | None = None) -> pb.StudySpec:
    """Checks a study spec and returns it with defaults filled in (algorithm,
    seed, max_trials, max_parallel_trials, early_stopping.min_trials).
    `seed` is used when the spec has none (else a random one)."""
    out = pb.StudySpec()
    out.CopyFrom(spec)

    if not spec.HasField("trial_template"):
        raise bad("spec.trial_template is required: the train job every trial runs")
    try:
        shlex.split(spec.trial_template.job_args_line)
    except ValueError as err:
        raise bad(f"spec.trial_template.job_args_line cannot be split shell-style: {err}") from None
    for field in ("trainer_uri", "output_path"):
        # The shape only; the tuner and the jobs service confine both to the
        # tenant's storage (services.common.confine).
        value = getattr(spec.trial_template, field)
        if "::" in value or ".." in value.replace("://", "/").split("/"):
            raise bad(f"spec.trial_template.{field} {value!r}: '..' components and chained URIs ('::') "
                      "are not allowed")
    if spec.goal not in (pb.GOAL_MINIMIZE, pb.GOAL_MAXIMIZE):
        if spec.goal == pb.GOAL_UNSPECIFIED:
            raise bad("spec.goal is required: GOAL_MINIMIZE or GOAL_MAXIMIZE")
        raise bad(f"spec.goal {spec.goal} is not a Goal (GOAL_MINIMIZE or GOAL_MAXIMIZE)")
    if not spec.metric:
        raise bad("spec.metric is required: the metric name the trials report, e.g. loss")
    if not METRIC_RE.fullmatch(spec.metric):
        raise bad(f"spec.metric {spec.metric!r} must be 1..128 characters of [A-Za-z0-9_./-]")
    if spec.objective not in pb.Objective.values():
        raise bad(f"spec.objective {spec.objective} is not an Objective (OBJECTIVE_FINAL or OBJECTIVE_BEST)")
    if spec.objective == pb.OBJECTIVE_UNSPECIFIED:
        out.objective = pb.OBJECTIVE_FINAL
    if spec.algorithm not in pb.Algorithm.values():
        raise bad(f"spec.algorithm {spec.algorithm} is not an Algorithm "
                  "(GRID, RANDOM, TPE, CMAES or EXPLICIT)")

    if spec.params and spec.parameters:
        raise bad("spec.params and spec.parameters are both set: give an explicit list (params) "
                  "or a search space (parameters), not both")
    if not spec.params and not spec.parameters:
        raise bad("spec.parameters is empty: give a search space (parameters) or an explicit list (params)")

    if spec.params:
        _check_params(spec)
        if spec.algorithm not in (pb.ALGORITHM_UNSPECIFIED, pb.ALGORITHM_EXPLICIT):
            raise bad(f"spec.algorithm {_enum_name(pb.Algorithm, spec.algorithm)} needs a search space "
                      "(parameters); an explicit params list runs as ALGORITHM_EXPLICIT")
        out.algorithm = pb.ALGORITHM_EXPLICIT
        limit = len(spec.params)
    else:
        if len(spec.parameters) > MAX_PARAMETERS:
            raise bad(f"spec.parameters: at most {MAX_PARAMETERS} parameters")
        seen: set[str] = set()
        for i, p in enumerate(spec.parameters):
            _check_parameter(p, i, seen)
        if spec.algorithm == pb.ALGORITHM_EXPLICIT:
            raise bad("spec.algorithm ALGORITHM_EXPLICIT needs an explicit params list (spec.params)")
        if spec.algorithm == pb.ALGORITHM_UNSPECIFIED:
            out.algorithm = pb.ALGORITHM_TPE
        limit = None
        if out.algorithm == pb.ALGORITHM_GRID:
            for i, p in enumerate(spec.parameters):
                if p.WhichOneof("domain") == "double_range":
                    raise bad(f"spec.algorithm ALGORITHM_GRID cannot enumerate spec.parameters[{i}] ({p.name}), "
                              "a double range; use discrete values, or another algorithm")
            limit = grid_size(spec)
        for p in out.parameters:
            if p.WhichOneof("domain") == "int_range" and p.int_range.step == 0:
                p.int_range.step = 1

    if not 0 <= spec.max_trials <= MAX_TRIALS:
        raise bad(f"spec.max_trials must be within 1..{MAX_TRIALS} (got {spec.max_trials})")
    if spec.max_trials == 0:
        if limit is None:
            raise bad(f"spec.max_trials is required for {_enum_name(pb.Algorithm, out.algorithm)} "
                      f"(1..{MAX_TRIALS})")
        out.max_trials = min(limit, MAX_TRIALS)
    elif limit is not None and spec.max_trials > limit:
        what = "the params list" if spec.params else "the grid"
        raise bad(f"spec.max_trials {spec.max_trials} is more than the {limit} parameter set(s) of {what}")
    if not 0 <= spec.max_parallel_trials <= MAX_PARALLEL:
        raise bad(f"spec.max_parallel_trials must be within 1..{MAX_PARALLEL} (got {spec.max_parallel_trials})")
    out.max_parallel_trials = spec.max_parallel_trials or 1
    if spec.max_failed_trials < 0:
        raise bad(f"spec.max_failed_trials must not be negative (got {spec.max_failed_trials})")
    es = spec.early_stopping
    if es.min_trials < 0:
        raise bad(f"spec.early_stopping.min_trials must not be negative (got {es.min_trials})")
    if es.start_step < 0:
        raise bad(f"spec.early_stopping.start_step must not be negative (got {es.start_step})")
    if es.enabled and es.min_trials == 0:
        out.early_stopping.min_trials = DEFAULT_MIN_TRIALS

    if spec.HasField("seed"):
        if not 0 <= spec.seed <= SEED_MAX:
            raise bad(f"spec.seed must be within 0..{SEED_MAX} (got {spec.seed})")
    else:
        out.seed = seed if seed is not None else secrets.randbelow(SEED_MAX + 1)
    return out


# --- a trial's train job --------------------------------------------------------------------


def study_output(spec: pb.StudySpec, default: str) -> str:
    """Where trial n writes: <study output>/<n>; the template's output_path,
    else `default` (the platform's storage under the tenant and study)."""
    return (spec.trial_template.output_path or default).rstrip("/")


def trial_job_spec(spec: pb.StudySpec, study: str, number: int, params: dict, output: str,
                   with_env: bool = True) -> jobs_pb.TrainJobSpec:
    """The train job of trial `number`: the template, its job_args followed by
    one `--name=value` per parameter and `--output_path=<output>/<number>`,
    output_path set alike, and the study and trial in the environment."""
    job = jobs_pb.TrainJobSpec()
    job.CopyFrom(spec.trial_template)
    path = f"{output}/{number}"
    if job.job_args_line:  # the template's own arguments first, so the trial's come last
        job.job_args.extend(shlex.split(job.job_args_line))
        job.job_args_line = ""
    job.job_args.extend(trial_args(params))
    job.job_args.append(f"--output_path={path}")
    job.output_path = path
    if with_env:
        job.env[STUDY_ENV] = study
        job.env[TRIAL_ENV] = str(number)
    return job


def trial_job_name(study: str, number: int) -> str:
    return f"{study}-{number}"
