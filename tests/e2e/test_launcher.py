"""`cloudml-platform up|down|status` with real processes: etcd, the services
and the gateway, driven through the console script exactly as a user would,
and called through the gateway endpoint written to DIR/credentials.json."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc
from deploy.local.etcd import free_port
from services.models.reconciler import ReconcilerSettings

# Drives `cloudml-platform` itself: up, down, status, killed components.
pytestmark = [pytest.mark.slow, pytest.mark.needs_local_platform]

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "cloudml-platform")
CLI = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "deploy.local.launcher"]
MODULE_CLI = [sys.executable, "-m", "deploy.local.launcher"]


def run_cli(*args: str, cli=CLI, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


class Platform:
    """One data dir with its gateway ports; `down` always runs at teardown."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.grpc_port = free_port()
        self.rest_port = free_port()
        self.seen_pids: set[int] = set()

    def up(self, *extra: str, cli=CLI, env=None, check: bool = True) -> subprocess.CompletedProcess:
        result = run_cli("up", "--data-dir", self.data_dir, "--grpc-port", str(self.grpc_port),
                         "--rest-port", str(self.rest_port), "--detach", *extra, cli=cli, env=env)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
            self.status()
        return result

    def down(self) -> subprocess.CompletedProcess:
        return run_cli("down", "--data-dir", self.data_dir)

    def status(self) -> tuple[int, dict]:
        result = run_cli("status", "--data-dir", self.data_dir, "-o", "json")
        status = json.loads(result.stdout)
        self.seen_pids |= {c["pid"] for c in status["components"] if c["pid"]}
        if status["supervisor_pid"]:
            self.seen_pids.add(status["supervisor_pid"])
        return result.returncode, status

    def component(self, name: str) -> dict:
        return next(c for c in self.status()[1]["components"] if c["component"] == name)

    @property
    def credentials(self) -> dict:
        with open(os.path.join(self.data_dir, "credentials.json")) as f:
            return json.load(f)

    def live_pids(self) -> list[int]:
        alive = []
        for pid in self.seen_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive


@pytest.fixture
def new_platform(tmp_path):
    made: list[Platform] = []

    def make(name: str = "") -> Platform:
        platform = Platform(str(tmp_path / (name or f"platform-{len(made)}")))
        made.append(platform)
        return platform

    yield make
    for platform in made:
        result = platform.down()
        assert result.returncode == 0, result.stderr
        assert platform.live_pids() == [], f"processes leaked: {platform.live_pids()}"


def admin_stub(platform: Platform, endpoint: str | None = None):
    creds = platform.credentials
    channel = grpc.insecure_channel(endpoint or creds["endpoint"])
    stub = pb_grpc.AuthServiceStub(channel)
    token = stub.IssueToken(pb.IssueTokenRequest(access_key_id=creds["access_key"],
                                                 secret_key=creds["secret_key"]), timeout=5).token
    return stub, (("authorization", f"Bearer {token}"),), channel


def eventually(action, timeout: float = 15.0):
    """Retries `action` on gRPC errors (a restarted service's stale registry
    entry may take a moment to be replaced)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def create_tenant(platform: Platform, name: str) -> None:
    def act():
        stub, md, channel = admin_stub(platform)
        with channel:
            stub.CreateTenant(pb.CreateTenantRequest(name=name), metadata=md, timeout=5)
    eventually(act)


def get_tenant(platform: Platform, name: str) -> pb.Tenant:
    def act():
        stub, md, channel = admin_stub(platform)
        with channel:
            return stub.GetTenant(pb.GetTenantRequest(name=name), metadata=md, timeout=5).tenant
    return eventually(act)


def assert_all_serving(platform: Platform) -> dict:
    code, status = platform.status()
    assert code == 0, status
    assert status["running"] and status["all_serving"]
    assert [c["component"] for c in status["components"]] == ["etcd", "auth", "jobs", "tuner", "models", "gateway"]
    assert all(c["health"] == "SERVING" and c["pid"] for c in status["components"]), status
    return status


# --- the main life cycle ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One platform for the tests below that leave it running."""
    platform = Platform(str(tmp_path_factory.mktemp("launcher") / "data"))
    try:
        platform.up()
        yield platform
    finally:
        platform.down()
        assert platform.live_pids() == []


def test_up_detach_then_status_reports_every_component_serving(running):
    status = assert_all_serving(running)
    gateway = next(c for c in status["components"] if c["component"] == "gateway")
    assert gateway["address"] == f"127.0.0.1:{running.grpc_port}"
    assert gateway["rest_address"] == f"http://127.0.0.1:{running.rest_port}"
    assert status["endpoint"] == f"127.0.0.1:{running.grpc_port}"

    table = run_cli("status", "--data-dir", running.data_dir)
    assert table.returncode == 0
    assert re.search(r"^auth\s+\d+\s+127\.0\.0\.1:\d+\s+SERVING", table.stdout, re.M), table.stdout


