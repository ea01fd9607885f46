"""cloudml quota: a tenant's limits and usage."""
from __future__ import annotations

from cloudml import units
from cloudml.cli.base import Context, UsageError, add_command, add_group, arg_type, message_to_dict

TENANT_HELP = "the tenant (default: your own)"

# (CLI name, Resources field, formatter)
ROWS = (
    ("cpu", "cpu_millis", units.format_cpu),
    ("memory", "memory_bytes", units.format_memory),
    ("gpus", "gpus", str),
    ("train_jobs", "train_jobs", str),
    ("model_replicas", "model_replicas", str),
    ("studies", "studies", str),
    ("dev_environments", "dev_environments", str),
    ("tensorboards", "tensorboards", str),
)


def _count(what: str):
    return arg_type(lambda text: units.parse_count(text, what))


def register(subparsers) -> None:
    quota = add_group(subparsers, "quota", "Quotas: limits and usage")
    p = add_command(quota, "get", get, "Show a tenant's limits and usage")
    p.add_argument("--tenant", help=TENANT_HELP)
    p = add_command(quota, "set", set_, "Change a tenant's limits (admin only); fields not given are kept")
    p.add_argument("--tenant", help=TENANT_HELP)
    p.add_argument("--cpu", type=arg_type(units.parse_cpu), help=units.CPU_HELP)
    p.add_argument("--memory", type=arg_type(units.parse_memory), help=units.MEMORY_HELP)
    p.add_argument("--gpus", type=_count("gpus"), help="whole GPUs")
    p.add_argument("--train-jobs", type=_count("train jobs"), help="train jobs running at once")
    p.add_argument("--model-replicas", type=_count("model replicas"), help="model-server replicas at once")
    p.add_argument("--studies", type=_count("studies"), help="hyperparameter studies running at once")
    p.add_argument("--dev-environments", type=_count("dev environments"),
                   help="dev environments (notebook servers) a tenant may have, running or stopped")
    p.add_argument("--tensorboards", type=_count("TensorBoards"), help="TensorBoards a tenant may have")


def resource_summary(resources) -> str:
    """"cpu=500m memory=100M gpus=0 ..." for one-line displays."""
    return " ".join(f"{name}={fmt(getattr(resources, field))}" for name, field, fmt in ROWS)


def _show(ctx: Context, resp) -> None:
    rows = []
    for name, field, fmt in ROWS:
        limit, used = getattr(resp.limits, field), getattr(resp.usage, field)
        rows.append([name, fmt(limit), fmt(used), fmt(max(limit - used, 0))])
    if not ctx.json:
        ctx.stdout.write(f"Tenant: {resp.tenant}\n")
    ctx.emit(message_to_dict(resp), table=(["RESOURCE", "LIMIT", "USED", "FREE"], rows))


def get(ctx: Context) -> None:
    _show(ctx, ctx.client.get_quota(ctx.args.tenant))


def set_(ctx: Context) -> None:
    args = ctx.args
    # Parsed values are already whole numbers (millicores, bytes, counts).
    changes = {"cpu_millis": args.cpu, "memory_bytes": args.memory, "gpus": args.gpus,
               "train_jobs": args.train_jobs, "model_replicas": args.model_replicas, "studies": args.studies,
               "dev_environments": args.dev_environments, "tensorboards": args.tensorboards}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise UsageError("nothing to set: give at least one of --cpu, --memory, --gpus, --train-jobs, "
                         "--model-replicas, --studies, --dev-environments, --tensorboards")
    client = ctx.client
    limits = client.get_quota(args.tenant).limits
    for field, value in changes.items():
        setattr(limits, field, value)
    resp = client.set_quota(args.tenant, limits)
    _warn_below_usage(ctx, resp)
    _show(ctx, resp)


def _warn_below_usage(ctx: Context, resp) -> None:
    """A limit set below what the tenant holds now stops nothing: say so, and
    name what keeps running (its reservations)."""
    over = [(name, fmt(getattr(resp.limits, field)), fmt(getattr(resp.usage, field)))
            for name, field, fmt in ROWS if getattr(resp.usage, field) > getattr(resp.limits, field)]
    if not over:
        return
    for name, limit, used in over:
        ctx.note(f"warning: the {name} limit {limit} is below what tenant {resp.tenant} uses now ({used})")
    held = ctx.client.list_reservations(resp.tenant)
    ctx.note("what runs keeps running; new jobs, replicas and studies wait until usage falls below the limits. "
             f"Running now ({len(held)}):")
    for reservation in held:
        ctx.note(f"  {reservation.owner_id}  {resource_summary(reservation.resources)}")
