"""cloudml hp: hyperparameter studies (submit, list, describe, trials, cancel, delete).

    cloudml hp submit -f examples/studies/plain_space.json --watch
    cloudml hp watch plain-space
    cloudml hp submit -f hp.json --name linear-hp2 --max-trials 20 --parallel 2 --algorithm tpe
    cloudml hp list
    cloudml hp describe linear-hp
    cloudml hp trials linear-hp --state succeeded
    cloudml hp cancel linear-hp

`-f hp.json` takes the seed's layout: the train job's fields at the top level,
as for `cloudml jobs submit -f` (job_name, module_name, trainer_uri, job_args,
cpu_limit, memory_limit, ...), plus `hyperparameters: {goal, metric (or
hyperparameterMetricTag), params, parameters, algorithm, max_trials,
max_parallel_trials, max_failed_trials, early_stopping, seed, objective}`,
where `params` holds either explicit runs (the seed's) or Cloud ML Engine's
parameter specs (items with "parameterName"), and `parameters` a search
space with short keys; see `cloudml.hpspec` and examples/studies/.
The study is named by job_name (or --name); trial n runs as the train job
"<study>-<n>" with its parameters appended as --name=value arguments.
"""
from __future__ import annotations

from cloudml.cli.base import (
    Context,
    add_command,
    add_group,
    enum_label,
    format_time,
    message_to_dict,
    print_fields,
    print_table,
)
from cloudml.sdk.types import params_text

TENANT_HELP = "the tenant (default: your own)"
STUDY_STATES = ("running", "succeeded", "failed", "cancelled")
TRIAL_STATES = ("pending", "running", "succeeded", "failed", "early_stopped", "cancelled")
ALGORITHMS = ("grid", "random", "tpe", "cmaes", "explicit")
SUBMIT_DESCRIPTION = (
    "Create a hyperparameter study from a JSON file (see examples/studies/): the train job's fields at the top "
    "level (job_name, module_name, trainer_uri, job_args, cpu_limit, memory_limit, ...) plus \"hyperparameters\": "
    "{goal, hyperparameterMetricTag (or metric), maxTrials, maxParallelTrials, maxFailedTrials, algorithm, seed, "
    "early_stopping, and ONE of: \"params\" as explicit runs, each run once "
    "([{\"optimizer\": \"sgd\", \"learning_rate\": 0.1}, ...]); \"params\" as Cloud ML Engine's search space "
    "([{\"parameterName\": \"learning_rate\", \"type\": \"DOUBLE\", \"minValue\": 0.0001, \"maxValue\": 0.1, "
    "\"scaleType\": \"UNIT_LOG_SCALE\"}, ...], types DOUBLE, INTEGER, CATEGORICAL (categoricalValues), "
    "DISCRETE (discreteValues)); or \"parameters\", the same search space with short keys (name, type, min, max, "
    "scale, values)}. Trial n runs as the job <study>-<n> with --name=value arguments. Flags override the file."
)


def _pb():
    from cloudml.tuner.v1 import tuner_service_pb2

    return tuner_service_pb2


def load_study_file(path: str, note=lambda message: None) -> tuple[dict, dict]:
    """(train job fields, hyperparameters) of a seed-layout JSON file."""
    from cloudml import hpspec

    return hpspec.load_study_file(path, note)


