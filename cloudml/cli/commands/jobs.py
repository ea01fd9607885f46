"""cloudml jobs: train jobs (submit, list, describe, logs, cancel, delete, metrics).

    cloudml jobs submit -n linear -m trainer.task -u ./trainer-1.0.tar.gz -a "--max_epochs 50" -c 0.5 -M 1Gi
    cloudml jobs submit -f spec.json --watch
    cloudml jobs submit -n dist -m distributed_trainer.task -u s3://b/d.tar.gz --ps 1 --workers 2 --chief
    cloudml jobs list --state running
    cloudml jobs describe linear
    cloudml jobs logs linear -f --replica worker-1
    cloudml jobs metrics linear --name loss

`-f spec.json` takes the seed's JSON field names: job_name, module_name,
trainer_uri, job_args (a string, split shell-style, or a list), cpu_limit,
memory_limit, gpu_limit (per replica), ps_count, worker_count, plus
master_count, chief_count, evaluator_count, env, output_path, docker_image,
restart_policy (never | on_failure | exit_code), max_retries, timeout
(seconds, or "30s" / "10m" / "2h"), priority. Flags given on the command line
override the file.

`-u` takes a URI (file://, s3://, ... as the platform sees it) or a path on
this machine, which is uploaded first (JobsService/UploadPackage, streamed
through the gateway, with a progress line for large packages) into your
tenant's storage; the job names the stored copy.
"""
from __future__ import annotations

import os
import shlex

from cloudml import units
from cloudml.specs import (  # noqa: F401 - the spec parsers, re-exported for the CLI's users
    POLICIES,
    SEED_FIELDS,
    SEED_IGNORED,
    build_spec,
    load_seed_spec,
    parse_duration,
    parse_env,
    parse_replica,
    split_args,
    trainer_uri,
)
from cloudml.cli.base import (
    Context,
    add_command,
    add_group,
    arg_type,
    enum_label,
    format_time,
    message_to_dict,
)

TENANT_HELP = "the tenant (default: your own)"
FINAL = ("succeeded", "failed", "cancelled")
STATES = ("queued", "preparing", "running", "succeeded", "failed", "cancelling", "cancelled", "restarting")
SUBMIT_DESCRIPTION = (
    "Submit a train job. -f spec.json takes the seed's JSON field names: job_name, module_name, trainer_uri, "
    "job_args (a string split shell-style, or a list), cpu_limit, memory_limit, gpu_limit (per replica), "
    "ps_count, worker_count, master_count, chief_count, evaluator_count, env, output_path, docker_image, "
    "restart_policy, max_retries, timeout, priority; flags override the file. -u takes a URI or a local path."
)


def _pb():
    from cloudml.jobs.v1 import jobs_service_pb2

    return jobs_service_pb2


def upload_progress(ctx: Context, label: str, threshold: int = 8 << 20, verb: str = "uploading"):
    """A progress callback for Client.upload_* (and, with verb "downloading",
    models.download): one line on stderr, rewritten in place, for transfers
    of `threshold` bytes or more."""
    def show(sent: int, total: int) -> None:
        if total < threshold:
            return
        ctx.stderr.write(f"\r{verb} {label}: {sent / 2**20:.1f}/{total / 2**20:.1f} MiB "
                         f"({100 * sent // max(total, 1)}%)" + ("\n" if sent >= total else ""))
        ctx.stderr.flush()

    return show


def upload_if_local(ctx: Context, given, spec, tenant: str = "") -> None:
    """When the trainer package was given as a path on this machine (no
    "://"), uploads it and points spec.trainer_uri at the stored copy."""
    if not given or "://" in str(given):
        return
    path = spec.trainer_uri[len("file://"):] if spec.trainer_uri.startswith("file://") else str(given)
    spec.trainer_uri = ctx.client.upload_package(path, tenant=tenant or None,
                                                 progress=upload_progress(ctx, os.path.basename(path)))
    ctx.note(f"uploaded {given} to {spec.trainer_uri}")


# --- registration ------------------------------------------------------------------------


