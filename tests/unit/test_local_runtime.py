"""The `local` runtime with real processes: exit codes and reasons, logs,
memory limit (OOMKilled), stop of a whole process tree, survival of a killed
service and adoption of its replicas, capacity and GPU accounting, ports."""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import sys
import time

import psutil
import pytest

from services.common.runtime.base import (
    Amount,
    CapacityBusy,
    ReplicaPhase,
    ReplicaRequest,
    Unschedulable,
)
from services.common.runtime.local import LocalRuntime

MiB = 1 << 20
GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
async def rt(state_dir):
    runtime = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0))
    yield runtime
    await _stop_all(state_dir)


async def _stop_all(state_dir):
    """Leaves no replica behind, whatever the test did."""
    runtime = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0))
    for st in await runtime.adopt():
        if st.phase == ReplicaPhase.RUNNING:
            await runtime.stop(st.replica_id, grace_seconds=0.2)


def _req(tmp_path, rid, argv, *, group="g", memory=0, gpus=0, env=None) -> ReplicaRequest:
    return ReplicaRequest(replica_id=rid, group=group, argv=argv, env=env or {},
                          workdir=str(tmp_path / "work" / group),
                          log_path=str(tmp_path / "logs" / f"{rid}.log"),
                          resources=Amount(100, memory, gpus), tenant="t1")


def _log(tmp_path, rid) -> str:
    with open(tmp_path / "logs" / f"{rid}.log") as f:
        return f.read()


def _record(state_dir, rid) -> dict:
    with open(os.path.join(state_dir, f"{rid}.json")) as f:
        return json.load(f)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


