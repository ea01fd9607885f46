"""The supervisor of one local platform: owns etcd and every service process.

Start-up is in order (etcd, then the services in table order, each SERVING
before the next starts); afterwards a loop restarts whatever exits, with a
backoff per component (0.5 s doubling to 10 s, back to 0.5 s once it has been
up and SERVING for 60 s). SIGTERM/SIGINT stop the services in reverse order
(SIGTERM, 10 s grace, SIGKILL) and etcd last.

The supervisor records what it runs in DIR/run/state.json (pids with their
start times, addresses, restarts, phase), which `status` and `down` read and
which lets a later supervisor stop processes a killed one left behind.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

import psutil

from deploy.local.etcd import EtcdProcess, etcd_health, open_log, short_socket_dir
from deploy.local.layout import Layout, read_json, write_json
from deploy.local.service_process import ServiceProcess, health_status, service_command

log = logging.getLogger("cloudml.supervisor")

SERVING = 1
NOT_SERVING = 2
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
HEALTHY_RESET = 60.0
STOP_GRACE = 10.0
LOOP_INTERVAL = 0.2


@dataclass
class Ports:
    grpc: int
    rest: int


@dataclass(frozen=True)
class ServiceSpec:
    """One row of the launcher's service table."""

    name: str
    #: the --listen address; internal services bind port 0
    listen: Callable[[Ports], str] = lambda ports: "127.0.0.1:0"
    #: flags beyond the common ones (--etcd --listen --port-file --data-dir --credentials-file)
    extra: Callable[[Layout, Ports], list[str]] = lambda layout, ports: []
    #: extra addresses shown by `status` (e.g. the gateway's REST listener)
    rest: Callable[[Ports], str] | None = None


def log_tail(path: str, lines: int = 40, since: int = 0) -> str:
    """The last `lines` lines of a log, from byte offset `since` on."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def process_matches(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The live process `pid` if it is the one recorded (same start time),
    so a recycled pid is never taken for ours."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time is not None and abs(proc.create_time() - create_time) > 0.05:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def stop_leftovers(layout: Layout, grace: float = STOP_GRACE) -> list[str]:
    """Stops component processes recorded in state.json that outlived their
    supervisor (it was SIGKILLed); returns their names. Services first, etcd last."""
    state = read_json(layout.state) or {}
    procs = []
    for comp in reversed(state.get("components", [])):
        proc = process_matches(comp.get("pid"), comp.get("create_time"))
        if proc is not None:
            procs.append((comp["name"], proc))
    for name, proc in procs:
        log.warning("stopping %s (pid %d) left behind by an earlier supervisor", name, proc.pid)
        _terminate(proc, grace)
    return [name for name, _ in procs]


def stop_replicas(data_dir: str, grace: float = STOP_GRACE) -> int:
    """Stops every train-job and model-server replica the local runtime still
    runs for this platform (they outlive their services by design, so that a
    restarted service adopts them; `down` means everything stops). Running
    jobs are then judged by their restart policy on the next `up`, and model
    versions get fresh replicas. Returns how many were stopped."""
    from services.common.runtime.base import ReplicaPhase
    from services.common.runtime.local import LocalRuntime

    state_dir = os.path.join(data_dir, "runtime", "local")
    if not os.path.isdir(state_dir):
        return 0

    async def stop_all() -> int:
        runtime = LocalRuntime(state_dir)
        running = [s for s in await runtime.adopt() if s.phase == ReplicaPhase.RUNNING]
        for status in running:
            log.info("stopping replica %s (pid %d)", status.replica_id, status.pid)
        await asyncio.gather(*(runtime.stop(s.replica_id, grace) for s in running), return_exceptions=True)
        runtime.unguard()  # no job holds its cluster ports now
        return len(running)

    try:
        stopped = asyncio.run(stop_all())
    except Exception:  # noqa: BLE001 - stopping the rest of the platform matters more
        log.exception("could not stop the runtime's replicas")
        return 0
    remove_socket_root(data_dir)
    return stopped


def remove_socket_root(data_dir: str) -> None:
    """Removes the platform's directory of replica sockets (under /run, one
    per data dir) once its replicas are stopped; the models service makes it
    again. Only a real directory is removed, never what a link points to."""
    import shutil

    from services.models.reconciler import ReconcilerSettings

    root = ReconcilerSettings(data_dir=data_dir).socket_root
    try:
        if os.path.isdir(root) and not os.path.islink(root):
            shutil.rmtree(root)
    except OSError as err:
        log.warning("could not remove %s: %s", root, err)


def _terminate(proc: psutil.Process, grace: float) -> None:
    """SIGTERM, `grace` seconds, SIGKILL, for a process that is not our child."""
    try:
        proc.terminate()
        if not _wait_gone(proc, grace):
            proc.kill()
            _wait_gone(proc, 5)
    except psutil.NoSuchProcess:
        pass


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    # An orphan stays a zombie until init reaps it, which may take a while:
    # a zombie counts as gone.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _mark_log(path: str, name: str) -> int:
    """Appends a start marker to a component's log; returns the offset after it."""
    with open_log(path) as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} cloudml-platform starts {name} ===\n".encode())
        return f.tell()