def register(subparsers) -> None:
    jobs = add_group(subparsers, "jobs", "Train jobs")
    p = add_command(jobs, "submit", submit, "Submit a train job", description=SUBMIT_DESCRIPTION)
    p.add_argument("-f", "--file", help="a JSON spec with the seed's field names (job_name, module_name, ...)")
    p.add_argument("-n", "--name", help="the job's name (a DNS label)")
    p.add_argument("-m", "--module", help="the module run as `python -m`, e.g. trainer.task")
    p.add_argument("-u", "--trainer-uri",
                   help="the trainer package (.tar.gz/.whl): a path on this machine (uploaded) or a URI")
    p.add_argument("-a", "--args", help="arguments for the module, one string split shell-style")
    p.add_argument("-c", "--cpu", type=arg_type(units.parse_cpu), help="per replica: " + units.CPU_HELP)
    p.add_argument("-M", "--memory", type=arg_type(units.parse_memory), help="per replica limit: " + units.MEMORY_HELP)
    p.add_argument("-g", "--gpus", type=arg_type(lambda v: units.parse_count(v, "gpus")), help="per replica, whole GPUs")
    p.add_argument("--master", type=int, help="master replicas (0 or 1; default 1 unless --chief)")
    p.add_argument("--chief", action="store_true", help="one CHIEF instead of a MASTER (TF2 strategies)")
    p.add_argument("--ps", type=int, help="parameter servers")
    p.add_argument("--workers", type=int, help="workers")
    p.add_argument("--evaluator", type=int, help="evaluators (0 or 1)")
    p.add_argument("--env", action="append", type=arg_type(parse_env), metavar="KEY=VALUE",
                   help="an environment variable for every replica (repeatable)")
    p.add_argument("--output-path", help="where the trainer writes (default: the platform's storage)")
    p.add_argument("--restart-policy", choices=POLICIES)
    p.add_argument("--max-retries", type=int)
    p.add_argument("--timeout", help="active deadline: seconds, or e.g. 30m, 2h")
    p.add_argument("--priority", type=int, help="-1000..1000 (higher runs first)")
    p.add_argument("--docker-image", help="a container image (only for runtimes that run images)")
    p.add_argument("--tenant", help=TENANT_HELP)
    p.add_argument("--validate-only", action="store_true", help="check the spec, create nothing")
    p.add_argument("--watch", action="store_true", help="show state changes, then follow the logs")

    p = add_command(jobs, "list", list_, "List train jobs", aliases=["ls"])
    p.add_argument("--state", action="append", choices=STATES, help="only jobs in this state (repeatable)")
    p.add_argument("--tenant", help=TENANT_HELP)
    p.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")

    for command, handler, text in (("describe", describe, "Show a job with its events and replicas"),
                                   ("cancel", cancel, "Cancel a job (its replicas are stopped)"),
                                   ("delete", delete, "Delete a finished job's record, logs and metrics")):
        p = add_command(jobs, command, handler, text, aliases=["get"] if command == "describe" else ())
        p.add_argument("name", metavar="NAME")
        p.add_argument("--tenant", help=TENANT_HELP)

    p = add_command(jobs, "logs", logs, "Print a job's logs")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.add_argument("--replica", action="append", type=arg_type(parse_replica),
                   help="only this replica, e.g. worker-1 (repeatable)")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines of each replica")
    p.add_argument("--tenant", help=TENANT_HELP)

    from cloudml.cli.commands.tensorboard import register_job_shortcut

    register_job_shortcut(jobs)

    p = add_command(jobs, "metrics", metrics, "Show a job's metric series")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--name", dest="metric", action="append", help="only this metric (repeatable)")
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--tenant", help=TENANT_HELP)


# --- handlers ----------------------------------------------------------------------------


def _state(job) -> str:
    return enum_label(_pb().JobState, job.state, "JOB_STATE_")


def _replica_name(replica) -> str:
    return f"{enum_label(_pb().ReplicaType, replica.type, 'REPLICA_TYPE_')}-{replica.index}"


def _summary_row(job) -> list:
    replicas = ", ".join(f"{_replica_name(r.replica)}" for r in job.replicas) if len(job.replicas) <= 4 else \
        f"{len(job.replicas)} replicas"
    return [job.name, _state(job), job.reason, job.attempts, replicas, format_time(job.create_time)]


SUMMARY = ["NAME", "STATE", "REASON", "ATTEMPTS", "REPLICAS", "CREATED"]


def submit(ctx: Context) -> int | None:
    pb = _pb()
    args = ctx.args
    seed = load_seed_spec(args.file, ctx.note) if args.file else None
    name, spec = build_spec(args, seed)
    given = args.trainer_uri if args.trainer_uri is not None else (seed or {}).get("trainer_uri")
    upload_if_local(ctx, given, spec, args.tenant or "")
    job = ctx.client.jobs.submit(name, spec=spec, tenant=args.tenant, validate_only=args.validate_only)
    resp = pb.SubmitJobResponse(job=job.proto, created=job.created)
    if args.validate_only:
        ctx.emit(message_to_dict(resp), text=f"job {name}: the spec is valid (spec_hash {job.proto.spec_hash[:12]})")
        return None
    ctx.emit(message_to_dict(resp), table=(SUMMARY, [_summary_row(job.proto)]))
    if not job.created:
        ctx.note(f"note: job {name} already existed with this spec; nothing new was submitted")
    if args.watch:
        return _watch(ctx, job.proto)
    return None


