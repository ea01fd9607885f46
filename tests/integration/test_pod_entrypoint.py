"""services.jobs.pod_entrypoint, what a train-job Pod runs on the kubernetes
runtime, run here as the process a container would run: it fetches a real
trainer package, installs it (uv, into the cache directory the package cache
volume provides) and execs the trainer; failures are one line and an exit
code the job's events can name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.jobs_stack import ROOT

ENTRYPOINT = [sys.executable, "-m", "services.jobs.pod_entrypoint"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pkgs"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), out,
                             "--only", "plain", "broken", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _run(workdir, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    os.makedirs(workdir, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
    environment.update(PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([*ENTRYPOINT, *args], cwd=workdir, capture_output=True, text=True, timeout=300,
                          env=environment)


def test_installs_the_package_into_the_cache_and_runs_the_trainer(tmp_path, packages):
    cache = str(tmp_path / "cache")
    args = ["--module", "plain_trainer.task", "--", "--x1", "3.14159", "--x2", "2.275", "--steps", "2", "--sleep", "0"]
    first = _run(tmp_path / "pod-1", "--package", "file://" + packages["plain"], *args,
                 env={"CLOUDML_PACKAGE_CACHE": cache})
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert abs(result["objective"] - 0.397887) < 1e-3
    assert "[platform] fetching file://" in first.stdout and "built:" in first.stdout
    [key] = [d for d in os.listdir(cache) if os.path.isdir(os.path.join(cache, d))]
    assert os.path.exists(os.path.join(cache, key, ".cloudml-ready"))
    # A second Pod with the same package and cache volume: installed once.
    second = _run(tmp_path / "pod-2", "--package", packages["plain"], *args, env={"CLOUDML_PACKAGE_CACHE": cache})
    assert second.returncode == 0, second.stderr
    assert f"environment {key[:12]} (cached)" in second.stdout


def test_without_a_cache_volume_the_environment_is_the_pods_own(tmp_path, packages):
    work = tmp_path / "pod"
    result = _run(work, "--module", "plain_trainer.task", "--", "--x1", "0", "--x2", "0", "--steps", "1",
                  "--sleep", "0", env={"CLOUDML_PACKAGE_URI": "file://" + packages["plain"]})
    assert result.returncode == 0, result.stderr
    assert os.path.isdir(work / ".cloudml-envs")


def test_a_missing_package_fails_with_one_line_and_exit_3(tmp_path):
    result = _run(tmp_path / "pod", "--package", f"file://{tmp_path}/nope-1.0.tar.gz", "--module", "x.task")
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [f"error: trainer package not found: file://{tmp_path}/nope-1.0.tar.gz"]


def test_a_package_that_cannot_install_fails_with_exit_4(tmp_path, packages):
    result = _run(tmp_path / "pod", "--package", packages["broken"], "--module", "broken_trainer.task",
                  env={"CLOUDML_PACKAGE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stderr.startswith("error: installing broken_trainer-1.0.tar.gz failed")
    assert "fails to install on purpose" in result.stderr
