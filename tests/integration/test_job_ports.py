"""A local job's cluster ports are its tenant's alone
(services/common/runtime/port_guard.py), tried as another tenant would.

TensorFlow's distributed runtime server, which a distributed job's replicas
start on the ports TF_CONFIG names, authenticates no one, runs any graph it
is sent as the user it runs as, and listens on every interface. Without the
guard another tenant's process reads the job's files through it: the real
TensorFlow attack below succeeds as the job's own user (the control) and
must fail as anyone else. Plain TCP shows the rest: who may connect, who may
listen first (squatting), that nothing from outside the machine gets in
(a network namespace plays the outside), and that a released job's ports are
everyone's again.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from services.common.runtime.base import Amount, ReplicaPhase, ReplicaRequest
from services.common.runtime.local import LocalRuntime
from services.common.tenancy import Tenancy, setpriv_prefix

GiB = 1 << 30

SERVE = """
import socket, sys, time
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from the job")
    c.close()
"""

# "got <what the server said>", "connected" (nothing said), or "no <why>".
CONNECT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except OSError as err:
    sys.exit(print("no", type(err).__name__))
c.settimeout(1)
try:
    print("got", c.recv(100).decode())
except OSError:
    print("connected")
"""

TF_SERVER = """
import sys, time
import tensorflow as tf
tf.distribute.Server(tf.train.ClusterSpec({"worker": ["127.0.0.1:" + sys.argv[1]]}), job_name="worker", task_index=0)
print("serving", flush=True)
time.sleep(600)
"""

# The attack: a graph with a ReadFile op placed on the job's worker, run through its port.
TF_ATTACK = """
import sys
import tensorflow as tf
tf.compat.v1.disable_eager_execution()
with tf.device("/job:worker/task:0"):
    data = tf.io.read_file(sys.argv[2])
config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=8000)
try:
    with tf.compat.v1.Session("grpc://127.0.0.1:" + sys.argv[1], config=config) as session:
        print("STOLEN", session.run(data).decode())
except Exception as err:
    print("refused", type(err).__name__)
"""


@pytest.fixture(scope="module")
def tenants():
    tenancy = Tenancy(enabled=True)
    suffix = uuid.uuid4().hex[:6]
    accounts = {name: tenancy.account(f"{name}-{suffix}") for name in ("victim", "attacker")}
    yield {name: (f"{name}-{suffix}", account) for name, account in accounts.items()}
    for account in accounts.values():
        subprocess.run(["userdel", account.name], check=False)


@pytest.fixture
def runtime(tmp_path):
    rt = LocalRuntime(str(tmp_path / "state"), total=Amount(4000, 8 * GiB, 0))
    yield rt


def run_as(account, code: str, *args: str, timeout: float = 60) -> str:
    out = subprocess.run([*setpriv_prefix(account), sys.executable, "-c", code, *args], capture_output=True,
                         text=True, timeout=timeout, cwd="/")
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]


async def start_job(runtime, tmp_path, tenant: str, group: str, count: int, code: str, ready: str):
    """A group of `count` replicas of `tenant`; replica i runs `code` with its port."""
    runtime.reserve(group, [Amount(100, 512 << 20)] * count)
    addresses = await runtime.addresses(group, [("worker", i) for i in range(count)], tenant=tenant)
    ports = [int(addresses[("worker", i)].rsplit(":", 1)[1]) for i in range(count)]
    workdir = tmp_path / "work" / group
    log = tmp_path / f"{group}.log"
    await runtime.start(ReplicaRequest(
        replica_id=f"{group}.worker-0", group=group, argv=[sys.executable, "-c", code, str(ports[0])],
        env={}, workdir=str(workdir), log_path=str(log), resources=Amount(100, 1 << 30), tenant=tenant))
    deadline = time.monotonic() + 60
    while ready not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"the replica did not start: {log.read_text() if log.exists() else ''}"
        time.sleep(0.1)
    return ports, workdir


async def stop_job(runtime, group: str) -> None:
    status = await runtime.status(f"{group}.worker-0")
    if status.phase == ReplicaPhase.RUNNING:
        await runtime.stop(status.replica_id, grace_seconds=0.5)
    runtime.release(group)