def _watch(ctx: Context, job) -> int:
    jobs = ctx.client.jobs
    last = None
    for found in jobs.watch(job.name, tenant=job.tenant):
        current = found.proto
        if current.state != last:
            last = current.state
            ctx.note(f"{format_time(current.events[-1].time) if current.events else '-'}  {_state(current):<10}  "
                     f"{current.reason} {current.message}".rstrip())
        if found.state == "RUNNING" or found.done:
            break
    for line in jobs.logs(job.name, tenant=job.tenant, follow=True):
        _print_lines(ctx, [line.proto], prefix=True)
    final = jobs.get(job.name, tenant=job.tenant)
    ctx.note(f"job {final.name}: {_state(final.proto)} {final.reason} {final.message}".rstrip())
    return 0 if final.succeeded else 1


def list_(ctx: Context) -> None:
    args = ctx.args
    jobs = [j.proto for j in ctx.client.jobs.list(states=args.state or [], tenant=args.tenant,
                                                   page_size=min(args.limit or 1000, 1000), limit=args.limit)]
    ctx.emit([message_to_dict(j) for j in jobs], table=(SUMMARY, [_summary_row(j) for j in jobs]))


def describe(ctx: Context) -> None:
    pb = _pb()
    job = ctx.client.jobs.get(ctx.args.name, tenant=ctx.args.tenant).proto
    if ctx.json:
        ctx.emit(message_to_dict(job))
        return
    spec = job.spec
    fields = [
        ("Name", job.name), ("Tenant", job.tenant), ("State", _state(job)),
        ("Reason", f"{job.reason} {job.message}".strip()), ("Attempts", job.attempts),
        ("Trainer", spec.trainer_uri), ("Module", spec.module_name), ("Args", shlex.join(spec.job_args)),
        ("Output", spec.output_path),
        ("Restart", f"{enum_label(pb.RestartPolicy, spec.restart_policy, 'RESTART_POLICY_')} "
                    f"(max retries {spec.max_retries})"),
        ("Created", format_time(job.create_time)), ("Started", format_time(job.start_time)),
        ("Ended", format_time(job.end_time)),
    ]
    ctx.emit(None, fields=fields)
    ctx.stdout.write("\nReplicas:\n")
    from cloudml.cli.base import print_table

    print_table(["REPLICA", "STATE", "EXIT", "REASON", "ADDRESS", "PID"], [
        [_replica_name(r.replica), enum_label(pb.ReplicaState, r.state, "REPLICA_STATE_"),
         r.exit_code if r.HasField("exit_code") else "", r.reason, r.address, r.pid if r.HasField("pid") else ""]
        for r in job.replicas], ctx.stdout)
    ctx.stdout.write("\nEvents:\n")
    print_table(["TIME", "STATE", "REASON", "ATTEMPT", "MESSAGE"], [
        [format_time(e.time), enum_label(pb.JobState, e.state, "JOB_STATE_"), e.reason, e.attempt, e.message]
        for e in job.events], ctx.stdout)


def cancel(ctx: Context) -> None:
    job = ctx.client.jobs.cancel(ctx.args.name, tenant=ctx.args.tenant).proto
    ctx.emit(message_to_dict(job), table=(SUMMARY, [_summary_row(job)]))


def delete(ctx: Context) -> None:
    ctx.client.jobs.delete(ctx.args.name, tenant=ctx.args.tenant)
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleted job {ctx.args.name}")


def _print_lines(ctx: Context, lines, prefix: bool) -> None:
    for line in lines:
        source = _replica_name(line.replica) if line.HasField("replica") else "job"
        text = f"[{source}] {line.text}" if prefix else line.text
        ctx.stdout.write(text + "\n")
    ctx.stdout.flush()


def logs(ctx: Context) -> None:
    args = ctx.args
    lines = ctx.client.jobs.logs(args.name, follow=args.follow, replicas=args.replica or [], tail=args.tail,
                                 tenant=args.tenant)
    if ctx.json:
        ctx.emit([message_to_dict(line.proto) for line in lines])
        return
    prefix = not args.replica or len(args.replica) > 1
    for line in lines:
        _print_lines(ctx, [line.proto], prefix)


def metrics(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    resp = ctx.client.jobs.metrics(args.name, names=args.metric or [], start_step=args.start_step,
                                   tenant=args.tenant).proto
    rows = []
    for series in resp.series:
        source = enum_label(pb.MetricSource, series.source, "METRIC_SOURCE_")
        replica = _replica_name(series.replica) if series.HasField("replica") else "-"
        for point in series.points:
            rows.append([series.name, replica, source, point.attempt, point.step, f"{point.value:.6g}"])
    ctx.emit(message_to_dict(resp), table=(["METRIC", "REPLICA", "SOURCE", "ATTEMPT", "STEP", "VALUE"], rows))
