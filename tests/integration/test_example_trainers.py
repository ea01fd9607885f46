"""The example trainers, built to sdists, installed into EnvCache environments
and run as the platform runs them (environment variables, TF_CONFIG), with
real TensorFlow.

With tenant isolation on (the tests run as root), `EnvCache.ensure` installs
as the tenant's Unix user, so the package must be readable by that user: as
the jobs service does (its fetched copy sits in the job's package directory,
gated for the tenant), the packages are built into a directory gated for
TENANT (services.common.tenancy)."""
from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from services.common.tenancy import Tenancy
from services.jobs.envs import EnvCache, InstallFailed, find_uv

UV = find_uv()
# uv is a dependency of the project (scripts/setup.sh installs it): its absence
# is a broken set-up, so every test here fails rather than being skipped.
assert UV is not None, "uv is not installed: run scripts/setup.sh"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "3"}
TENANT = "t1"


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("packages")
    tenancy = Tenancy()
    tenancy.ensure_reachable(str(out))
    tenancy.gate(str(out), TENANT, 0o750)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), str(out), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout)
    assert set(built) >= {"linear", "distributed", "plain", "testing", "broken"}
    assert os.path.basename(built["linear"]) == "trainer-1.0.tar.gz"
    return built


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> EnvCache:
    return EnvCache(str(tmp_path_factory.mktemp("envs")))


def install(cache: EnvCache, package: str):
    return asyncio.run(cache.ensure(package, tenant=TENANT))


def platform_env(tmp_path, replica_type: str = "master", index: int = 0, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(QUIET_TF)
    env.update(
        CLOUDML_JOB_NAME="example", CLOUDML_TENANT="test", CLOUDML_REPLICA_TYPE=replica_type,
        CLOUDML_REPLICA_INDEX=str(index), CLOUDML_ATTEMPT="1", CLOUDML_OUTPUT_PATH=str(tmp_path / "output"),
        CLOUDML_METRICS_FILE=str(tmp_path / "metrics.jsonl"), CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


def read_metrics(tmp_path) -> list[dict]:
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


CHECK_MODEL = textwrap.dedent(
    """
    import glob, json, sys
    import numpy as np, tensorflow as tf
    output = sys.argv[1]
    model = tf.saved_model.load(output + "/model/1")
    serve = model.signatures["serving_default"]
    inputs = {name: (spec.dtype.name, spec.shape.as_list()) for name, spec in serve.structured_input_signature[1].items()}
    xs = np.linspace(0, 50, 51, dtype=np.float32).reshape(-1, 1)
    keys = np.arange(1, 52, dtype=np.int32).reshape(-1, 1)
    result = serve(keys=tf.constant(keys), X=tf.constant(xs))
    seed = serve(keys=tf.constant([[1], [2]], tf.int32), X=tf.constant([[10.0], [30.0]], tf.float32))
    tags = set()
    for path in glob.glob(output + "/tensorboard/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    print(json.dumps({
        "inputs": inputs,
        "outputs": sorted(result),
        "max_error": float(np.max(np.abs(result["prediction"].numpy() - (2 * xs + 10)))),
        "keys_echoed": bool((result["keys"].numpy() == keys).all()),
        "seed": {"keys": seed["keys"].numpy().tolist(), "prediction": seed["prediction"].numpy().tolist()},
        "tags": sorted(tags),
    }))
    """
)


def check_model(python: str, output: str) -> dict:
    result = subprocess.run([python, "-c", CHECK_MODEL, output], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **QUIET_TF))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_linear_trainer_reports_loss_writes_summaries_and_exports_a_servable_model(packages, cache, tmp_path):
    env = install(cache, packages["linear"])
    run = subprocess.run(
        [env.python, "-m", "trainer.task", "--max_epochs", "10"],
        cwd=tmp_path, env=platform_env(tmp_path), capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Use the optimizer: sgd" in run.stdout and "Epoch: 0, loss: " in run.stdout
    assert "Epoch: 9, loss: " in run.stdout and "Get the model, w: " in run.stdout and "Done exporting!" in run.stdout

    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(10))
    assert all(set(m["metrics"]) == {"loss"} and m["replica"] == "master-0" and m["attempt"] == 1 for m in metrics)
    assert metrics[-1]["metrics"]["loss"] < 1.0 < metrics[0]["metrics"]["loss"]

    output = str(tmp_path / "output")
    assert [n for n in os.listdir(os.path.join(output, "tensorboard")) if n.startswith("events.out.tfevents.")]
    assert sorted(os.listdir(os.path.join(output, "model"))) == ["1"]  # no staging directory left behind

    model = check_model(env.python, output)
    assert model["inputs"] == {"keys": ["int32", [None, 1]], "X": ["float32", [None, 1]]}
    assert model["outputs"] == ["keys", "prediction"]
    assert model["keys_echoed"] and model["max_error"] < 0.5, model
    assert model["seed"]["keys"] == [[1], [2]]
    assert abs(model["seed"]["prediction"][0][0] - 30) < 0.5 and abs(model["seed"]["prediction"][1][0] - 70) < 0.5
    assert {"loss", "w", "b"} <= set(model["tags"])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_distributed_trainer_runs_parameter_server_training_on_loopback(packages, cache, tmp_path):
    env = install(cache, packages["distributed"])
    ports = free_ports(4)
    cluster = {
        "chief": [f"127.0.0.1:{ports[0]}"],
        "ps": [f"127.0.0.1:{ports[1]}"],
        "worker": [f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[3]}"],
    }
    procs = {}
    try:
        for replica_type, index in (("ps", 0), ("worker", 0), ("worker", 1), ("chief", 0)):
            tf_config = {"cluster": cluster, "task": {"type": replica_type, "index": index}, "environment": "cloud"}
            log = open(tmp_path / f"{replica_type}-{index}.log", "w")
            procs[f"{replica_type}-{index}"] = subprocess.Popen(
                [env.python, "-m", "distributed_trainer.task", "--max_epochs", "5"],
                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                env=platform_env(tmp_path, replica_type, index, TF_CONFIG=json.dumps(tf_config)),
            )
            log.close()
        code = procs["chief-0"].wait(timeout=240)
        chief_log = (tmp_path / "chief-0.log").read_text()
        assert code == 0, chief_log[-4000:]
        for name in ("ps-0", "worker-0", "worker-1"):  # still serving: the platform stops them
            assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    assert "ParameterServerStrategy with 1 ps, 2 workers" in chief_log and "Done exporting!" in chief_log
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(5)) and {m["replica"] for m in metrics} == {"chief-0"}
    assert metrics[-1]["metrics"]["loss"] < 1.0
    model = check_model(env.python, str(tmp_path / "output"))
    assert model["keys_echoed"] and model["max_error"] < 0.5, model