async def test_only_the_jobs_tenant_connects_listens_or_reaches_it_from_outside(runtime, tmp_path, tenants):
    (victim, victim_account), (_, attacker) = tenants["victim"], tenants["attacker"]
    group = f"ports-{uuid.uuid4().hex[:6]}"
    ports, _ = await start_job(runtime, tmp_path, victim, group, 2, SERVE, "listening")
    squatter = None
    try:
        for host in ("127.0.0.1", "::1"):
            # The job's own replicas (its tenant's user) connect; another tenant gets a reset.
            assert run_as(victim_account, CONNECT, host, str(ports[0]), "5") == "got hello from the job"
            assert run_as(attacker, CONNECT, host, str(ports[0]), "5") == "no ConnectionRefusedError"
        # The attacker listens on the job's second port before its replica does: the job's replicas
        # never reach it (its SYN-ACKs are dropped), nor does anyone else.
        squatter = subprocess.Popen([*setpriv_prefix(attacker), sys.executable, "-c", SERVE, str(ports[1])],
                                    stdout=subprocess.PIPE, text=True, cwd="/")
        assert squatter.stdout.readline().strip() == "listening"
        assert run_as(victim_account, CONNECT, "127.0.0.1", str(ports[1]), "2") == "no TimeoutError"
        # From outside the machine (a network namespace with its own interface plays the outside):
        # the replica listens on every interface, and nothing gets through.
        with outside() as (run_outside, host_ip):
            assert run_outside(CONNECT, host_ip, str(ports[0]), "2") == "no TimeoutError"
    finally:
        if squatter is not None:
            squatter.kill()
            squatter.wait()
        await stop_job(runtime, group)
    # Released: the rules are gone with the job.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", ports[0]))
        server.listen()
        assert run_as(attacker, CONNECT, "127.0.0.1", str(ports[0]), "5") == "connected"


@contextlib.contextmanager
def outside():
    """A network namespace joined to this one by a veth pair: its processes
    reach this machine as another host on the network would."""
    name = f"cmlout{uuid.uuid4().hex[:6]}"
    host_if, peer_if = f"{name}h"[:15], f"{name}p"[:15]
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if],
        ["ip", "link", "set", peer_if, "netns", name],
        ["ip", "addr", "add", "10.254.254.1/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", "10.254.254.2/30", "dev", peer_if],
        ["ip", "-n", name, "link", "set", peer_if, "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)

        def run_outside(code: str, *args: str) -> str:
            out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code, *args],
                                 capture_output=True, text=True, timeout=30)
            return out.stdout.strip() or out.stderr[-500:]

        # The way in works: a server of no job on the same interface answers.
        with socket.socket() as probe:
            probe.bind(("10.254.254.1", 0))
            probe.listen()
            assert run_outside(CONNECT, "10.254.254.1", str(probe.getsockname()[1]), "5") == "connected"
        yield run_outside, "10.254.254.1"
    finally:
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


async def test_another_tenant_cannot_run_a_graph_on_a_jobs_tensorflow_server(runtime, tmp_path, tenants):
    (victim, victim_account), (_, attacker) = tenants["victim"], tenants["attacker"]
    group = f"tf-{uuid.uuid4().hex[:6]}"
    ports, workdir = await start_job(runtime, tmp_path, victim, group, 1, TF_SERVER, "serving")
    try:
        secret = workdir / "secret.txt"
        secret.write_text("the victim's data")
        os.chown(secret, victim_account.uid, victim_account.gid)
        os.chmod(secret, 0o600)
        # The control: the attack works for the job's own user (the server runs any graph it is
        # sent; the path is the server's: relative to its working directory).
        assert run_as(victim_account, TF_ATTACK, str(ports[0]), "secret.txt", timeout=120) == \
            "STOLEN the victim's data"
        # Another tenant can neither read the file nor have the job's server read it.
        assert "Permission" in run_as(attacker, "open(__import__('sys').argv[1]).read()", str(secret))
        assert run_as(attacker, TF_ATTACK, str(ports[0]), "secret.txt", timeout=120).startswith("refused")
    finally:
        await stop_job(runtime, group)