async def _until(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- exit codes, logs

async def test_exit_zero_and_exit_three(rt, tmp_path):
    rt.reserve("g", [Amount(100), Amount(100)])
    ok = await rt.start(_req(tmp_path, "r-ok", ["true"]))
    bad = await rt.start(_req(tmp_path, "r-bad", ["sh", "-c", "exit 3"]))
    assert ok.pid > 0 and bad.pid > 0 and ok.group == "g"
    ok = await rt.wait("r-ok", timeout=5)
    bad = await rt.wait("r-bad", timeout=5)
    assert (ok.phase, ok.exit_code, ok.reason) == (ReplicaPhase.SUCCEEDED, 0, "Completed")
    assert (bad.phase, bad.exit_code, bad.reason) == (ReplicaPhase.FAILED, 3, "Error")
    assert "3" in bad.message and bad.finished_at >= bad.started_at > 0
    assert (await rt.status("r-bad")).exit_code == 3


async def test_signal_exit_code_is_128_plus_signal(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    await rt.start(_req(tmp_path, "r", ["sh", "-c", "kill -9 $$"]))
    st = await rt.wait("r", timeout=5)
    assert (st.phase, st.exit_code, st.reason) == (ReplicaPhase.FAILED, 137, "Error")
    assert "SIGKILL" in st.message


async def test_log_gets_stdout_and_stderr_appended(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    for i in range(2):  # the same replica id again (a restart) appends
        await rt.start(_req(tmp_path, "r", ["sh", "-c", f"echo out{i}; echo err{i} >&2; pwd"]))
        assert (await rt.wait("r", timeout=5)).exit_code == 0
    log = _log(tmp_path, "r")
    for text in ("out0", "err0", "out1", "err1", str(tmp_path / "work" / "g")):
        assert text in log


async def test_environment_is_the_request_and_a_minimal_base(rt, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDML_SERVICE_SECRET", "hunter2")
    rt = LocalRuntime(rt.state_dir, total=rt.total())  # base env taken at construction
    rt.reserve("g", [Amount(100)])
    await rt.start(_req(tmp_path, "r", ["sh", "-c", "env; echo cvd=[${CUDA_VISIBLE_DEVICES-unset}]"],
                        env={"TF_CONFIG": '{"task": {}}'}))
    assert (await rt.wait("r", timeout=5)).exit_code == 0
    log = _log(tmp_path, "r")
    assert "cvd=[]" in log  # set, and empty: no GPUs
    assert 'TF_CONFIG={"task": {}}' in log and "PATH=" in log
    assert "hunter2" not in log


async def test_command_not_found_fails_with_127(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    st = await rt.start(_req(tmp_path, "r", ["no-such-command-xyz"]))
    assert (st.phase, st.exit_code, st.reason) == (ReplicaPhase.FAILED, 127, "Error")
    assert "no-such-command-xyz" in st.message
    assert "no-such-command-xyz" in _log(tmp_path, "r")


# ---------------------------------------------------------------- memory limit

HOG = ("import time\n"
       "chunks = []\n"
       "for _ in range(30):\n"
       "    chunks.append(b'x' * (10 << 20))\n"
       "    time.sleep(0.01)\n"
       "print('allocated 300 MB', flush=True)\n"
       "time.sleep(30)\n")


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "grandchild"])
async def test_memory_hog_is_oomkilled(rt, tmp_path, wrap):
    argv = [sys.executable, "-c", HOG]
    if wrap:  # the hog is a child of a shell: the whole tree is measured
        argv = ["sh", "-c", shlex.join(argv) + "; echo shell-done"]
    rt.reserve("g", [Amount(100, 100 * MiB)])
    t0 = time.monotonic()
    await rt.start(_req(tmp_path, "hog", argv, memory=100 * MiB))
    st = await rt.wait("hog", timeout=5)
    elapsed = time.monotonic() - t0
    assert (st.phase, st.exit_code, st.reason) == (ReplicaPhase.FAILED, 137, "OOMKilled")
    assert elapsed < 2.0, elapsed
    assert "memory limit exceeded" in st.message
    log = _log(tmp_path, "hog")
    assert "allocated 300 MB" not in log and "shell-done" not in log
    assert "OOMKilled" in log


async def test_within_memory_limit_is_not_killed(rt, tmp_path):
    rt.reserve("g", [Amount(100, 200 * MiB)])
    await rt.start(_req(tmp_path, "r", [sys.executable, "-c", "x = b'x' * (20 << 20)"],
                        memory=200 * MiB))
    st = await rt.wait("r", timeout=5)
    assert (st.exit_code, st.reason) == (0, "Completed")


# ---------------------------------------------------------------- stop

TREE = ("sleep 101.1 & sleep 102.1 & (setsid sleep 103.1 &); "  # the last escapes the group
        "trap 'echo got-term' TERM; echo started; wait; wait")


async def test_stop_kills_the_whole_tree_within_the_grace(rt, state_dir, tmp_path):
    rt.reserve("g", [Amount(100)])
    st = await rt.start(_req(tmp_path, "r", ["sh", "-c", TREE]))
    shim_pid = _record(state_dir, "r")["shim_pid"]
    # shim, sh, 3 sleeps; and "started", printed once the shell's trap is set
    await _until(lambda: len(_alive(_tree(shim_pid))) >= 5 and "started" in _log(tmp_path, "r"))
    procs = _tree(shim_pid)
    replica = [p for p in procs if p.pid == st.pid]
    assert replica and replica[0].name() == "sh"
    t0 = time.monotonic()
    st = await rt.stop("r", grace_seconds=6.0)
    elapsed = time.monotonic() - t0
    assert (st.phase, st.reason) == (ReplicaPhase.FAILED, "Killed")
    # Everything obeyed SIGTERM: no SIGKILL at the end of the grace (the
    # margin absorbs a loaded machine).
    assert elapsed < 5.0, elapsed
    assert _alive(procs) == []
    assert "got-term" in _log(tmp_path, "r")
    assert (await rt.stop("r")).reason == "Killed"  # idempotent


async def test_stop_sigkills_after_the_grace(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    st = await rt.start(_req(tmp_path, "r", ["sh", "-c", "trap '' TERM; sleep 100; sleep 100"]))
    await asyncio.sleep(0.1)
    procs = _tree(st.pid)
    t0 = time.monotonic()
    st = await rt.stop("r", grace_seconds=0.5)
    elapsed = time.monotonic() - t0
    assert (st.reason, st.exit_code) == ("Killed", 137)
    assert 0.5 <= elapsed < 3.0, elapsed
    assert _alive(procs) == []


async def test_leftover_children_die_with_the_replica(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    script = "sleep 104.1 & echo child=$!; (setsid sleep 104.2 &); exit 0"
    await rt.start(_req(tmp_path, "r", ["sh", "-c", script]))
    st = await rt.wait("r", timeout=5)
    assert (st.exit_code, st.reason) == (0, "Completed")
    child = int(_log(tmp_path, "r").split("child=")[1].split()[0])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    leftovers = [p for p in psutil.process_iter(["cmdline", "status"])
                 if p.info["cmdline"] in (["sleep", "104.1"], ["sleep", "104.2"])
                 and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert leftovers == []


# ---------------------------------------------------------------- restart and adoption

@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_new_runtime_adopts_running_replicas_and_learns_exit_codes(state_dir, tmp_path):
    first = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0))
    first.reserve("job", [Amount(1000, GiB), Amount(1000, GiB)])
    short = await first.start(_req(tmp_path, "job.short", ["sh", "-c", "sleep 0.7; exit 7"], group="job"))
    long = await first.start(_req(tmp_path, "job.long", ["sleep", "30"], group="job"))
    del first  # the service is gone; its replicas are not stopped

    second = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0))
    adopted = {s.replica_id: s for s in await second.adopt()}
    assert set(adopted) == {"job.short", "job.long"}
    assert all(s.phase == ReplicaPhase.RUNNING for s in adopted.values())
    assert adopted["job.short"].pid == short.pid and adopted["job.long"].pid == long.pid
    assert second.free() == Amount(2000, 6 * GiB, 0)  # the reservation came back
    with pytest.raises(CapacityBusy):
        second.reserve("other", [Amount(3000)])

    st = await second.wait("job.short", timeout=5)
    assert (st.phase, st.exit_code, st.reason) == (ReplicaPhase.FAILED, 7, "Error")
    st = await second.stop("job.long", grace_seconds=1)
    assert st.reason == "Killed"
    assert not psutil.pid_exists(long.pid) or psutil.Process(long.pid).status() == psutil.STATUS_ZOMBIE
    second.release("job")
    assert second.free() == second.total()
    await second.forget("job.short")
    assert (await second.status("job.short")).phase == ReplicaPhase.UNKNOWN
    assert {s.replica_id for s in await second.adopt()} == {"job.long"}


SERVICE = """
import asyncio, sys
from services.common.runtime.base import Amount, ReplicaRequest
from services.common.runtime.local import LocalRuntime

async def main():
    state_dir, tmp = sys.argv[1], sys.argv[2]
    rt = LocalRuntime(state_dir, total=Amount(4000, 8 << 30, 0))
    rt.reserve("svc", [Amount(100), Amount(100)])
    for rid, cmd in (("svc.a", "sleep 1; exit 4"), ("svc.b", "sleep 30")):
        await rt.start(ReplicaRequest(rid, "svc", ["sh", "-c", cmd], {}, f"{tmp}/{rid}", f"{tmp}/{rid}.log", tenant="t1"))
    print("started", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_replicas_survive_kill_9_of_the_service_process_group(state_dir, tmp_path):
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVICE, state_dir, str(tmp_path), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        line = await asyncio.wait_for(service.stdout.readline(), 10)
        assert line.strip() == b"started"
    finally:
        os.killpg(service.pid, signal.SIGKILL)  # the service and its whole process group
        await service.wait()

    rt = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0))
    adopted = {s.replica_id: s for s in await rt.adopt()}
    assert {k: s.phase for k, s in adopted.items()} == {"svc.a": ReplicaPhase.RUNNING,
                                                        "svc.b": ReplicaPhase.RUNNING}
    assert rt.free() == Amount(3800, 8 * GiB, 0)
    st = await rt.wait("svc.a", timeout=5)
    assert (st.exit_code, st.reason) == (4, "Error")
    assert (await rt.stop("svc.b", grace_seconds=1)).reason == "Killed"


async def test_replica_whose_supervisor_died_is_lost_and_killed(rt, state_dir, tmp_path):
    rt.reserve("g", [Amount(100)])
    st = await rt.start(_req(tmp_path, "r", ["sleep", "30"]))
    os.kill(_record(state_dir, "r")["shim_pid"], signal.SIGKILL)
    await asyncio.sleep(0.1)
    fresh = LocalRuntime(state_dir, total=rt.total())
    [lost] = await fresh.adopt()
    assert (lost.phase, lost.reason) == (ReplicaPhase.UNKNOWN, "Lost")
    await _until(lambda: not _alive(_tree(st.pid)))
    assert (await fresh.status("r")).reason == "Lost"  # recorded, stable


# ---------------------------------------------------------------- capacity

def test_default_total_is_this_machine(state_dir, monkeypatch):
    monkeypatch.delenv("CLOUDML_GPUS", raising=False)
    total = LocalRuntime(state_dir).total()
    assert total.cpu_millis == os.cpu_count() * 1000
    assert total.memory_bytes == psutil.virtual_memory().total - GiB
    assert total.gpus == 0
    monkeypatch.setenv("CLOUDML_GPUS", "0,1")
    assert LocalRuntime(state_dir).total().gpus == 2


def test_unschedulable_versus_busy_and_release(state_dir):
    rt = LocalRuntime(state_dir, total=Amount(2000, 4 * GiB, 0))
    with pytest.raises(Unschedulable, match=r"gpus: requested 2, the local runtime has 0"):
        rt.reserve("g", [Amount(100, 0, 1), Amount(100, 0, 1)])
    with pytest.raises(Unschedulable, match=r"^cpu: requested 3000m, the local runtime has 2000m"):
        rt.check_fits_ever([Amount(1500), Amount(1500)])
    with pytest.raises(Unschedulable, match=r"memory: requested 5.0 GiB"):
        rt.reserve("g", [Amount(100, 5 * GiB)])
    with pytest.raises(Unschedulable, match=r"cannot run container images \(docker_image 'tf:2'\)"):
        rt.check_fits_ever([Amount(100)], image="tf:2")

    rt.reserve("a", [Amount(1500, GiB)])
    rt.reserve("a", [Amount(1500, GiB)])  # idempotent
    assert rt.free() == Amount(500, 3 * GiB, 0)
    with pytest.raises(CapacityBusy, match="cpu: requested 1000m, free 500m"):
        rt.reserve("b", [Amount(1000)])
    # gang: two replicas that fit one by one but not together reserve nothing
    with pytest.raises(CapacityBusy):
        rt.reserve("c", [Amount(400), Amount(400)])
    assert rt.free() == Amount(500, 3 * GiB, 0)
    # persisted: another instance on the same state_dir sees the reservation
    assert LocalRuntime(state_dir, total=Amount(2000, 4 * GiB, 0)).free() == Amount(500, 3 * GiB, 0)
    rt.release("a")
    rt.release("a")  # idempotent
    rt.reserve("b", [Amount(1000)])
    rt.reserve("c", [Amount(400), Amount(400)])
    assert rt.free() == Amount(200, 4 * GiB, 0)


async def test_image_is_refused_at_start(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    req = _req(tmp_path, "r", ["true"])
    req.image = "tensorflow/tensorflow:2.21.0"
    with pytest.raises(Unschedulable, match="local runtime cannot run container images"):
        await rt.start(req)


async def test_start_needs_a_reservation(rt, tmp_path):
    with pytest.raises(ValueError, match="no reservation"):
        await rt.start(_req(tmp_path, "r", ["true"], group="nope"))


async def test_gpus_are_whole_and_never_shared_between_groups(state_dir, tmp_path):
    rt = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0), gpu_ids=[0, 1])
    assert rt.total().gpus == 2
    rt.reserve("g1", [Amount(100, 0, 1)])
    rt.reserve("g2", [Amount(100, 0, 1)])
    with pytest.raises(CapacityBusy, match="gpus"):
        rt.reserve("g3", [Amount(100, 0, 1)])
    rt.reserve("cpu-only", [Amount(100)])
    show = ["sh", "-c", "echo cvd=[$CUDA_VISIBLE_DEVICES]"]
    s1 = await rt.start(_req(tmp_path, "r1", show, group="g1", gpus=1))
    s2 = await rt.start(_req(tmp_path, "r2", show, group="g2", gpus=1))
    s3 = await rt.start(_req(tmp_path, "r3", show, group="cpu-only"))
    for rid in ("r1", "r2", "r3"):
        assert (await rt.wait(rid, timeout=5)).exit_code == 0
    seen = {rid: _log(tmp_path, rid).strip() for rid in ("r1", "r2", "r3")}
    assert {seen["r1"], seen["r2"]} == {"cvd=[0]", "cvd=[1]"}
    assert seen["r3"] == "cvd=[]"
    assert {s1.gpu_ids, s2.gpu_ids} == {(0,), (1,)} and s3.gpu_ids == ()
    rt.release("g1")
    rt.reserve("g3", [Amount(100, 0, 1)])
    await rt.start(_req(tmp_path, "r4", show, group="g3", gpus=1))
    await rt.wait("r4", timeout=5)
    assert _log(tmp_path, "r4").strip() == seen["r1"]  # the released GPU


async def test_replicas_of_one_group_get_different_gpus(state_dir, tmp_path):
    rt = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0), gpu_ids=[2, 3, 5])
    rt.reserve("g", [Amount(100, 0, 1), Amount(100, 0, 2)])
    a = await rt.start(_req(tmp_path, "a", ["true"], gpus=1))
    b = await rt.start(_req(tmp_path, "b", ["true"], gpus=2))
    assert sorted(a.gpu_ids + b.gpu_ids) == [2, 3, 5]
    with pytest.raises(ValueError, match="handed out"):
        await rt.start(_req(tmp_path, "c", ["true"], gpus=1))
    await rt.wait("a", 5)
    await rt.wait("b", 5)


# ---------------------------------------------------------------- ports

async def test_addresses_are_distinct_free_loopback_ports(rt):
    keys = [("chief", 0), ("ps", 0), ("worker", 0), ("worker", 1)]
    for group in ("g", "h"):
        rt.reserve(group, [Amount(100)] * len(keys))
    try:
        first = await rt.addresses("g", keys, tenant="t1")
        second = await rt.addresses("h", keys, tenant="t1")
        assert set(first) == set(second) == set(keys)
        hosts_ports = [a.rsplit(":", 1) for a in [*first.values(), *second.values()]]
        assert {h for h, _ in hosts_ports} == {"127.0.0.1"}
        ports = [int(p) for _, p in hosts_ports]
        assert len(set(ports)) == 8
        for port in ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
    finally:
        for group in ("g", "h"):
            rt.release(group)  # and their ports' rules (tests/integration/test_job_ports.py)


# ---------------------------------------------------------------- start latency, concurrency

async def test_start_is_fast_and_concurrent_starts_are_safe(rt, tmp_path):
    rt.reserve("g", [Amount(100)] * 12)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        await rt.start(_req(tmp_path, f"seq-{i}", ["true"]))
        times.append(time.perf_counter() - t0)
    times.sort()
    # ~12 ms here: a python -I -S shim that imports only C modules. A heavy
    # import slipping into the shim (grpc, services.*) would show up as 100+ ms.
    assert times[2] < 0.3, times
    started = await asyncio.gather(*(rt.start(_req(tmp_path, f"par-{i}", ["sh", "-c", f"exit {i}"]))
                                     for i in range(7)))
    assert len({s.pid for s in started}) == 7
    for i in range(7):
        assert (await rt.wait(f"par-{i}", timeout=5)).exit_code == i
    sleeping = await rt.start(_req(tmp_path, "sleeper", ["sleep", "5"]))
    st = await rt.wait("sleeper", timeout=0.2)
    assert st.phase == ReplicaPhase.RUNNING and st.pid == sleeping.pid
    assert (await rt.start(_req(tmp_path, "sleeper", ["sleep", "5"]))).pid == sleeping.pid  # idempotent
    with pytest.raises(RuntimeError, match="still running"):
        await rt.forget("sleeper")


# --------------------------------------------------------------------------- tenant isolation
# The suite runs as root (as the README's test command does), so the runtime
# isolates tenants: each replica runs as its tenant's own unprivileged user.

_WHOAMI = ("import os, json; s = open('/proc/self/status').read();"
           "f = dict(l.split(':\\t', 1) for l in s.splitlines() if ':\\t' in l);"
           "print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(),"
           " 'groups': os.getgroups(), 'umask': os.umask(0), 'cwd_uid': os.stat('.').st_uid,"
           " 'nnp': f['NoNewPrivs'].strip(), 'capbnd': f['CapBnd'].strip(), 'capeff': f['CapEff'].strip()}))")


async def _whoami(rt, tmp_path, rid, tenant):
    rt.reserve(rid, [Amount(100)])
    req = _req(tmp_path, rid, [sys.executable, "-I", "-c", _WHOAMI], group=rid)
    req.tenant = tenant
    await rt.start(req)
    st = await rt.wait(rid, 30)
    assert st.exit_code == 0, _log(tmp_path, rid)
    return json.loads(_log(tmp_path, rid).strip().splitlines()[-1])


async def test_replica_runs_as_its_tenants_unprivileged_user(rt, tmp_path):
    a = await _whoami(rt, tmp_path, "ra", "tenant-a")
    b = await _whoami(rt, tmp_path, "rb", "tenant-b")
    for who in (a, b):
        assert who["uid"] == who["euid"] != 0 and who["gid"] != 0
        assert who["groups"] in ([], [who["gid"]])            # no supplementary groups
        assert who["nnp"] == "1"                               # setuid binaries give nothing back
        assert int(who["capbnd"], 16) == 0 and int(who["capeff"], 16) == 0
        assert who["umask"] == 0o077
        assert who["cwd_uid"] == who["uid"]                    # its working directory is its own
    assert a["uid"] != b["uid"] and a["gid"] != b["gid"]
    again = await _whoami(rt, tmp_path, "ra2", "tenant-a")
    assert again["uid"] == a["uid"]                            # one account per tenant


async def test_replica_cannot_read_the_platforms_files_and_its_log_is_private(rt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("platform secret")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o711)  # reachable, as a data dir is, but the file is root's own
    rt.reserve("g", [Amount(100)])
    await rt.start(_req(tmp_path, "r", ["sh", "-c", f"cat {secret}; echo rc=$?; kill -0 1; echo kill=$?"]))
    st = await rt.wait("r", 30)
    out = _log(tmp_path, "r")
    assert "platform secret" not in out and "rc=1" in out, out
    assert "kill=1" in out, out                                # cannot signal root's processes
    mode = os.stat(tmp_path / "logs" / "r.log").st_mode & 0o777
    assert mode == 0o600 and os.stat(tmp_path / "logs" / "r.log").st_uid == 0
    assert st.exit_code == 0


async def test_replica_without_a_tenant_is_refused_when_isolation_is_on(rt, tmp_path):
    rt.reserve("g", [Amount(100)])
    req = _req(tmp_path, "r", ["true"])
    req.tenant = ""
    with pytest.raises(ValueError, match="names no tenant"):
        await rt.start(req)


def test_a_resource_not_asked_for_fits_even_when_free_capacity_is_negative():
    # A GPU Node that leaves while its Pods run leaves free GPUs below zero:
    # CPU-only replicas still fit, GPU ones do not.
    free = Amount(1000, GiB, -1)
    assert Amount(500, MiB, 0).fits_in(free)
    assert not Amount(500, MiB, 1).fits_in(free)
    assert not Amount(1500, MiB, 0).fits_in(free)
    assert Amount(0, 0, 0).fits_in(Amount(-1, -1, -1))


async def test_cluster_ports_that_cannot_be_guarded_are_refused_unless_the_operator_accepts(rt, state_dir,
                                                                                             monkeypatch):
    """Without nftables a job gets no cluster ports while tenant isolation is on
    (the jobs service fails it, StartFailed, with this message); with
    CLOUDML_UNGUARDED_CLUSTER_PORTS=1 it gets them, unguarded."""
    from services.common.runtime.local import UNGUARDED_PORTS_ENV
    from services.common.runtime.port_guard import IsolationUnavailable, PortGuard

    assert rt.tenancy.enabled  # the suite runs as root
    rt._guard = PortGuard(rt._guard.table, nft="/nonexistent/nft")
    rt.reserve("g", [Amount(100)])
    try:
        with pytest.raises(IsolationUnavailable, match="nftables.*CLOUDML_UNGUARDED_CLUSTER_PORTS"):
            await rt.addresses("g", [("master", 0)], tenant="t1")
        with rt._capacity(write=False) as groups:
            assert "ports" not in groups["g"]  # nothing recorded as guarded
        monkeypatch.setenv(UNGUARDED_PORTS_ENV, "1")
        unguarded = LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0))
        assert unguarded._guard is None
        (address,) = (await unguarded.addresses("g", [("master", 0)], tenant="t1")).values()
        assert address.startswith("127.0.0.1:")
    finally:
        rt.release("g")


def _table_ports(table: str) -> set[int]:
    import json as _json
    import subprocess as _subprocess

    done = _subprocess.run(["nft", "-j", "list", "set", "inet", table, "ports"], capture_output=True, text=True)
    if done.returncode != 0:
        return set()
    return {p for item in _json.loads(done.stdout)["nftables"] for p in (item.get("set") or {}).get("elem", ())}


async def test_other_runtimes_ports_are_never_handed_out_and_down_drops_the_rules(rt, state_dir):
    from services.common.runtime.port_guard import PortGuard

    other = PortGuard("cloudml_unittestother")
    other.apply({45123: 4242})
    try:
        assert 45123 in rt._guard.elsewhere() and 45123 not in other.elsewhere()
        rt.reserve("g", [Amount(100)] * 2)
        addresses = await rt.addresses("g", [("ps", 0), ("worker", 0)], tenant="t1")
        ports = {int(a.rsplit(":", 1)[1]) for a in addresses.values()}
        assert _table_ports(rt._guard.table) == ports
        # `cloudml-platform down` stops every replica, then drops the rules (deploy/local/supervisor.py).
        LocalRuntime(state_dir, total=Amount(4000, 8 * GiB, 0)).unguard()
        assert _table_ports(rt._guard.table) == set()
        with rt._capacity(write=False) as groups:
            assert "ports" not in groups["g"] and "uid" not in groups["g"]
    finally:
        other.apply({})
        rt.release("g")


def test_reservations_from_many_threads_of_one_process_are_never_lost(rt):
    """flock serializes processes, not the threads of one (addresses() works on
    a thread beside the event loop's): without the runtime's own lock, two
    threads' read-modify-writes of the capacity file lost a group or failed
    renaming the same temporary file."""
    import concurrent.futures

    groups = [f"t{i}" for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda g: rt.reserve(g, [Amount(10)]), groups))
    with rt._capacity(write=False) as reserved:
        assert sorted(reserved) == sorted(groups)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(rt.release, groups))
    with rt._capacity(write=False) as reserved:
        assert reserved == {}