def test_plain_trainer_reports_a_decreasing_branin_curve_without_tensorflow(packages, cache, tmp_path):
    env = install(cache, packages["plain"])
    wrapper = (
        "import runpy, sys\n"
        "sys.argv = ['plain_trainer.task'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('plain_trainer.task', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'tensorflow' not in sys.modules, 'plain trainer imported tensorflow'\n"
    )
    run = subprocess.run(
        [env.python, "-c", wrapper, "--x1", str(math.pi), "--x2", "2.275", "--steps", "5"],
        cwd=tmp_path, env=platform_env(tmp_path), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(result["objective"] - 0.397887) < 1e-5
    curve = [m["metrics"]["objective"] for m in read_metrics(tmp_path)]
    assert len(curve) == 5 and curve == sorted(curve, reverse=True) and curve[0] > curve[-1]
    assert curve[-1] == pytest.approx(result["objective"])


def test_faulty_trainers_fail_as_asked_and_broken_package_fails_to_install(packages, cache, tmp_path):
    env = install(cache, packages["testing"])

    def run(module: str, *args: str, attempt: int = 1) -> subprocess.CompletedProcess:
        return subprocess.run(
            [env.python, "-m", f"faulty_trainer.{module}", *args], cwd=tmp_path, capture_output=True, text=True,
            env=platform_env(tmp_path, CLOUDML_ATTEMPT=str(attempt)), timeout=60,
        )

    assert run("exit_code", "--code", "3").returncode == 3
    assert [run("flaky", "--fail-times", "2", attempt=a).returncode for a in (1, 2, 3)] == [1, 1, 0]
    hog = run("hog_memory", "--mb", "30", "--hold", "0")
    assert hog.returncode == 0 and "30 MiB resident" in hog.stdout
    assert run("sleep", "--seconds", "0.2", "--every", "0.1").returncode == 0

    with pytest.raises(InstallFailed, match="fails to install on purpose"):
        install(cache, packages["broken"])
