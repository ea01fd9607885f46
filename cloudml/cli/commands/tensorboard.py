"""cloudml tensorboard: managed TensorBoards (create, list, describe, open, delete).

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

import re
import time

from cloudml.cli.base import Context, add_command, add_group, enum_label, format_time, message_to_dict

TENANT_HELP = "the tenant (default: your own)"
HEADERS = ["NAME", "STATE", "LOGDIR", "PATH", "CREATED"]


def _pb():
    from cloudml.jobs.v1 import tensorboards_pb2

    return tensorboards_pb2


def _call(ctx: Context, method: str, request):
    from cloudml.jobs.v1 import jobs_service_pb2_grpc

    return ctx.client.call(getattr(ctx.client.stub(jobs_service_pb2_grpc.JobsServiceStub), method), request)


def _state(board) -> str:
    return enum_label(_pb().TensorBoardState, board.state, "TENSORBOARD_STATE_")


def _row(board) -> list:
    logdir = board.logdir or f"{len(board.runs)} runs"
    return [board.name, _state(board), logdir, board.path, format_time(board.create_time)]


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
    p.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to wait for it to run")


def _wait(ctx: Context, board):
    pb = _pb()
    deadline = time.monotonic() + ctx.args.wait_timeout
    while ctx.args.wait and board.state == pb.TENSORBOARD_STATE_STARTING and time.monotonic() < deadline:
        time.sleep(0.25)
        board = _call(ctx, "GetTensorBoard", pb.GetTensorBoardRequest(tenant=board.tenant, name=board.name)).tensorboard
    if ctx.args.wait and board.state != pb.TENSORBOARD_STATE_RUNNING:
        from cloudml import errors

        raise errors.FailedPrecondition(f"tensorboard {board.name} is {_state(board)}: {board.message}",
                                        code="FAILED_PRECONDITION")
    return board


def _emit_with_link(ctx: Context, board) -> None:
    link = ctx.client.login_link(board.path) if board.state == _pb().TENSORBOARD_STATE_RUNNING else ""
    data = message_to_dict(board)
    data["login_link"] = link
    ctx.emit(data, text=f"tensorboard {board.name}: {_state(board)}" + (f"\nopen (once, within a minute): {link}"
                                                                         if link else ""))


def create(ctx: Context) -> None:
    pb = _pb()
    board = _call(ctx, "CreateTensorBoard", pb.CreateTensorBoardRequest(
        tenant=ctx.args.tenant or "", name=ctx.args.name, logdir=ctx.args.logdir)).tensorboard
    _emit_with_link(ctx, _wait(ctx, board))


def from_job(ctx: Context) -> None:
    from cloudml import errors

    pb = _pb()
    name = ctx.args.name or ctx.args.job
    try:
        board = _call(ctx, "CreateTensorBoard", pb.CreateTensorBoardRequest(
            tenant=ctx.args.tenant or "", name=name, job=ctx.args.job)).tensorboard
    except errors.AlreadyExists:
        board = _call(ctx, "GetTensorBoard", pb.GetTensorBoardRequest(tenant=ctx.args.tenant or "",
                                                                      name=name)).tensorboard
        if board.job != ctx.args.job:
            raise
    _emit_with_link(ctx, _wait(ctx, board))


def run_name(trial) -> str:
    """`t<number> <param>=<value> ...`, within the platform's run-name rule."""
    from cloudml.cli.commands.hp import params_text

    text = f"t{trial.number} {params_text(trial.params)}".strip()
    return re.sub(r"[^A-Za-z0-9_.=+ -]", "_", text)[:100]


def from_study(ctx: Context) -> None:
    from cloudml import errors
    from cloudml.cli.commands.hp import _all_trials

    pb = _pb()
    trials = [t for t in _all_trials(ctx, ctx.args.study) if t.job_name]
    if not trials:
        raise errors.FailedPrecondition(f"study {ctx.args.study} has no trial with a job yet",
                                        code="FAILED_PRECONDITION")
    name = ctx.args.name or ctx.args.study
    runs = [pb.TensorBoardRun(name=run_name(t), job=t.job_name) for t in sorted(trials, key=lambda t: t.number)]
    try:
        board = _call(ctx, "CreateTensorBoard", pb.CreateTensorBoardRequest(
            tenant=ctx.args.tenant or "", name=name, runs=runs)).tensorboard
    except errors.AlreadyExists:
        board = _call(ctx, "GetTensorBoard", pb.GetTensorBoardRequest(tenant=ctx.args.tenant or "",
                                                                      name=name)).tensorboard
        if not board.runs:
            raise
    _emit_with_link(ctx, _wait(ctx, board))


def list_(ctx: Context) -> None:
    boards = _call(ctx, "ListTensorBoards", _pb().ListTensorBoardsRequest(tenant=ctx.args.tenant or "")).tensorboards
    ctx.emit([message_to_dict(b) for b in boards], table=(HEADERS, [_row(b) for b in boards]))


def describe(ctx: Context) -> None:
    board = _call(ctx, "GetTensorBoard", _pb().GetTensorBoardRequest(tenant=ctx.args.tenant or "",
                                                                     name=ctx.args.name)).tensorboard
    ctx.emit(message_to_dict(board), fields=[
        ("Name", board.name), ("Tenant", board.tenant), ("State", _state(board)), ("Message", board.message),
        ("Logdir", board.logdir), ("Job", board.job),
        ("Runs", "; ".join(f"{r.name} ({r.job or r.logdir})" for r in board.runs)), ("Path", board.path),
        ("CPU", f"{board.resources.cpu_millis}m"), ("Memory", f"{board.resources.memory_bytes >> 20} MiB"),
        ("Created", format_time(board.create_time)), ("Last used", format_time(board.last_access_time)),
        ("Deleted if idle at", format_time(board.idle_delete_time)),
    ])


def open_(ctx: Context) -> None:
    board = _call(ctx, "GetTensorBoard", _pb().GetTensorBoardRequest(tenant=ctx.args.tenant or "",
                                                                     name=ctx.args.name)).tensorboard
    link = ctx.client.login_link(board.path)
    ctx.emit({"name": board.name, "login_link": link}, text=link)


def delete(ctx: Context) -> None:
    _call(ctx, "DeleteTensorBoard", _pb().DeleteTensorBoardRequest(tenant=ctx.args.tenant or "", name=ctx.args.name))
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleting tensorboard {ctx.args.name}")
