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

import json
import os
import re
import shlex

from cloudml import units
from cloudml.cli.base import (
    Context,
    UsageError,
    add_command,
    add_group,
    arg_type,
    enum_label,
    format_time,
    message_to_dict,
)

TENANT_HELP = "the tenant (default: your own)"
STATES = ("queued", "preparing", "running", "succeeded", "failed", "cancelling", "cancelled", "restarting")
POLICIES = ("never", "on_failure", "exit_code")
FINAL = ("succeeded", "failed", "cancelled")
SEED_FIELDS = {
    "job_name", "module_name", "trainer_uri", "job_args", "cpu_limit", "memory_limit", "gpu_limit",
    "ps_count", "worker_count", "master_count", "chief_count", "evaluator_count", "env", "output_path",
    "docker_image", "restart_policy", "max_retries", "timeout", "priority",
}
# Fields of the seed's format this platform has no use for (accepted, ignored).
SEED_IGNORED = {"framework", "framework_version", "docker_command", "volume_type", "volume_path", "mount_path",
                "mount_read_only", "prepare_command", "finish_command", "node_selector_key", "node_selector_value",
                "ps_cpu_limit", "ps_memory_limit", "save_mode"}
SUBMIT_DESCRIPTION = (
    "Submit a train job. -f spec.json takes the seed's JSON field names: job_name, module_name, trainer_uri, "
    "job_args (a string split shell-style, or a list), cpu_limit, memory_limit, gpu_limit (per replica), "
    "ps_count, worker_count, master_count, chief_count, evaluator_count, env, output_path, docker_image, "
    "restart_policy, max_retries, timeout, priority; flags override the file. -u takes a URI or a local path."
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")


def _pb():
    from cloudml.jobs.v1 import jobs_service_pb2

    return jobs_service_pb2


def _stub(ctx: Context):
    from cloudml.jobs.v1 import jobs_service_pb2_grpc

    return ctx.client.stub(jobs_service_pb2_grpc.JobsServiceStub)


def parse_duration(value) -> float:
    """Seconds from 90, "90", "90s", "10m", "2h", "1d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"invalid duration {value!r}; expected seconds or e.g. 30s, 10m, 2h")
        seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2] or "s"]
    if seconds < 0:
        raise ValueError(f"duration must not be negative (got {value!r})")
    return seconds


def parse_env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--env takes KEY=VALUE, got {text!r}")
    return key, value


def parse_replica(text: str):
    pb = _pb()
    match = re.fullmatch(r"(master|chief|ps|worker|evaluator)-(\d+)", text or "")
    if not match:
        raise ValueError(f"invalid replica {text!r}; expected e.g. master-0, ps-0, worker-1")
    return pb.ReplicaId(type=pb.ReplicaType.Value(f"REPLICA_TYPE_{match[1].upper()}"), index=int(match[2]))


def split_args(value) -> list[str]:
    """job_args as a list: a string is split shell-style (the seed's form)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as err:
            raise UsageError(f"job_args cannot be split shell-style: {err}") from None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise UsageError("job_args must be a string or a list of strings")


def trainer_uri(value: str) -> str:
    """A URI as given; a local path becomes file://<absolute path>."""
    if "://" in value:
        return value
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise UsageError(f"trainer package {value!r} is not a file (give a path or a URI such as s3://...)")
    return "file://" + path


def upload_progress(ctx: Context, label: str, threshold: int = 8 << 20):
    """A progress callback for Client.upload_*: one line on stderr, rewritten
    in place, for uploads of `threshold` bytes or more."""
    def show(sent: int, total: int) -> None:
        if total < threshold:
            return
        ctx.stderr.write(f"\ruploading {label}: {sent / 2**20:.1f}/{total / 2**20:.1f} MiB "
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


def load_seed_spec(path: str, note=lambda message: None) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object")
    unknown = set(data) - SEED_FIELDS - SEED_IGNORED
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SEED_FIELDS))}")
    ignored = set(data) & SEED_IGNORED
    if ignored:
        note(f"note: ignoring field(s) this platform does not use: {', '.join(sorted(ignored))}")
    return data


