"""cloudml hp: hyperparameter studies (submit, list, describe, trials, cancel, delete).

    cloudml hp submit -f hp.json
    cloudml hp submit -f hp.json --name linear-hp2 --max-trials 20 --parallel 2 --algorithm tpe
    cloudml hp list
    cloudml hp describe linear-hp
    cloudml hp trials linear-hp --state succeeded
    cloudml hp cancel linear-hp

`-f hp.json` takes the seed's layout: the train job's fields at the top level,
as for `cloudml jobs submit -f` (job_name, module_name, trainer_uri, job_args,
cpu_limit, memory_limit, ...), plus `hyperparameters: {goal, metric (or
hyperparameterMetricTag), params | parameters, algorithm, max_trials,
max_parallel_trials, max_failed_trials, early_stopping, seed, objective}`.
The study is named by job_name (or --name); trial n runs as the train job
"<study>-<n>" with its parameters appended as --name=value arguments.
"""
from __future__ import annotations

import argparse
import json

from cloudml.cli.base import (
    Context,
    UsageError,
    add_command,
    add_group,
    enum_label,
    format_time,
    message_to_dict,
    print_fields,
    print_table,
)

TENANT_HELP = "the tenant (default: your own)"
STUDY_STATES = ("running", "succeeded", "failed", "cancelled")
TRIAL_STATES = ("pending", "running", "succeeded", "failed", "early_stopped", "cancelled")
ALGORITHMS = ("grid", "random", "tpe", "cmaes", "explicit")
SUBMIT_DESCRIPTION = (
    "Create a hyperparameter study. -f takes the seed's layout: the train job's fields at the top level "
    "(job_name, module_name, trainer_uri, job_args, cpu_limit, memory_limit, ...) plus hyperparameters: "
    "{goal, metric, params | parameters, algorithm, max_trials, max_parallel_trials, max_failed_trials, "
    "early_stopping, seed}. Flags override the file."
)


def _pb():
    from cloudml.tuner.v1 import tuner_service_pb2

    return tuner_service_pb2


def _stub(ctx: Context):
    from cloudml.tuner.v1 import tuner_service_pb2_grpc

    return ctx.client.stub(tuner_service_pb2_grpc.TunerServiceStub)


def _call(ctx: Context, method: str, request):
    return ctx.client.call(getattr(_stub(ctx), method), request)


# --- the spec file -------------------------------------------------------------------------


def load_study_file(path: str, note=lambda message: None) -> tuple[dict, dict]:
    """(train job fields, hyperparameters) of a seed-layout JSON file."""
    from cloudml.cli.commands.jobs import SEED_FIELDS, SEED_IGNORED

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object")
    hyper = data.pop("hyperparameters", None)
    if hyper is None:
        raise UsageError(f"{path}: a study needs a `hyperparameters` object (goal, metric, params or parameters)")
    unknown = set(data) - SEED_FIELDS - SEED_IGNORED
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted(SEED_FIELDS | {'hyperparameters'}))}")
    ignored = set(data) & SEED_IGNORED
    if ignored:
        note(f"note: ignoring field(s) this platform does not use: {', '.join(sorted(ignored))}")
    return data, hyper


def _job_namespace(name: str) -> argparse.Namespace:
    """What `jobs.build_spec` reads from the command line: nothing but the name."""
    fields = ("module", "trainer_uri", "cpu", "memory", "gpus", "timeout", "args", "output_path", "docker_image",
              "master", "chief_count", "ps", "workers", "evaluator", "env", "restart_policy", "max_retries",
              "priority")
    return argparse.Namespace(name=name, chief=False, **{f: None for f in fields})


def build_study(args, job: dict, hyper: dict):
    """(name, StudySpec) from the file's parts and the flags."""
    from cloudml import hpspec
    from cloudml.cli.commands.jobs import build_spec

    pb = _pb()
    name = args.name or job.get("job_name")
    if not name:
        raise UsageError("a study needs a name: job_name in the file, or --name")
    _, template = build_spec(_job_namespace(str(name)), job)
    spec = pb.StudySpec(trial_template=template)
    try:
        hpspec.parse_hyperparameters(hyper, spec)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.max_trials is not None:
        spec.max_trials = args.max_trials
    if args.parallel is not None:
        spec.max_parallel_trials = args.parallel
    if args.algorithm:
        spec.algorithm = pb.Algorithm.Value(f"ALGORITHM_{args.algorithm.upper()}")
    if args.seed is not None:
        spec.seed = args.seed
    return str(name), spec