def test_first_start_writes_private_credentials_that_work_through_the_gateway(running):
    creds = running.credentials
    assert set(creds) == {"endpoint", "rest_endpoint", "access_key", "secret_key"}
    assert creds["endpoint"] == f"127.0.0.1:{running.grpc_port}"
    assert creds["rest_endpoint"] == f"http://127.0.0.1:{running.rest_port}"
    assert re.fullmatch(r"AK[A-Z2-7]{20}", creds["access_key"])
    for name in ("credentials.json", "bootstrap.json", "service-credentials.json"):
        mode = stat.S_IMODE(os.stat(os.path.join(running.data_dir, name)).st_mode)
        assert mode == 0o600, (name, oct(mode))

    stub, md, channel = admin_stub(running)
    with channel:
        assert stub.WhoAmI(pb.WhoAmIRequest(), metadata=md, timeout=5).tenant == "admin"
        stub.CreateTenant(pb.CreateTenantRequest(name="team-first"), metadata=md, timeout=5)
        assert stub.GetTenant(pb.GetTenantRequest(name="team-first"), metadata=md, timeout=5).tenant.name == "team-first"


def test_up_on_a_running_platform_says_so_and_exits_zero(running):
    before = running.status()[1]["supervisor_pid"]
    result = running.up()
    assert "already running" in result.stdout
    assert running.status()[1]["supervisor_pid"] == before
    assert_all_serving(running)


def test_killed_service_is_restarted_and_serving_again(running):
    old = running.component("auth")
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        auth = running.component("auth")
        if auth["pid"] and auth["pid"] != old["pid"] and auth["health"] == "SERVING":
            break
        assert time.monotonic() < deadline, f"auth not restarted: {auth}"
        time.sleep(0.2)
    assert auth["restarts"] == old["restarts"] + 1
    assert_all_serving(running)
    create_tenant(running, "after-restart")
    with open(os.path.join(running.data_dir, "logs", "supervisor.log")) as f:
        assert "auth exited unexpectedly (signal 9)" in f.read()