def build_spec(args, seed: dict | None = None):
    """(name, TrainJobSpec) from the parsed flags over an optional seed JSON."""
    pb = _pb()
    seed = dict(seed or {})

    def pick(flag, field):
        value = getattr(args, flag, None)
        return value if value is not None else seed.get(field)

    name = pick("name", "job_name")
    module = pick("module", "module_name")
    uri = pick("trainer_uri", "trainer_uri")
    if not name or not module or not uri:
        raise UsageError("a job needs a name (-n), a module (-m) and a trainer package (-u), or -f spec.json with them")
    try:
        cpu = args.cpu if args.cpu is not None else (units.parse_cpu(seed["cpu_limit"]) if "cpu_limit" in seed else 0)
        memory = args.memory if args.memory is not None else (
            units.parse_memory(seed["memory_limit"]) if "memory_limit" in seed else 0)
        gpus = args.gpus if args.gpus is not None else (
            units.parse_count(seed["gpu_limit"], "gpus") if "gpu_limit" in seed else 0)
        timeout = parse_duration(pick("timeout", "timeout")) if pick("timeout", "timeout") is not None else 0.0
    except ValueError as err:
        raise UsageError(str(err)) from None

    spec = pb.TrainJobSpec(trainer_uri=trainer_uri(str(uri)), module_name=str(module))
    raw_args = args.args if args.args is not None else seed.get("job_args")
    spec.job_args.extend(split_args(raw_args))
    output = pick("output_path", "output_path")
    if output:
        spec.output_path = str(output)
    image = pick("docker_image", "docker_image")
    if image:
        spec.docker_image = str(image)

    counts = {
        "MASTER": pick("master", "master_count"), "CHIEF": pick("chief_count", "chief_count"),
        "PS": pick("ps", "ps_count"), "WORKER": pick("workers", "worker_count"),
        "EVALUATOR": pick("evaluator", "evaluator_count"),
    }
    if getattr(args, "chief", False):
        counts["CHIEF"], counts["MASTER"] = 1, 0
    if counts["CHIEF"]:
        counts["MASTER"] = counts["MASTER"] or 0
    elif counts["MASTER"] is None:
        counts["MASTER"] = 1
    resources = {"cpu_millis": cpu, "memory_bytes": memory, "gpus": gpus}
    for kind in ("MASTER", "CHIEF", "PS", "WORKER", "EVALUATOR"):
        count = int(counts[kind] or 0)
        if count < 0:
            raise UsageError(f"replica counts must not be negative ({kind.lower()}: {count})")
        if count:
            item = spec.replica_specs.add(type=pb.ReplicaType.Value(f"REPLICA_TYPE_{kind}"), replica_count=count)
            for field, value in resources.items():
                setattr(item.resources, field, value)

    env = dict(seed.get("env") or {})
    for key, value in args.env or []:
        env[key] = value
    spec.env.update({str(k): str(v) for k, v in env.items()})
    policy = pick("restart_policy", "restart_policy")
    if policy:
        policy = str(policy).lower()
        if policy not in POLICIES:
            raise UsageError(f"restart policy {policy!r}: expected one of {', '.join(POLICIES)}")
        spec.restart_policy = pb.RestartPolicy.Value(f"RESTART_POLICY_{policy.upper()}")
    retries = pick("max_retries", "max_retries")
    if retries is not None:
        spec.max_retries = int(retries)
    if timeout:
        spec.timeout.FromNanoseconds(int(timeout * 1e9))
    priority = pick("priority", "priority")
    if priority is not None:
        spec.priority = int(priority)
    return str(name), spec


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


def _call(ctx: Context, method: str, request):
    return ctx.client.call(getattr(_stub(ctx), method), request)


def _stream(ctx: Context, method: str, request):
    """Iterates a server-streaming call, with SDK errors."""
    import grpc

    from cloudml import errors

    try:
        yield from getattr(_stub(ctx), method)(request)
    except grpc.RpcError as err:
        raise errors.from_rpc_error(err, ctx.client.endpoint) from None


def submit(ctx: Context) -> int | None:
    pb = _pb()
    args = ctx.args
    seed = load_seed_spec(args.file, ctx.note) if args.file else None
    name, spec = build_spec(args, seed)
    given = args.trainer_uri if args.trainer_uri is not None else (seed or {}).get("trainer_uri")
    upload_if_local(ctx, given, spec, args.tenant or "")
    resp = _call(ctx, "SubmitJob", pb.SubmitJobRequest(tenant=args.tenant or "", name=name, spec=spec,
                                                       validate_only=args.validate_only))
    job = resp.job
    if args.validate_only:
        ctx.emit(message_to_dict(resp), text=f"job {name}: the spec is valid (spec_hash {job.spec_hash[:12]})")
        return None
    ctx.emit(message_to_dict(resp), table=(SUMMARY, [_summary_row(job)]))
    if not resp.created:
        ctx.note(f"note: job {name} already existed with this spec; nothing new was submitted")
    if args.watch:
        return _watch(ctx, job)
    return None