# --- registration ------------------------------------------------------------------------


def register(subparsers) -> None:
    hp = add_group(subparsers, "hp", "Hyperparameter tuning: studies whose trials run as train jobs")
    p = add_command(hp, "submit", submit, "Create a hyperparameter study", description=SUBMIT_DESCRIPTION)
    p.add_argument("-f", "--file", required=True, help="the study as JSON (the seed's layout)")
    p.add_argument("-n", "--name", help="the study's name (default: job_name of the file)")
    p.add_argument("--max-trials", type=int, help="trials to run in all")
    p.add_argument("--parallel", type=int, help="trials running at once (max_parallel_trials)")
    p.add_argument("--algorithm", choices=ALGORITHMS, help="how trials are suggested")
    p.add_argument("--seed", type=int, help="seed for reproducible suggestions")
    p.add_argument("--tenant", help=TENANT_HELP)

    p = add_command(hp, "list", list_, "List studies", aliases=["ls"])
    p.add_argument("--state", action="append", choices=STUDY_STATES, help="only studies in this state (repeatable)")
    p.add_argument("--tenant", help=TENANT_HELP)

    p = add_command(hp, "describe", describe, "Show a study: goal, trial count, best trial, every trial",
                    aliases=["get"])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tenant", help=TENANT_HELP)

    p = add_command(hp, "trials", trials, "List a study's trials")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--state", action="append", choices=TRIAL_STATES, help="only trials in this state (repeatable)")
    p.add_argument("--tenant", help=TENANT_HELP)

    p = add_command(hp, "cancel", cancel, "Cancel a study and every running trial")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tenant", help=TENANT_HELP)

    p = add_command(hp, "delete", delete, "Delete a finished study and its trials (their jobs are kept)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tenant", help=TENANT_HELP)

    from cloudml.cli.commands.tensorboard import register_hp_shortcut

    register_hp_shortcut(hp)


# --- presentation ----------------------------------------------------------------------------


def _value(v) -> str:
    kind = v.WhichOneof("kind")
    if kind == "double_value":
        x = v.double_value
        return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)
    if kind == "int_value":
        return str(v.int_value)
    return v.string_value


def params_text(params) -> str:
    return " ".join(f"{k}={_value(params[k])}" for k in sorted(params))


def _study_state(study) -> str:
    return enum_label(_pb().StudyState, study.state, "STUDY_STATE_")


def _trial_state(trial) -> str:
    return enum_label(_pb().TrialState, trial.state, "TRIAL_STATE_")


def _objective(trial) -> str:
    return f"{trial.objective_value:.6g}" if trial.HasField("objective_value") else ""


def _total(counts) -> int:
    return (counts.pending + counts.running + counts.succeeded + counts.failed + counts.early_stopped
            + counts.cancelled)


def _goal(spec) -> str:
    pb = _pb()
    goal = enum_label(pb.Goal, spec.goal, "GOAL_").upper()
    which = enum_label(pb.Objective, spec.objective or pb.OBJECTIVE_FINAL, "OBJECTIVE_")
    return f"{goal} {spec.metric} ({which} value)"


def _best(study) -> str:
    if not study.HasField("best_trial"):
        return ""
    best = study.best_trial
    return (f"trial {best.number}: {study.spec.metric}={best.objective_value:.6g} at step {best.objective_step}, "
            f"{params_text(best.params)} (job {best.job_name})")


def _study_row(study) -> list:
    counts = study.trial_counts
    best = study.best_trial
    return [study.name, _study_state(study), _goal(study.spec), f"{_total(counts)}/{study.spec.max_trials}",
            f"{best.objective_value:.6g} (#{best.number})" if study.HasField("best_trial") else "",
            format_time(study.create_time)]


STUDY_HEADERS = ["NAME", "STATE", "GOAL", "TRIALS", "BEST", "CREATED"]


def _trial_rows(trials, metric: str) -> tuple[list[str], list[list]]:
    headers = ["TRIAL", "STATE", metric.upper(), "STEP", "PARAMS", "JOB", "REASON"]
    rows = [[t.number, _trial_state(t), _objective(t), t.objective_step if t.HasField("objective_value") else "",
             params_text(t.params), t.job_name, t.reason] for t in trials]
    return headers, rows


