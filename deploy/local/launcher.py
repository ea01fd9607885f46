"""`cloudml-platform`: runs the whole platform on this machine.

    cloudml-platform up --data-dir DIR [--grpc-port 8500] [--rest-port 8501] [--detach] [--etcd-namespace NS]
                        [--runtime kubernetes --kubeconfig FILE --namespace NS [--image IMAGE] ...]
    cloudml-platform down --data-dir DIR
    cloudml-platform status --data-dir DIR [-o json]

`up` starts a supervisor (in the foreground, or daemonized with --detach)
that owns etcd and every service of `SERVICES`, restarts whatever crashes and
stops everything on SIGTERM/SIGINT. One supervisor per data directory (an
flock on DIR/run/supervisor.lock, held by the supervisor for its whole life);
everything internal binds ephemeral loopback ports, so platforms on different
data dirs and gateway ports run side by side. See deploy/local/layout.py for
the files under DIR.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time

from deploy.local.etcd import port_is_free
from deploy.local import runtime_flags
from deploy.local.layout import Layout, ensure_credentials, read_json, write_json
from deploy.local.supervisor import (
    stop_replicas,
    SERVING,
    NOT_SERVING,
    STOP_GRACE,
    Ports,
    ServiceSpec,
    Supervisor,
    etcd_health,
    process_matches,
    stop_leftovers,
)
from deploy.local.service_process import health_status

# The platform's services in start order (stopped in reverse). Each starts once
# the previous one is SERVING. Internal services bind 127.0.0.1:0 and publish
# their port in DIR/run/<name>.port and in the etcd registry; the gateway
# binds the public ports and comes last.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("auth", extra=lambda layout, ports: ["--bootstrap-file", layout.bootstrap,
                                                     "--key-encryption-key-file", layout.path("secrets", "kek")]),
    ServiceSpec("jobs", extra=lambda layout, ports: runtime_flags.service_flags(layout, "jobs")),
    ServiceSpec("tuner"),
    ServiceSpec("models", extra=lambda layout, ports: runtime_flags.service_flags(layout, "models")),
    ServiceSpec("gateway",
                listen=lambda ports: f"127.0.0.1:{ports.grpc}",
                extra=lambda layout, ports: ["--rest-listen", f"127.0.0.1:{ports.rest}"],
                rest=lambda ports: f"http://127.0.0.1:{ports.rest}"),
)

#: comma-separated service names to leave out (for tests and debugging)
DISABLE_ENV = "CLOUDML_PLATFORM_DISABLE"
#: seconds a service may take to become SERVING during `up` (default 60)
START_TIMEOUT_ENV = "CLOUDML_PLATFORM_START_TIMEOUT"

EXIT_NOT_SERVING = 3
#: the daemon's working directory (holds `deploy` and `services`, and does not
#: go away like the caller's directory might)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEALTH_NAMES = {SERVING: "SERVING", NOT_SERVING: "NOT_SERVING"}

log = logging.getLogger("cloudml.launcher")


def enabled_services() -> list[ServiceSpec]:
    disabled = {s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()}
    unknown = disabled - {s.name for s in SERVICES}
    if unknown:
        raise SystemExit(f"error: {DISABLE_ENV} names unknown services: {', '.join(sorted(unknown))}")
    return [s for s in SERVICES if s.name not in disabled]


def start_timeout() -> float:
    return float(os.environ.get(START_TIMEOUT_ENV, "60"))


# -- the supervisor lock -------------------------------------------------------------------

def try_lock(layout: Layout) -> int | None:
    """An fd holding the supervisor lock, or None if a supervisor holds it."""
    os.makedirs(layout.run_dir, exist_ok=True)
    fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def acquire_lock(layout: Layout, patience: float = 0.5) -> int | None:
    """Like `try_lock`, but rides out a `status`/`down` that holds the lock for
    a moment to probe it: None only if it stays held for `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        fd = try_lock(layout)
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(0.02)


def is_running(layout: Layout) -> bool:
    if not os.path.exists(layout.lock_file):
        return False
    fd = try_lock(layout)
    if fd is None:
        return True
    os.close(fd)
    return False


def supervisor_pid(layout: Layout) -> int | None:
    try:
        with open(layout.pid_file) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def remove_stale_pid_file(layout: Layout) -> None:
    try:
        os.unlink(layout.pid_file)
    except FileNotFoundError:
        pass


# -- status --------------------------------------------------------------------------------

def collect_status(layout: Layout) -> dict:
    """What runs under DIR now: one row per component with its live health."""
    running = is_running(layout)
    state = read_json(layout.state) or {}
    recorded = {c["name"]: c for c in state.get("components", [])}
    names = [c["name"] for c in state.get("components", [])] if running and recorded else \
        ["etcd", *(s.name for s in enabled_services())]
    rest = state.get("rest", {}) if running else {}
    rows = []
    for name in names:
        rec = recorded.get(name, {})
        # Without a supervisor, processes a killed one left behind still show
        # (`down` or the next `up` stops them).
        proc = process_matches(rec.get("pid"), rec.get("create_time"))
        address = rec.get("address", "") if proc else ""
        if proc is None:
            health = "DOWN"
        else:
            code = etcd_health(address) if name == "etcd" else (health_status(address) if address else 0)
            health = HEALTH_NAMES.get(code, "NOT_SERVING")
        row = {"component": name, "pid": proc.pid if proc else None, "address": address, "health": health,
               "restarts": rec.get("restarts", 0) if proc else 0}
        if name in rest:
            row["rest_address"] = rest[name]
        rows.append(row)
    creds = read_json(layout.credentials) or {}
    return {
        "data_dir": layout.root,
        "running": running,
        "phase": state.get("phase", "stopped") if running else "stopped",
        "supervisor_pid": supervisor_pid(layout) if running else None,
        "endpoint": creds.get("endpoint", ""),
        "rest_endpoint": creds.get("rest_endpoint", ""),
        "credentials_file": layout.credentials,
        "components": rows,
        "all_serving": running and all(r["health"] == "SERVING" for r in rows),
    }


def format_table(status: dict) -> str:
    header = ("COMPONENT", "PID", "ADDRESS", "HEALTH", "RESTARTS")
    rows = [header]
    for r in status["components"]:
        address = r["address"] or "-"
        if r.get("rest_address") and r["address"]:
            address += f" (REST {r['rest_address']})"
        rows.append((r["component"], str(r["pid"] or "-"), address, r["health"], str(r["restarts"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    sup = f"supervisor pid {status['supervisor_pid']}" if status["running"] else "not running"
    if not status["running"] and any(r["pid"] for r in status["components"]):
        sup += " (processes left behind by a killed supervisor: `down` stops them)"
    return f"platform {status['data_dir']}: {sup}\n" + "\n".join(lines)


def cmd_status(args) -> int:
    layout = Layout.of(args.data_dir)
    status = collect_status(layout)
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(format_table(status))
    return 0 if status["all_serving"] else EXIT_NOT_SERVING


# -- up ------------------------------------------------------------------------------------

def summary(layout: Layout) -> str:
    status = collect_status(layout)
    creds = read_json(layout.credentials) or {}
    return "\n".join([
        f"Cloud-ML platform is running (data dir {layout.root}).",
        f"  gRPC endpoint:  {creds.get('endpoint', '?')}",
        f"  REST endpoint:  {creds.get('rest_endpoint', '?')}",
        f"  credentials:    {layout.credentials} (admin access key {creds.get('access_key', '?')})",
        f"  logs:           {layout.logs_dir}/",
        "",
        format_table(status),
        "",
        "Use it with the CLI:",
        f"  export CLOUDML_CONFIG={layout.credentials}",
        f"  # or once: cloudml configure --from-file {layout.credentials}",
        "  cloudml auth print-access-token",
        f"Stop it with: cloudml-platform down --data-dir {layout.root}",
    ])


def configure_supervisor_logging(layout: Layout, console: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.FileHandler(layout.log("supervisor"))
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.WARNING)
        stream.setFormatter(logging.Formatter("cloudml-platform: %(message)s"))
        root.addHandler(stream)


def etcd_namespace(layout: Layout, requested: str | None) -> str:
    """The etcd key namespace of the platform's services: chosen on the first
    start (`up --etcd-namespace`, default none) and kept, since the state in
    etcd lives under it; asking for another one later is an error."""
    first = not os.path.exists(layout.bootstrap)
    saved = (read_json(layout.config) or {}).get("etcd_namespace", "")
    if requested is None or requested == saved:
        return saved
    if first:
        return requested
    raise RuntimeError(f"the platform on {layout.root} keeps its state under etcd namespace {saved!r}, "
                       f"not {requested!r}")


def prepare(layout: Layout, grpc_port: int, rest_port: int, namespace: str | None = None,
            runtime: dict | None = None) -> tuple[Ports, str]:
    """Directories, keys and credential files, and the saved gateway ports,
    etcd namespace and runtime settings (deploy/local/runtime_flags.py)."""
    namespace = etcd_namespace(layout, namespace)
    layout.make_dirs()
    # DIR/secrets/kek: the auth service's key-encryption key (it creates the file).
    os.makedirs(layout.path("secrets"), mode=0o700, exist_ok=True)
    os.chmod(layout.path("secrets"), 0o700)
    first = ensure_credentials(layout, grpc_port, rest_port)
    ports = Ports(grpc=grpc_port, rest=rest_port)
    save_ports(layout, ports, namespace, runtime)
    if first:
        log.info("first start: created the admin and service keys")
    return ports, namespace


def save_ports(layout: Layout, ports: Ports, namespace: str = "", runtime: dict | None = None) -> None:
    data = {"grpc_port": ports.grpc, "rest_port": ports.rest}
    if namespace:
        data["etcd_namespace"] = namespace
    runtime = runtime if runtime is not None else (read_json(layout.config) or {}).get(runtime_flags.RUNTIME_KEY)
    if runtime and runtime.get("kind", "local") != "local":
        data[runtime_flags.RUNTIME_KEY] = runtime
    if read_json(layout.config) != data or os.stat(layout.config).st_mode & 0o077:
        write_json(layout.config, data, 0o600)  # nothing in the data dir is for tenant code


def gateway_ports_in_use(ports: Ports, specs: list[ServiceSpec]) -> str | None:
    if not any(s.name == "gateway" for s in specs):
        return None
    if ports.grpc == ports.rest:
        return f"error: --grpc-port and --rest-port must differ (both are {ports.grpc})"
    for port, what, flag in ((ports.grpc, "gRPC", "--grpc-port"), (ports.rest, "REST", "--rest-port")):
        if not port_is_free(port):
            return f"error: gateway {what} port 127.0.0.1:{port} is already in use (choose another with {flag})"
    return None


def wait_for_running(layout: Layout, timeout: float) -> bool:
    """Waits until a supervisor started elsewhere reports ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_json(layout.state) or {}
        if not is_running(layout):
            return False
        if state.get("phase") == "ready":
            return True
        time.sleep(0.1)
    return False


def cmd_up(args) -> int:
    layout = Layout.of(args.data_dir)
    specs = enabled_services()
    budget = start_timeout() * (len(specs) + 1) + 30
    lock_fd = acquire_lock(layout)
    if lock_fd is None:
        print(f"The platform on {layout.root} is already running.")
        if wait_for_running(layout, budget):
            state = read_json(layout.state) or {}
            if (state.get("grpc_port"), state.get("rest_port")) != (args.grpc_port, args.rest_port):
                print(f"note: it runs with --grpc-port {state.get('grpc_port')} --rest-port {state.get('rest_port')}; "
                      "run `down` first to change them")
            print(summary(layout))
            return 0
        state = read_json(layout.state) or {}
        print(f"error: it stopped before becoming ready: {state.get('error') or 'see ' + layout.log('supervisor')}",
              file=sys.stderr)
        return 1
    try:
        remove_stale_pid_file(layout)
        error = gateway_ports_in_use(Ports(grpc=args.grpc_port, rest=args.rest_port), specs)
        if error:
            print(error, file=sys.stderr)
            return 1
        try:
            runtime = runtime_flags.settings_of(args, layout)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        ports, namespace = prepare(layout, args.grpc_port, args.rest_port, args.etcd_namespace, runtime)
        if args.detach:
            return _up_detached(layout, lock_fd, budget)
        configure_supervisor_logging(layout, console=True)
        print(f"Starting the platform on {layout.root} ...", flush=True)
        sup = Supervisor(layout, specs, ports, start_timeout=start_timeout(), etcd_namespace=namespace,
                         on_ready=lambda s: print(summary(layout) + "\n\nSupervising; Ctrl-C stops the platform.",
                                                  flush=True),
                         on_ports_changed=lambda p: save_ports(layout, p, namespace))
        code = sup.run()
        if code:
            print(f"error: {sup.error}", file=sys.stderr)
            print("everything was stopped", file=sys.stderr)
        else:
            print("platform stopped")
        return code
    finally:
        os.close(lock_fd)


def _up_detached(layout: Layout, lock_fd: int, budget: float) -> int:
    """Starts `_supervise` in a new session; it inherits the lock fd, so the lock
    is never free in between. Returns once it reports ready or has failed."""
    with open(layout.log("supervisor"), "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.local.launcher", "_supervise",
             "--data-dir", layout.root, "--lock-fd", str(lock_fd)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(lock_fd,),
            start_new_session=True, cwd=PROJECT_ROOT,
        )
    write_json(layout.pid_file, proc.pid)
    deadline = time.monotonic() + budget
    while True:
        code = proc.poll()
        state = read_json(layout.state) or {}
        own = state.get("supervisor_pid") == proc.pid
        if code is not None:
            error = state.get("error") if own else ""
            if not error:
                error = ("the platform was stopped (by `down` or a signal) before it was ready" if code == 0
                         else f"the supervisor exited with code {code}")
            print(f"error: {error}", file=sys.stderr)
            print(f"everything was stopped; see {layout.log('supervisor')}", file=sys.stderr)
            return 1
        if own and state.get("phase") == "ready":
            break
        if time.monotonic() > deadline:
            print(f"error: the platform did not start within {budget:.0f} s; stopping it", file=sys.stderr)
            proc.terminate()
            proc.wait()
            return 1
        time.sleep(0.1)
    print(summary(layout))
    return 0


def cmd_supervise(args) -> int:
    """The daemon body (hidden command): ports and credentials are prepared by `up`."""
    layout = Layout.of(args.data_dir)
    lock_fd = args.lock_fd if args.lock_fd is not None else try_lock(layout)
    if lock_fd is None:
        print(f"another supervisor runs on {layout.root}", file=sys.stderr)
        return 2
    configure_supervisor_logging(layout, console=False)
    saved = read_json(layout.config) or {}
    ports = Ports(grpc=int(saved["grpc_port"]), rest=int(saved["rest_port"]))
    namespace = saved.get("etcd_namespace", "")
    sup = Supervisor(layout, enabled_services(), ports, start_timeout=start_timeout(), etcd_namespace=namespace,
                     on_ports_changed=lambda p: save_ports(layout, p, namespace))
    return sup.run()


# -- down ----------------------------------------------------------------------------------

def cmd_down(args) -> int:
    layout = Layout.of(args.data_dir)
    if not os.path.isdir(layout.root):
        print(f"The platform on {layout.root} is not running.")
        return 0
    lock_fd = acquire_lock(layout)
    if lock_fd is not None:
        try:
            left = stop_leftovers(layout)
            stop_replicas(layout.root)
            remove_stale_pid_file(layout)
        finally:
            os.close(lock_fd)
        if left:
            print(f"The platform on {layout.root} was not running; stopped leftover processes: {', '.join(left)}")
        else:
            print(f"The platform on {layout.root} is not running.")
        return 0

    state = read_json(layout.state) or {}
    pid = supervisor_pid(layout) or state.get("supervisor_pid")
    sup = process_matches(pid, None)
    if sup is None:
        print(f"error: {layout.lock_file} is locked but no supervisor pid is known", file=sys.stderr)
        return 1
    print(f"Stopping the platform on {layout.root} (supervisor pid {sup.pid}) ...", flush=True)
    sup.send_signal(signal.SIGTERM)
    n = len(state.get("components", [])) or 3
    deadline = time.monotonic() + STOP_GRACE * n + 15
    while time.monotonic() < deadline:
        lock_fd = try_lock(layout)
        if lock_fd is not None:
            break
        time.sleep(0.1)
    else:
        print("the supervisor did not stop in time; killing it", file=sys.stderr)
        try:
            sup.kill()
        except Exception:  # noqa: BLE001 - it may have just exited
            pass
        time.sleep(0.2)
        lock_fd = try_lock(layout)
    try:
        left = stop_leftovers(layout)
        stop_replicas(layout.root)
        if left:
            print(f"stopped leftover processes: {', '.join(left)}", file=sys.stderr)
        remove_stale_pid_file(layout)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    print("Stopped.")
    return 0


# -- entry point ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudml-platform",
                                     description="Run the Cloud-ML platform on this machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,down,status}")

    up = sub.add_parser("up", help="start etcd and every service (idempotent)")
    up.add_argument("--data-dir", required=True, help="where the platform keeps its state, keys and logs")
    up.add_argument("--grpc-port", type=int, default=8500, help="the gateway's gRPC port (default 8500)")
    up.add_argument("--rest-port", type=int, default=8501, help="the gateway's HTTP port (default 8501)")
    up.add_argument("--detach", action="store_true",
                    help="return once everything is SERVING, leaving a background supervisor")
    up.add_argument("--etcd-namespace", default=None,
                    help="keep the services' etcd keys under this prefix (set on the first start and kept)")
    runtime_flags.add_arguments(up)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop every component of the platform")
    down.add_argument("--data-dir", required=True)
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="show each component's pid, address and health "
                                           "(exit 0 if all SERVING, 3 otherwise)")
    status.add_argument("--data-dir", required=True)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_status)

    supervise = sub.add_parser("_supervise")  # started by `up --detach`
    supervise.add_argument("--data-dir", required=True)
    supervise.add_argument("--lock-fd", type=int)
    supervise.set_defaults(func=cmd_supervise)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `down`/`status` report in their own words; the supervisor adds its log file.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
