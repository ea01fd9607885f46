"""A hostile tenant on a real platform (`cloudml-platform up`, as root, so
tenant isolation is on): its trainer and its SavedModel probe the machine
from inside, and nothing of another tenant's or of the platform's is read
or written.

Two tenants: `victim` runs a long job (metrics and logs that must not
change) and serves a model; `attacker` then

1. runs `hostile_trainer.probe` (tests/e2e/hostile/): every file under the
   data dir, the platform's secrets by name, every process's environ, every
   loopback port as etcd and as a model server without a token, every Unix
   socket the kernel lists, every other user's TCP listener as a server of
   TensorFlow's distributed runtime (the victim runs a distributed job:
   `hostile_trainer.cluster_server`), writes into the victim's job and storage; it
   prints what it got, and the test reads that back through the API (the
   job's logs), as the attacker would;
2. deploys `hostile_model.py`, whose signatures read, write and list files
   with TensorFlow's own ops, and asks it for the platform's credentials, the
   victim's files and a write into the victim's storage.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import psutil
import pytest

from tests.e2e.serving_platform import ROOT, ServingPlatform, clean_env, wait_until

# Reads the platform's data dir and processes as the attacker's probe saw them.
pytestmark = [pytest.mark.slow, pytest.mark.needs_local_platform]

HOSTILE = os.path.join(ROOT, "tests", "e2e", "hostile")
DONE = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


def build_sdist(source: str, out: str) -> str:
    scratch = os.path.join(out, "src-" + os.path.basename(source))
    shutil.copytree(source, scratch, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    subprocess.run([uv, "build", "--sdist", "--no-build-isolation", "--python", sys.executable, "--out-dir", out,
                    scratch], check=True, capture_output=True, env=clean_env())
    return next(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".tar.gz"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    platform = ServingPlatform(str(workdir / "data")).start()
    try:
        platform.workdir = str(workdir)
        platform.probe_package = build_sdist(HOSTILE, str(workdir / "dist"))
        examples = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "build_packages.py"),
                                   str(workdir / "packages"), "--only", "plain", "--json"],
                                  capture_output=True, text=True, timeout=120, env=clean_env())
        assert examples.returncode == 0, examples.stderr
        platform.plain_package = json.loads(examples.stdout)["plain"]
        models = {}
        for name, script in (("victim", os.path.join(ROOT, "tests", "conformance", "half_plus_two.py")),
                             ("hostile", os.path.join(HOSTILE, "hostile_model.py"))):
            built = subprocess.run([sys.executable, script, str(workdir / "models" / name)], capture_output=True,
                                   text=True, timeout=180, env=clean_env(), cwd=ROOT)
            assert built.returncode == 0, built.stderr[-2000:]
            models[name] = built.stdout.strip().splitlines()[-1]
        platform.models = models
        platform.wait_up()
        platform.configs = {}
        for tenant in ("victim", "attacker"):
            platform.configs[tenant] = platform.new_tenant(tenant)
            platform.cli("quota", "set", "--tenant", tenant, "--cpu", "2", "--memory", "6Gi", "--train-jobs", "2",
                         "--model-replicas", "2")
        yield platform
    finally:
        platform.down()


def as_tenant(platform, tenant, *args, **kw):
    return platform.cli_json(*args, config=platform.configs[tenant], **kw)


def wait_state(platform, tenant, job, states, timeout=240):
    def reached():
        got = as_tenant(platform, tenant, "jobs", "describe", job)
        return got if got["state"] in states else None
    return wait_until(reached, timeout, f"job {job} of {tenant} in {states}", interval=0.5)


@pytest.fixture(scope="module")
def victim(platform):
    """The victim's running job and its served model, with a snapshot of what
    the victim sees of them."""
    as_tenant(platform, "victim", "jobs", "submit", "-n", "steady", "-m", "plain_trainer.task",
              "-u", platform.plain_package, "-a", "--x1 1 --x2 2 --steps 400 --sleep 0.25", "-c", "0.2", "-M", "256Mi")
    wait_state(platform, "victim", "steady", ("JOB_STATE_RUNNING",) + DONE)
    wait_until(lambda: as_tenant(platform, "victim", "jobs", "metrics", "steady").get("series"), 60,
               "the victim's first metrics")
    created = as_tenant(platform, "victim", "models", "create", "-n", "hpt", "-v", "v1", "-u",
                        platform.models["victim"], "--wait", "--timeout", "180", timeout=240)
    assert created["model_version"]["state"] == "MODEL_VERSION_STATE_AVAILABLE", created
    # A distributed job whose replicas serve TensorFlow's distributed runtime on their cluster ports.
    as_tenant(platform, "victim", "jobs", "submit", "-n", "cluster", "-m", "hostile_trainer.cluster_server",
              "-u", platform.probe_package, "-a", "900", "--master", "1", "--ps", "1", "-c", "0.1", "-M", "1Gi")
    wait_state(platform, "victim", "cluster", ("JOB_STATE_RUNNING",) + DONE)
    wait_until(lambda: platform.cli("jobs", "logs", "cluster", config=platform.configs["victim"]).stdout.count(
        "serving ") == 2, 120, "the victim's cluster servers")
    described = as_tenant(platform, "victim", "jobs", "describe", "cluster")
    ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", json.dumps(described["replicas"]))}
    assert len(ports) == 2, described["replicas"]
    yield {"job": "steady", "model": "hpt", "cluster_ports": ports}
    platform.cli("jobs", "cancel", "cluster", config=platform.configs["victim"])


def _listening_ports(data_dir: str) -> set[int]:
    """TCP ports this platform's processes (a command line naming its data dir, and
    their children, such as the gateway's data plane) listen on; its etcd must have none."""
    ports = set()

    def ours(proc) -> bool:
        return any(data_dir in arg for arg in proc.cmdline())

    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            if not (ours(proc) or any(ours(parent) for parent in proc.parents())):
                continue
            listening = {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        assert not (proc.info["name"] == "etcd" and listening), ("the platform's etcd listens on TCP", listening)
        ports |= listening
    return ports


def forged(metrics) -> bool:
    """Whether the probe's forged point (step 999, loss -1) shows in a job's metrics."""
    points = [p for series in metrics.get("series", []) for p in series.get("points", [])]
    return "forged" in json.dumps(metrics) or any(int(p.get("step", 0)) == 999 or p.get("value") == -1.0
                                                  for p in points)


def test_hostile_trainer_reads_and_writes_nothing_of_others(platform, victim):
    data_dir = platform.data_dir
    secrets = {k: platform.credentials[k] for k in ("access_key", "secret_key")}
    with open(os.path.join(data_dir, "secrets", "kek"), "rb") as f:
        kek = f.read()

    submitted = as_tenant(platform, "attacker", "jobs", "submit", "-n", "probe", "-m", "hostile_trainer.probe",
                          "-u", platform.probe_package, "-a", f"{data_dir} victim steady {victim['model']}", "-c", "0.2",
                          "-M", "2Gi")  # it imports TensorFlow to try the victim's cluster ports
    assert submitted["created"], submitted
    job = wait_state(platform, "attacker", "probe", DONE, timeout=300)
    logs = platform.cli("jobs", "logs", "probe", config=platform.configs["attacker"]).stdout
    assert job["state"] == "JOB_STATE_SUCCEEDED", logs[-3000:]
    line = next(line for line in logs.splitlines() if "HOSTILE-REPORT " in line)
    report = json.loads(line.split("HOSTILE-REPORT ", 1)[1])

    assert report["uid"] != 0
    # Only the attacker's own files: its job, its storage, its environments.
    own = tuple(os.path.join(data_dir, *parts) + os.sep for parts in
                (("jobs", "attacker"), ("storage", "attacker"), ("envs", "attacker")))
    foreign_reads = [p for p in report["read"] if not p.startswith(own)]
    foreign_lists = [p for p in report["listed"] if p != data_dir and not (p + os.sep).startswith(own)]
    assert foreign_reads == [] and foreign_lists == [], (foreign_reads, foreign_lists)
    assert report["secrets"] == {}
    assert report["environ"] == [], "read other users' /proc/<pid>/environ"
    # An etcd the probe reached over TCP is another test's fixture (single-service
    # stacks use loopback etcd), never this platform's: its etcd has no TCP listener.
    platform_ports = _listening_ports(data_dir)
    reached = {int(k) for k, v in report["etcd"].items() if k.isdigit()}
    assert not reached & platform_ports, (report["etcd"], platform_ports)
    assert all(k.isdigit() or "socket listed" in v for k, v in report["etcd"].items()), report["etcd"]
    # This platform's replicas listen on no TCP port; one reached on loopback is another process's.
    answered = {int(k.rsplit(":", 1)[1]) for k in report["replicas"] if k.rsplit(":", 1)[-1].isdigit()}
    assert not answered & platform_ports, ("a model server answered without a token", report["replicas"])
    assert all(k.rsplit(":", 1)[-1].isdigit() for k in report["replicas"]), report["replicas"]
    assert report["wrote"] == []
    # The victim's cluster ports were found and tried as TensorFlow servers, and refused.
    tried = {int(port): got for port, got in report["tensorflow"].items()}
    assert victim["cluster_ports"] <= set(tried), (victim["cluster_ports"], tried)
    assert not [got for got in tried.values() if not got.startswith("refused")], tried
    for value in (*secrets.values(), kek.hex()):
        assert value not in logs

    # What the victim sees of its own job is untouched.
    victim_logs = platform.cli("jobs", "logs", "steady", config=platform.configs["victim"]).stdout
    metrics = as_tenant(platform, "victim", "jobs", "metrics", "steady")
    assert "forged" not in victim_logs and not forged(metrics), (victim_logs[-2000:], metrics)


def _predict(platform, tenant, model, signature, inputs):
    token = platform.token(config=platform.configs[tenant])
    return platform.rest("POST", f"/v1/models/{model}:predict",
                         {"signature_name": signature, "inputs": inputs}, token=token)


def test_hostile_saved_model_reads_and_writes_nothing_of_others(platform, victim):
    data_dir = platform.data_dir
    created = as_tenant(platform, "attacker", "models", "create", "-n", "evil", "-v", "v1", "-u",
                        platform.models["hostile"], "--wait", "--timeout", "180", timeout=240)
    assert created["model_version"]["state"] == "MODEL_VERSION_STATE_AVAILABLE", created
    secret_key = platform.credentials["secret_key"]

    # It works on the model's own files (the probe is real)...
    own = created["model_version"]["model_uri"].replace("file://", "").rstrip("/")
    status, body = _predict(platform, "attacker", "evil", "serving_default",
                            {"path": os.path.join(own, "saved_model.pb")})
    assert status == 200, body
    # ...and on nothing of the platform's or the victim's.
    targets = [os.path.join(data_dir, name) for name in
               ("credentials.json", "bootstrap.json", "service-credentials.json", "secrets/kek",
                "logs/auth.log", "etcd/member/snap/db")]
    targets.append(os.path.join(data_dir, "jobs", "victim", "steady", "logs", "job.log"))
    for path in targets + [os.path.join(data_dir, "storage", "victim")]:
        status, body = _predict(platform, "attacker", "evil", "serving_default", {"path": path})
        assert status != 200 and secret_key not in json.dumps(body), (path, status, body)
    for pattern in (os.path.join(data_dir, "*"), os.path.join(data_dir, "storage", "victim", "*"),
                    os.path.join(data_dir, "jobs", "victim", "*")):
        status, body = _predict(platform, "attacker", "evil", "listing", {"pattern": pattern})
        listed = body.get("outputs", []) if isinstance(body, dict) else []
        assert status != 200 or listed == [], (pattern, body)
    plant = os.path.join(data_dir, "storage", "victim", "planted.txt")
    status, body = _predict(platform, "attacker", "evil", "write", {"path": plant, "data": "x"})
    assert status != 200 and not os.path.exists(plant), body
    # The victim's model still serves.
    token = platform.token(config=platform.configs["victim"])
    status, body = platform.rest("POST", "/v1/models/hpt:predict", {"instances": [1.0]}, token=token)
    assert status == 200 and body["predictions"] == [2.5], (status, body)
