"""cloudml tensorboard: managed TensorBoards (create, list, describe, open, delete), on
`client.tensorboards` (cloudml/sdk/tensorboards.py).

    cloudml tensorboard create loss --logdir file:///DIR/storage/acme/runs
    cloudml jobs tensorboard linear            # the job's <output_path>/tensorboard, then its login link
    cloudml hp tensorboard study1              # every trial side by side, a run per trial named by its parameters
    cloudml tensorboard open loss              # prints a one-time login link (valid about a minute)
    cloudml tensorboard list
    cloudml tensorboard delete loss

A TensorBoard runs as a replica of your tenant (it holds CPU and memory of
your quota) and is reached only through the gateway's HTTP port, at
/tensorboard/<tenant>/<name>/, after logging in with the link `open` prints
(the link sets a browser cookie; it works once). Unused for the platform's
idle time (default 4 h), it is deleted.
"""
from __future__ import annotations

from cloudml.cli.base import Context, add_command, add_group, format_time
from cloudml.sdk.tensorboards import WAIT_TIMEOUT

TENANT_HELP = "the tenant (default: your own)"
HEADERS = ["NAME", "STATE", "LOGDIR", "PATH", "CREATED"]


def _state(board) -> str:
    return board.state.lower()


def _row(board) -> list:
    logdir = board.logdir or f"{len(board.proto.runs)} runs"
    return [board.name, _state(board), logdir, board.path, format_time(board.proto.create_time)]


def register(subparsers) -> None:
    group = add_group(subparsers, "tensorboard", "TensorBoards on your event files, in the browser")
    p = add_command(group, "create", create, "Start a TensorBoard on a logdir in your storage")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--logdir", required=True, help="a directory in your storage (a path or file:// URI)")
    p.add_argument("--tenant", help=TENANT_HELP)
    add_wait_arguments(p)
    p = add_command(group, "list", list_, "List TensorBoards", aliases=["ls"])
    p.add_argument("--tenant", help=TENANT_HELP)
    for command, handler, text in (("describe", describe, "Show a TensorBoard"),
                                   ("open", open_, "Print a one-time browser login link to a TensorBoard"),
                                   ("delete", delete, "Stop a TensorBoard (its event files stay)")):
        p = add_command(group, command, handler, text, aliases=["get"] if command == "describe" else ())
        p.add_argument("name", metavar="NAME")
        p.add_argument("--tenant", help=TENANT_HELP)


def _shortcut(group, handler, what: str, text: str) -> None:
    """`cloudml <group> tensorboard <WHAT>`: a TensorBoard named after the job or study."""
    p = add_command(group, "tensorboard", handler, text)
    p.add_argument(what, metavar=what.upper())
    p.add_argument("--name", help=f"the TensorBoard's name (default: the {what}'s)")
    p.add_argument("--tenant", help=TENANT_HELP)
    add_wait_arguments(p)


def register_job_shortcut(jobs_group) -> None:
    """`cloudml jobs tensorboard JOB`: on the job's logdir."""
    _shortcut(jobs_group, from_job, "job",
              "Start (or reuse) a TensorBoard on a job's event files and print its login link")


def register_hp_shortcut(hp_group) -> None:
    """`cloudml hp tensorboard STUDY`: every trial, a run per trial named by its parameters."""
    _shortcut(hp_group, from_study, "study",
              "Start (or reuse) a TensorBoard over a study's trials side by side and print its login link")


def add_wait_arguments(p) -> None:
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return at once instead of waiting until it runs")
    p.add_argument("--wait-timeout", type=float, default=WAIT_TIMEOUT, help="seconds to wait for it to run")


def _wait_flags(ctx: Context) -> dict:
    return {"wait": ctx.args.wait, "wait_timeout": ctx.args.wait_timeout, "tenant": ctx.args.tenant}


def _emit_with_link(ctx: Context, board) -> None:
    link = ctx.client.tensorboards.login_link(board) if board.running else ""
    data = board.to_dict()
    data["login_link"] = link
    ctx.emit(data, text=f"tensorboard {board.name}: {_state(board)}" + (f"\nopen (once, within a minute): {link}"
                                                                         if link else ""))


def create(ctx: Context) -> None:
    _emit_with_link(ctx, ctx.client.tensorboards.create(ctx.args.name, logdir=ctx.args.logdir, **_wait_flags(ctx)))


def from_job(ctx: Context) -> None:
    _emit_with_link(ctx, ctx.client.tensorboards.for_job(ctx.args.job, name=ctx.args.name, **_wait_flags(ctx)))


def from_study(ctx: Context) -> None:
    _emit_with_link(ctx, ctx.client.tensorboards.for_study(ctx.args.study, name=ctx.args.name, **_wait_flags(ctx)))


def list_(ctx: Context) -> None:
    boards = ctx.client.tensorboards.list(tenant=ctx.args.tenant)
    ctx.emit([b.to_dict() for b in boards], table=(HEADERS, [_row(b) for b in boards]))


def describe(ctx: Context) -> None:
    found = ctx.client.tensorboards.get(ctx.args.name, tenant=ctx.args.tenant)
    board = found.proto
    ctx.emit(found.to_dict(), fields=[
        ("Name", board.name), ("Tenant", board.tenant), ("State", _state(found)), ("Message", board.message),
        ("Logdir", board.logdir), ("Job", board.job),
        ("Runs", "; ".join(f"{r.name} ({r.job or r.logdir})" for r in board.runs)), ("Path", board.path),
        ("CPU", f"{board.resources.cpu_millis}m"), ("Memory", f"{board.resources.memory_bytes >> 20} MiB"),
        ("Created", format_time(board.create_time)), ("Last used", format_time(board.last_access_time)),
        ("Deleted if idle at", format_time(board.idle_delete_time)),
    ])


def open_(ctx: Context) -> None:
    board = ctx.client.tensorboards.get(ctx.args.name, tenant=ctx.args.tenant)
    link = ctx.client.tensorboards.login_link(board)
    ctx.emit({"name": board.name, "login_link": link}, text=link)


def delete(ctx: Context) -> None:
    ctx.client.tensorboards.delete(ctx.args.name, tenant=ctx.args.tenant)
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleting tensorboard {ctx.args.name}")