def wait_all_serving(platform: Platform, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, status = platform.status()
        if code == 0:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def test_killed_gateway_comes_back_on_its_public_port(running):
    old = running.component("gateway")
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while running.component("gateway")["pid"] in (None, old["pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = wait_all_serving(running)
    gateway = next(c for c in status["components"] if c["component"] == "gateway")
    assert gateway["address"] == f"127.0.0.1:{running.grpc_port}"
    create_tenant(running, "after-gateway-restart")


def test_killed_etcd_is_restarted_on_its_ports_and_services_recover(running):
    create_tenant(running, "before-etcd-kill")
    before = {c["component"]: c for c in running.status()[1]["components"]}
    os.kill(before["etcd"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while running.component("etcd")["pid"] in (None, before["etcd"]["pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    after = {c["component"]: c for c in wait_all_serving(running)["components"]}
    assert after["etcd"]["address"] == before["etcd"]["address"]
    # The services rode it out without a restart of their own.
    assert after["auth"]["pid"] == before["auth"]["pid"]
    assert after["gateway"]["pid"] == before["gateway"]["pid"]
    assert get_tenant(running, "before-etcd-kill").name == "before-etcd-kill"


# --- state across down/up ----------------------------------------------------------------------

def test_down_then_up_keeps_state_keys_and_internal_ports(new_platform):
    platform = new_platform()
    platform.up()
    create_tenant(platform, "team-kept")
    creds_before = platform.credentials
    etcd_address = platform.component("etcd")["address"]

    # The replica sockets' directory (made by the models service when a replica starts) goes with `down`.
    socket_root = ReconcilerSettings(data_dir=platform.data_dir).socket_root
    os.makedirs(os.path.join(socket_root, "team-kept"), exist_ok=True)
    down = platform.down()
    assert down.returncode == 0 and "Stopped" in down.stdout, down.stdout + down.stderr
    assert platform.live_pids() == []
    assert not os.path.exists(socket_root)
    code, status = platform.status()
    assert code == 3 and not status["running"]
    assert {c["health"] for c in status["components"]} == {"DOWN"}
    again = platform.down()
    assert again.returncode == 0 and "not running" in again.stdout

    # Up again (through `python -m`), on other gateway ports: the keys stay,
    # the endpoints follow the ports, every tenant is still there.
    platform.grpc_port, platform.rest_port = free_port(), free_port()
    platform.up(cli=MODULE_CLI)
    assert_all_serving(platform)
    creds = platform.credentials
    assert (creds["access_key"], creds["secret_key"]) == (creds_before["access_key"], creds_before["secret_key"])
    assert creds["endpoint"] == f"127.0.0.1:{platform.grpc_port}"
    assert creds["rest_endpoint"] == f"http://127.0.0.1:{platform.rest_port}"
    assert get_tenant(platform, "team-kept").name == "team-kept"
    # etcd listens on a Unix socket in a directory only the platform may enter.
    assert platform.component("etcd")["address"] == etcd_address and etcd_address.startswith("unix:")
    assert os.stat(os.path.dirname(etcd_address[len("unix:"):])).st_mode & 0o777 == 0o700


def test_concurrent_ups_on_one_dir_start_one_supervisor(new_platform):
    platform = new_platform()
    args = ["up", "--data-dir", platform.data_dir, "--grpc-port", str(platform.grpc_port),
            "--rest-port", str(platform.rest_port), "--detach"]
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    status = assert_all_serving(platform)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("already running" in out for out, _ in outputs) == 1, outputs
    supervisors = [p for p in psutil.process_iter(["cmdline"])
                   if "_supervise" in (p.info["cmdline"] or []) and platform.data_dir in p.info["cmdline"]]
    assert [p.pid for p in supervisors] == [status["supervisor_pid"]]


def test_two_platforms_run_side_by_side(new_platform):
    first, second = new_platform("one"), new_platform("two")
    first.up()
    second.up()
    assert_all_serving(first)
    assert_all_serving(second)
    assert first.credentials["access_key"] != second.credentials["access_key"]
    create_tenant(first, "only-in-one")
    stub, md, channel = admin_stub(second)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.GetTenant(pb.GetTenantRequest(name="only-in-one"), metadata=md, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- bad input and failure ------------------------------------------------------------------

def test_down_on_a_stopped_or_unknown_dir_says_not_running(tmp_path):
    result = run_cli("down", "--data-dir", str(tmp_path / "never-started"))
    assert result.returncode == 0 and "not running" in result.stdout


def test_stale_pid_file_is_ignored(new_platform):
    platform = new_platform()
    os.makedirs(os.path.join(platform.data_dir, "run"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(platform.data_dir, "run", "supervisor.pid"), "w") as f:
        f.write(f"{dead.pid}\n")
    code, status = platform.status()
    assert code == 3 and not status["running"]
    result = platform.down()
    assert result.returncode == 0 and "not running" in result.stdout
    assert not os.path.exists(os.path.join(platform.data_dir, "run", "supervisor.pid"))
    with open(os.path.join(platform.data_dir, "run", "supervisor.pid"), "w") as f:
        f.write(f"{dead.pid}\n")
    platform.up()
    assert_all_serving(platform)


def test_gateway_port_in_use_fails_with_one_line(new_platform):
    platform = new_platform()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        platform.grpc_port = taken.getsockname()[1]
        result = platform.up(check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{platform.grpc_port}" in lines[0] and "in use" in lines[0], result.stderr
    assert not platform.status()[1]["running"]


def test_service_not_serving_in_time_prints_its_log_and_stops_everything(new_platform):
    platform = new_platform()
    result = platform.up(env={"CLOUDML_PLATFORM_START_TIMEOUT": "0.2"}, check=False)
    assert result.returncode == 1
    assert "auth not SERVING within 0.2 s" in result.stderr
    assert "auth.log" in result.stderr
    code, status = platform.status()
    assert code == 3 and not status["running"]
    assert all(c["pid"] is None for c in status["components"])
    with open(os.path.join(platform.data_dir, "run", "state.json")) as f:
        recorded = [c["pid"] for c in json.load(f)["components"] if c["pid"]]
    platform.seen_pids |= set(recorded)
    assert platform.live_pids() == []


def test_foreground_up_supervises_until_sigint(tmp_path):
    data_dir = str(tmp_path / "fg")
    grpc_port, rest_port = free_port(), free_port()
    proc = subprocess.Popen([*CLI, "up", "--data-dir", data_dir, "--grpc-port", str(grpc_port),
                             "--rest-port", str(rest_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while True:
            result = run_cli("status", "--data-dir", data_dir, "-o", "json")
            status = json.loads(result.stdout)
            if result.returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        pids = {c["pid"] for c in status["components"]}
        assert status["supervisor_pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "running" in out and "platform stopped" in out
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
        run_cli("down", "--data-dir", data_dir)


def test_leftovers_of_a_killed_supervisor_are_stopped_by_down(new_platform):
    platform = new_platform()
    platform.up()
    status = assert_all_serving(platform)
    os.kill(status["supervisor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while platform.status()[1]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    code, status = platform.status()
    assert code == 3 and any(c["pid"] for c in status["components"])  # still there, unsupervised
    result = platform.down()
    assert result.returncode == 0, result.stderr
    assert platform.live_pids() == []