class Component(abc.ABC):
    """A supervised process plus its restart bookkeeping."""

    name: str

    def __init__(self, name: str):
        self.name = name
        self.backoff = BACKOFF_INITIAL
        self.restart_at: float | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.last_exit: int | None = None
        self.next_health_check = 0.0
        self.log_offset = 0  # where the current process's output starts in its log

    # -- what subclasses provide
    @property
    @abc.abstractmethod
    def popen(self):
        """Provided by each kind of component."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Provided by each kind of component."""

    @abc.abstractmethod
    def spawn(self) -> None:
        """Provided by each kind of component."""

    @abc.abstractmethod
    def health(self) -> int:
        """Provided by each kind of component."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Provided by each kind of component."""

    # -- shared
    @property
    def pid(self) -> int | None:
        p = self.popen
        return p.pid if p is not None and p.poll() is None else None

    def exited(self) -> int | None:
        p = self.popen
        return p.poll() if p is not None else None

    def record(self) -> dict:
        pid = self.pid
        return {
            "name": self.name,
            "pid": pid,
            "create_time": _create_time(pid) if pid else None,
            "address": self.address if pid else "",
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


class EtcdComponent(Component):
    def __init__(self, layout: Layout, ports: Ports):
        super().__init__("etcd")
        self.ports = ports
        # Unix sockets in a directory only the platform's user may enter:
        # tenant code (other users) cannot reach etcd at all.
        self.etcd = EtcdProcess(layout.etcd_dir, log_path=layout.log("etcd"),
                                socket_dir=short_socket_dir(layout.etcd_socket_dir, layout.root))

    @property
    def popen(self):
        return self.etcd.process

    @property
    def address(self) -> str:
        return self.etcd.endpoint

    def spawn(self) -> None:
        # Blocks until healthy (its Unix sockets are recreated on each start).
        self.log_offset = _mark_log(self.etcd.log_path, self.name)
        self.etcd.start(attempts=3)

    def health(self) -> int:
        return etcd_health(self.address)

    def stop(self) -> None:
        self.etcd.stop(STOP_GRACE)


class ServiceComponent(Component):
    def __init__(self, spec: ServiceSpec, layout: Layout, ports: Ports, etcd: EtcdComponent, etcd_namespace: str = ""):
        super().__init__(spec.name)
        self.etcd_namespace = etcd_namespace
        self.spec = spec
        self.layout = layout
        self.ports = ports
        self.etcd = etcd
        self.proc: ServiceProcess | None = None

    @property
    def popen(self):
        return self.proc.process if self.proc else None

    @property
    def address(self) -> str:
        return self.proc.poll_address() if self.proc else ""

    def command(self) -> list[str]:
        return service_command(
            self.name, self.etcd.address, self.layout.port_file(self.name),
            listen=self.spec.listen(self.ports), data_dir=self.layout.root,
            credentials_file=self.layout.service_credentials, etcd_namespace=self.etcd_namespace,
            extra=self.spec.extra(self.layout, self.ports),
        )

    def spawn(self) -> None:
        self.log_offset = _mark_log(self.layout.log(self.name), self.name)
        self.proc = ServiceProcess(self.name, self.command(), self.layout.port_file(self.name),
                                   log_path=self.layout.log(self.name)).start()

    def health(self) -> int:
        return health_status(self.address) if self.address else 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(STOP_GRACE)


class StartupFailed(Exception):
    pass


@dataclass
class Supervisor:
    layout: Layout
    specs: list[ServiceSpec]
    ports: Ports
    start_timeout: float = 60.0
    #: the services' etcd key namespace (`up --etcd-namespace`)
    etcd_namespace: str = ""
    on_ready: Callable[["Supervisor"], None] | None = None
    on_ports_changed: Callable[[Ports], None] | None = None
    stopping: bool = False
    phase: str = "starting"
    error: str = ""
    etcd: EtcdComponent = field(init=False)
    services: list[ServiceComponent] = field(init=False)

    def __post_init__(self):
        self.etcd = EtcdComponent(self.layout, self.ports)
        self.services = [ServiceComponent(s, self.layout, self.ports, self.etcd, self.etcd_namespace)
                         for s in self.specs]

    @property
    def components(self) -> list[Component]:
        return [self.etcd, *self.services]

    # -- state file ---------------------------------------------------------------------

    def write_state(self) -> None:
        write_json(self.layout.state, {
            "supervisor_pid": os.getpid(),
            "supervisor_create_time": _create_time(os.getpid()),
            "phase": self.phase,
            "error": self.error,
            "grpc_port": self.ports.grpc,
            "rest_port": self.ports.rest,
            "rest": {s.name: s.spec.rest(self.ports) for s in self.services if s.spec.rest},
            "components": [c.record() for c in self.components],
            "updated": time.time(),
        })

    # -- life cycle ---------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if not self.stopping:
            log.info("received %s; stopping", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        """Starts everything, supervises until a stop signal, stops everything.
        Returns the process exit code (1 when start-up failed)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        write_json(self.layout.pid_file, os.getpid())
        left = stop_leftovers(self.layout)
        if left:
            log.warning("stopped leftovers of an earlier run: %s", ", ".join(left))
        self.write_state()
        code = 0
        try:
            self._start_all()
            if not self.stopping:
                self.phase = "ready"
                self.write_state()
                log.info("platform ready (gateway 127.0.0.1:%d)", self.ports.grpc)
                if self.on_ready:
                    self.on_ready(self)
                self._supervise()
        except StartupFailed as err:
            self.phase, self.error = "failed", str(err)
            log.error("start-up failed: %s", err)
            code = 1
        except Exception as err:  # noqa: BLE001 - record why, then stop what runs
            self.phase, self.error = "failed", f"supervisor error: {err!r}"
            log.exception("supervisor failed")
            code = 1
        finally:
            self._stop_all()
        return code

    def _start_all(self) -> None:
        log.info("starting etcd (data in %s)", self.layout.etcd_dir)
        try:
            self.etcd.spawn()
        except Exception as err:  # noqa: BLE001
            raise StartupFailed(f"etcd did not start: {err}\n--- {self.layout.log('etcd')} (tail) ---\n"
                                f"{log_tail(self.layout.log('etcd'), since=self.etcd.log_offset)}") from err
        self.etcd.started_at = time.monotonic()
        log.info("etcd healthy at %s (pid %d)", self.etcd.address, self.etcd.pid)
        if self.on_ports_changed:
            self.on_ports_changed(self.ports)
        self.write_state()
        for comp in self.services:
            if self.stopping:
                return
            comp.spawn()
            comp.started_at = time.monotonic()
            log.info("started %s (pid %d)", comp.name, comp.pid)
            self.write_state()
            self._wait_serving(comp)
            log.info("%s SERVING at %s", comp.name, comp.address)
            self.write_state()

    def _wait_serving(self, comp: ServiceComponent) -> None:
        deadline = time.monotonic() + self.start_timeout
        log_path = self.layout.log(comp.name)
        tail = lambda: log_tail(log_path, since=comp.log_offset)  # noqa: E731
        while not self.stopping:
            code = comp.exited()
            if code is not None:
                comp.last_exit = code
                raise StartupFailed(f"{comp.name} exited with code {code} during start-up\n"
                                    f"--- {log_path} (tail) ---\n{tail()}")
            if comp.address and comp.health() == SERVING:
                return
            if time.monotonic() > deadline:
                raise StartupFailed(f"{comp.name} not SERVING within {self.start_timeout:g} s\n"
                                    f"--- {log_path} (tail) ---\n{tail()}")
            time.sleep(0.1)

    def _supervise(self) -> None:
        while not self.stopping:
            changed = False
            for comp in self.components:
                if self.stopping:
                    break
                changed |= self._tend(comp)
            if changed:
                self.write_state()
            time.sleep(LOOP_INTERVAL)

    def _tend(self, comp: Component) -> bool:
        """One supervision step for one component; True if state changed."""
        now = time.monotonic()
        code = comp.exited()
        if code is not None and comp.restart_at is None:
            comp.last_exit = code
            comp.restart_at = now + comp.backoff
            log.warning("%s exited unexpectedly (%s); restarting in %.1f s", comp.name,
                        f"signal {-code}" if code < 0 else f"code {code}", comp.backoff)
            comp.backoff = min(comp.backoff * 2, BACKOFF_MAX)
            return True
        if comp.restart_at is not None:
            if now < comp.restart_at:
                return False
            return self._restart(comp)
        if comp.backoff > BACKOFF_INITIAL and now - comp.started_at >= HEALTHY_RESET and now >= comp.next_health_check:
            comp.next_health_check = now + 5
            if comp.health() == SERVING:
                log.info("%s healthy for %.0f s; backoff reset", comp.name, HEALTHY_RESET)
                comp.backoff = BACKOFF_INITIAL
        if isinstance(comp, ServiceComponent) and comp.proc and not comp.proc.address and comp.address:
            log.info("%s (pid %d) listening at %s", comp.name, comp.pid, comp.address)
            return True
        return False

    def _restart(self, comp: Component) -> bool:
        old_endpoint = self.etcd.address
        try:
            comp.spawn()
        except Exception as err:  # noqa: BLE001 - keep trying with backoff
            comp.restart_at = time.monotonic() + comp.backoff
            log.error("restarting %s failed: %s; next try in %.1f s", comp.name, err, comp.backoff)
            comp.backoff = min(comp.backoff * 2, BACKOFF_MAX)
            return False
        comp.restart_at = None
        comp.started_at = time.monotonic()
        comp.restarts += 1
        log.info("restarted %s (pid %d, restart #%d)", comp.name, comp.pid, comp.restarts)
        if comp is self.etcd and self.etcd.address != old_endpoint:
            # Its ports were taken meanwhile: the services must be told the new endpoint.
            log.warning("etcd moved from %s to %s; restarting the services", old_endpoint, self.etcd.address)
            if self.on_ports_changed:
                self.on_ports_changed(self.ports)
            for svc in reversed(self.services):
                svc.stop()
            for svc in self.services:
                svc.restart_at = time.monotonic()
        return True

    def _stop_all(self) -> None:
        self.phase = "stopping" if self.phase != "failed" else self.phase
        self.write_state()
        for comp in reversed(self.services):
            if comp.pid:
                log.info("stopping %s (pid %d)", comp.name, comp.pid)
            comp.stop()
        stop_replicas(self.layout.root)
        if self.etcd.pid:
            log.info("stopping etcd (pid %d)", self.etcd.pid)
        self.etcd.stop()
        if self.phase != "failed":
            self.phase = "stopped"
        self.write_state()
        try:
            os.unlink(self.layout.pid_file)
        except FileNotFoundError:
            pass
        log.info("all components stopped")
