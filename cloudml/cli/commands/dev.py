"""cloudml dev: dev environments, JupyterLab servers of your tenant, on `client.dev`
(cloudml/sdk/dev.py).

    cloudml dev create nb --cpu 2 --memory 4Gi [--gpus 1]    # waits until it runs
    cloudml dev open nb               # a one-time login link (valid about a minute); opens a browser if one is there
    cloudml dev list | describe nb
    cloudml dev stop nb               # frees its CPU, memory and GPUs; its files stay
    cloudml dev start nb
    cloudml dev delete nb             # its notebooks stay in your storage

Each runs as a replica of your tenant (it holds CPU, memory and GPUs of your
quota while it runs, and one of your `dev_environments` while it exists),
reached only through the gateway's HTTP port at /dev/<tenant>/<name>/ after
logging in with the link `open` prints. Its kernels have the SDK,
TensorFlow and an access key of your tenant configured (`import cloudml`,
`!cloudml jobs list`); its working directory is your storage. Idle for the
platform's idle time (default 4 h), it is stopped.
"""
from __future__ import annotations

import os

from cloudml import units
from cloudml.cli.base import Context, add_command, add_group, arg_type, format_time
from cloudml.sdk.dev import WAIT_TIMEOUT

TENANT_HELP = "the tenant (default: your own)"
HEADERS = ["NAME", "STATE", "CPU", "MEMORY", "GPUS", "PATH", "CREATED"]


def _state(env) -> str:
    return env.state.lower()


def _row(env) -> list:
    return [env.name, _state(env), units.format_cpu(env.cpu_millis), units.format_memory(env.memory_bytes), env.gpus,
            env.path, format_time(env.proto.create_time)]


def register(subparsers) -> None:
    group = add_group(subparsers, "dev", "Dev environments: JupyterLab in the browser, as your tenant")
    p = add_command(group, "create", create, "Create and start a dev environment")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--cpu", type=arg_type(units.parse_cpu), help=units.CPU_HELP + " (default: the platform's, 1)")
    p.add_argument("--memory", type=arg_type(units.parse_memory),
                   help=units.MEMORY_HELP + " (default: the platform's, 2Gi)")
    p.add_argument("--gpus", type=arg_type(lambda v: units.parse_count(v, "gpus")), help="whole GPUs")
    p.add_argument("--image", default="", help="an image to run (the kubernetes runtime only)")
    p.add_argument("--tenant", help=TENANT_HELP)
    add_wait_arguments(p)
    p = add_command(group, "list", list_, "List dev environments", aliases=["ls"])
    p.add_argument("--tenant", help=TENANT_HELP)
    for command, handler, text in (
            ("describe", describe, "Show a dev environment"),
            ("open", open_, "Print a one-time browser login link (and open a browser where there is one)"),
            ("stop", stop, "Stop its server (frees CPU, memory and GPUs; its files stay)"),
            ("start", start, "Start a stopped dev environment again"),
            ("delete", delete, "Delete a dev environment (its notebooks stay in your storage)")):
        p = add_command(group, command, handler, text, aliases=["get"] if command == "describe" else ())
        p.add_argument("name", metavar="NAME")
        p.add_argument("--tenant", help=TENANT_HELP)
        if command == "start":
            add_wait_arguments(p)
        if command == "open":
            p.add_argument("--no-browser", dest="browser", action="store_false",
                           help="only print the link, even where a browser could open it")


def add_wait_arguments(p) -> None:
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return at once instead of waiting until it runs")
    p.add_argument("--wait-timeout", type=float, default=WAIT_TIMEOUT, help="seconds to wait for it to run")


def _emit(ctx: Context, env, verb: str) -> None:
    ctx.emit(env.to_dict(), text=f"dev environment {env.name}: {_state(env)}"
             + (f" ({env.message})" if env.message and not env.running else "")
             + (f"\n{verb}; `cloudml dev open {env.name}` prints its login link" if env.running else ""))


def create(ctx: Context) -> None:
    a = ctx.args
    env = ctx.client.dev.create(a.name, cpu=f"{a.cpu}m" if a.cpu else None, memory=a.memory or None,
                                gpus=a.gpus or None, image=a.image, tenant=a.tenant, wait=a.wait,
                                wait_timeout=a.wait_timeout)
    _emit(ctx, env, "created")


def list_(ctx: Context) -> None:
    envs = ctx.client.dev.list(tenant=ctx.args.tenant)
    ctx.emit([e.to_dict() for e in envs], table=(HEADERS, [_row(e) for e in envs]))


def _get(ctx: Context):
    return ctx.client.dev.get(ctx.args.name, tenant=ctx.args.tenant)


def _idle_line(env) -> str:
    hours = env.idle_stop_seconds / 3600
    after = f"{hours:g} h" if hours >= 1 else f"{env.idle_stop_seconds} s"
    if env.HasField("idle_stop_time"):
        return f"stops at {format_time(env.idle_stop_time)} unless used (after {after} without page or kernel activity)"
    return f"stops after {after} without page or kernel activity"


def describe(ctx: Context) -> None:
    found = _get(ctx)
    env = found.proto
    r = env.resources
    ctx.emit(found.to_dict(), fields=[
        ("Name", env.name), ("Tenant", env.tenant), ("State", _state(found)), ("Message", env.message),
        ("Path", env.path), ("Working dir", env.working_dir),
        ("CPU", units.format_cpu(r.cpu_millis)), ("Memory", units.format_memory(r.memory_bytes)),
        ("GPUs", str(r.gpus)), ("Image", env.image or "(the platform's)"), ("Access key", env.access_key_id),
        ("Created", format_time(env.create_time)), ("Last activity", format_time(env.last_activity_time)),
        ("Idle stop", _idle_line(env)),
    ])


def _browser_available() -> bool:
    if os.environ.get("CLOUDML_NO_BROWSER"):
        return False
    if os.name == "posix" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and not os.environ.get("BROWSER"):
        return False
    return True


def open_(ctx: Context) -> None:
    env = _get(ctx)
    link = ctx.client.dev.login_link(env)
    opened = False
    if ctx.args.browser and not ctx.json and _browser_available():
        import webbrowser

        opened = webbrowser.open(link)
    ctx.emit({"name": env.name, "login_link": link, "browser_opened": opened}, text=link)


def stop(ctx: Context) -> None:
    env = ctx.client.dev.stop(ctx.args.name, tenant=ctx.args.tenant)
    ctx.emit(env.to_dict(), text=f"dev environment {env.name}: {_state(env)} (its files stay)")


def start(ctx: Context) -> None:
    a = ctx.args
    _emit(ctx, ctx.client.dev.start(a.name, tenant=a.tenant, wait=a.wait, wait_timeout=a.wait_timeout), "started")


def delete(ctx: Context) -> None:
    ctx.client.dev.delete(ctx.args.name, tenant=ctx.args.tenant)
    ctx.emit({"name": ctx.args.name, "deleted": True},
             text=f"deleting dev environment {ctx.args.name} (its notebooks stay in your storage)")