def _all_trials(ctx: Context, name: str, states=()) -> list:
    pb = _pb()
    out, token = [], ""
    while True:
        page = _call(ctx, "ListTrials", pb.ListTrialsRequest(tenant=ctx.args.tenant or "", study=name,
                                                             states=list(states), page_size=1000, page_token=token))
        out.extend(page.trials)
        token = page.next_page_token
        if not token:
            return out


# --- handlers ----------------------------------------------------------------------------------


def submit(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    job, hyper = load_study_file(args.file, ctx.note)
    name, spec = build_study(args, job, hyper)
    from cloudml.cli.commands.jobs import upload_if_local  # a local package is uploaded first

    upload_if_local(ctx, job.get("trainer_uri"), spec.trial_template, args.tenant or "")
    resp = _call(ctx, "CreateStudy", pb.CreateStudyRequest(tenant=args.tenant or "", name=name, spec=spec))
    ctx.emit(message_to_dict(resp), table=(STUDY_HEADERS, [_study_row(resp.study)]))
    if not resp.created:
        ctx.note(f"note: study {name} already existed with this spec; nothing new was created")


def list_(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    states = [pb.StudyState.Value(f"STUDY_STATE_{s.upper()}") for s in args.state or []]
    studies, token = [], ""
    while True:
        page = _call(ctx, "ListStudies", pb.ListStudiesRequest(tenant=args.tenant or "", states=states,
                                                               page_size=1000, page_token=token))
        studies.extend(page.studies)
        token = page.next_page_token
        if not token:
            break
    ctx.emit([message_to_dict(s) for s in studies], table=(STUDY_HEADERS, [_study_row(s) for s in studies]))


def describe(ctx: Context) -> None:
    pb = _pb()
    study = _call(ctx, "GetStudy", pb.GetStudyRequest(tenant=ctx.args.tenant or "", name=ctx.args.name)).study
    trials = _all_trials(ctx, study.name)
    if ctx.json:
        ctx.emit({"study": message_to_dict(study), "trials": [message_to_dict(t) for t in trials]})
        return
    spec = study.spec
    counts = study.trial_counts
    tally = ", ".join(f"{n} {label}" for n, label in (
        (counts.succeeded, "succeeded"), (counts.failed, "failed"), (counts.early_stopped, "early stopped"),
        (counts.cancelled, "cancelled"), (counts.running, "running"), (counts.pending, "pending")) if n)
    algorithm = enum_label(pb.Algorithm, spec.algorithm, "ALGORITHM_")
    stopping = "off"
    if spec.early_stopping.enabled:
        stopping = (f"median rule after {spec.early_stopping.min_trials} completed trials, "
                    f"from step {spec.early_stopping.start_step}")
    print_fields([
        ("Study", study.name), ("Tenant", study.tenant), ("State", _study_state(study)),
        ("Reason", f"{study.reason} {study.message}".strip()),
        ("Goal", _goal(spec)), ("Algorithm", f"{algorithm} (seed {spec.seed})"),
        ("Trial count", f"{_total(counts)} of {spec.max_trials}, {spec.max_parallel_trials} in parallel"
                        + (f" ({tally})" if tally else "")),
        ("Best trial", _best(study)), ("Early stopping", stopping),
        ("Created", format_time(study.create_time)), ("Ended", format_time(study.end_time)),
    ], ctx.stdout)
    ctx.stdout.write("\nTrials:\n")
    headers, rows = _trial_rows(trials, spec.metric)
    print_table(headers, rows, ctx.stdout)


def trials(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    states = [pb.TrialState.Value(f"TRIAL_STATE_{s.upper()}") for s in args.state or []]
    study = _call(ctx, "GetStudy", pb.GetStudyRequest(tenant=args.tenant or "", name=args.name)).study
    found = _all_trials(ctx, args.name, states)
    ctx.emit([message_to_dict(t) for t in found], table=_trial_rows(found, study.spec.metric))


def cancel(ctx: Context) -> None:
    pb = _pb()
    study = _call(ctx, "CancelStudy", pb.CancelStudyRequest(tenant=ctx.args.tenant or "", name=ctx.args.name)).study
    ctx.emit(message_to_dict(study), table=(STUDY_HEADERS, [_study_row(study)]))


def delete(ctx: Context) -> None:
    pb = _pb()
    _call(ctx, "DeleteStudy", pb.DeleteStudyRequest(tenant=ctx.args.tenant or "", name=ctx.args.name))
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleted study {ctx.args.name}")