def _watch(ctx: Context, job) -> int:
    pb = _pb()
    last = None
    for resp in _stream(ctx, "WatchJob", pb.WatchJobRequest(tenant=job.tenant, name=job.name)):
        current = resp.job
        if current.state != last:
            last = current.state
            ctx.note(f"{format_time(current.events[-1].time) if current.events else '-'}  {_state(current):<10}  "
                     f"{current.reason} {current.message}".rstrip())
        if current.state in (pb.JOB_STATE_RUNNING,) or _state(current) in FINAL:
            break
    for resp in _stream(ctx, "StreamLogs", pb.StreamLogsRequest(tenant=job.tenant, name=job.name, follow=True)):
        _print_lines(ctx, resp.lines, prefix=True)
    final = _call(ctx, "GetJob", pb.GetJobRequest(tenant=job.tenant, name=job.name)).job
    ctx.note(f"job {final.name}: {_state(final)} {final.reason} {final.message}".rstrip())
    return 0 if final.state == pb.JOB_STATE_SUCCEEDED else 1


def list_(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    states = [pb.JobState.Value(f"JOB_STATE_{s.upper()}") for s in args.state or []]
    jobs, token = [], ""
    while True:
        page = _call(ctx, "ListJobs", pb.ListJobsRequest(tenant=args.tenant or "", states=states, page_token=token,
                                                         page_size=min(args.limit or 1000, 1000)))
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token or (args.limit and len(jobs) >= args.limit):
            break
    if args.limit:
        jobs = jobs[: args.limit]
    ctx.emit([message_to_dict(j) for j in jobs], table=(SUMMARY, [_summary_row(j) for j in jobs]))


def describe(ctx: Context) -> None:
    pb = _pb()
    job = _call(ctx, "GetJob", pb.GetJobRequest(tenant=ctx.args.tenant or "", name=ctx.args.name)).job
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
    pb = _pb()
    job = _call(ctx, "CancelJob", pb.CancelJobRequest(tenant=ctx.args.tenant or "", name=ctx.args.name)).job
    ctx.emit(message_to_dict(job), table=(SUMMARY, [_summary_row(job)]))


def delete(ctx: Context) -> None:
    pb = _pb()
    _call(ctx, "DeleteJob", pb.DeleteJobRequest(tenant=ctx.args.tenant or "", name=ctx.args.name))
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleted job {ctx.args.name}")


def _print_lines(ctx: Context, lines, prefix: bool) -> None:
    for line in lines:
        source = _replica_name(line.replica) if line.HasField("replica") else "job"
        text = f"[{source}] {line.text}" if prefix else line.text
        ctx.stdout.write(text + "\n")
    ctx.stdout.flush()


def logs(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    request = pb.StreamLogsRequest(tenant=args.tenant or "", name=args.name, follow=args.follow,
                                   replicas=args.replica or [], tail_lines=args.tail)
    if ctx.json:
        lines = [message_to_dict(line) for resp in _stream(ctx, "StreamLogs", request) for line in resp.lines]
        ctx.emit(lines)
        return
    prefix = not args.replica or len(args.replica) > 1
    for resp in _stream(ctx, "StreamLogs", request):
        _print_lines(ctx, resp.lines, prefix)


def metrics(ctx: Context) -> None:
    pb = _pb()
    args = ctx.args
    resp = _call(ctx, "GetJobMetrics", pb.GetJobMetricsRequest(tenant=args.tenant or "", name=args.name,
                                                                metric_names=args.metric or [],
                                                                start_step=args.start_step))
    rows = []
    for series in resp.series:
        source = enum_label(pb.MetricSource, series.source, "METRIC_SOURCE_")
        replica = _replica_name(series.replica) if series.HasField("replica") else "-"
        for point in series.points:
            rows.append([series.name, replica, source, point.attempt, point.step, f"{point.value:.6g}"])
    ctx.emit(message_to_dict(resp), table=(["METRIC", "REPLICA", "SOURCE", "ATTEMPT", "STEP", "VALUE"], rows))