def build_study(args, job: dict, hyper: dict):
    """(name, StudySpec) from the file's parts and the flags."""
    from cloudml import hpspec

    return hpspec.build_study(job, hyper, name=args.name, max_trials=args.max_trials, parallel=args.parallel,
                              algorithm=args.algorithm, seed=args.seed)


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
    p.add_argument("--watch", action="store_true",
                   help="print progress (trials done/running/queued, best so far) until the study ends; "
                        "exit 0 if it SUCCEEDED, 1 otherwise")
    p.add_argument("--timeout", type=float, help="with --watch: give up after this many seconds (exit 1)")

    p = add_command(hp, "watch", watch, "Print a study's progress until it ends (exit 0 if it SUCCEEDED)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
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
    return [t.proto for t in ctx.client.studies.trials(name, states=states, tenant=ctx.args.tenant)]


# --- handlers ----------------------------------------------------------------------------------


def submit(ctx: Context) -> int | None:
    pb = _pb()
    args = ctx.args
    job, hyper = load_study_file(args.file, ctx.note)
    name, spec = build_study(args, job, hyper)
    from cloudml.cli.commands.jobs import upload_if_local  # a local package is uploaded first

    upload_if_local(ctx, job.get("trainer_uri"), spec.trial_template, args.tenant or "")
    study = ctx.client.studies.submit(spec, name=name, tenant=args.tenant)
    resp = pb.CreateStudyResponse(study=study.proto, created=study.created)
    ctx.emit(message_to_dict(resp), table=(STUDY_HEADERS, [_study_row(resp.study)]))
    if not resp.created:
        ctx.note(f"note: study {name} already existed with this spec; nothing new was created")
    if args.watch:
        return _watch(ctx, study.name, study.tenant)
    return None


def progress_line(study) -> str:
    """"4/8 trials done (3 succeeded, 1 failed), 2 running, 2 queued; best loss=0.002 (trial 2: lr=0.1)"."""
    counts = study.proto.trial_counts
    done = counts.succeeded + counts.failed + counts.early_stopped + counts.cancelled
    parts = [f"{n} {label}" for n, label in ((counts.succeeded, "succeeded"), (counts.failed, "failed"),
                                             (counts.early_stopped, "early stopped"),
                                             (counts.cancelled, "cancelled")) if n]
    line = (f"{done}/{study.proto.spec.max_trials} trials done" + (f" ({', '.join(parts)})" if parts else "")
            + f", {counts.running} running, {counts.pending} queued")
    best = study.best_trial
    if best is not None:
        line += (f"; best {study.metric}={best.objective:.6g} (trial {best.number}: "
                 f"{params_text(best.proto.params)})")
    return line


def _watch(ctx: Context, name: str, tenant: str | None) -> int:
    from cloudml import errors

    def show(study) -> None:
        ctx.note(f"{format_time(_now())}  {study.state.lower():<9}  {progress_line(study)}")

    try:
        study = ctx.client.studies.wait(name, tenant=tenant or None, timeout=ctx.args.timeout, progress=show)
    except errors.DeadlineExceeded as err:
        ctx.note(f"study {name}: still running after {ctx.args.timeout:g}s ({err.message})")
        return 1
    ctx.note(f"study {study.name}: {study.state} {study.reason} {study.message}".rstrip())
    return 0 if study.succeeded else 1


def _now():
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def watch(ctx: Context) -> int:
    return _watch(ctx, ctx.args.name, ctx.args.tenant)


def list_(ctx: Context) -> None:
    args = ctx.args
    studies = [s.proto for s in ctx.client.studies.list(states=args.state or [], tenant=args.tenant)]
    ctx.emit([message_to_dict(s) for s in studies], table=(STUDY_HEADERS, [_study_row(s) for s in studies]))


def describe(ctx: Context) -> None:
    pb = _pb()
    study = ctx.client.studies.get(ctx.args.name, tenant=ctx.args.tenant).proto
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
    args = ctx.args
    study = ctx.client.studies.get(args.name, tenant=args.tenant).proto
    found = _all_trials(ctx, args.name, args.state or [])
    ctx.emit([message_to_dict(t) for t in found], table=_trial_rows(found, study.spec.metric))


def cancel(ctx: Context) -> None:
    study = ctx.client.studies.cancel(ctx.args.name, tenant=ctx.args.tenant).proto
    ctx.emit(message_to_dict(study), table=(STUDY_HEADERS, [_study_row(study)]))


def delete(ctx: Context) -> None:
    ctx.client.studies.delete(ctx.args.name, tenant=ctx.args.tenant)
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleted study {ctx.args.name}")
