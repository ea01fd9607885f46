"""The serving tests against a platform that runs already (`pytest --endpoint`).

A platform is started with the launcher (`cloudml-platform up`, its services
under an etcd key namespace: `--etcd-namespace`), then pytest runs, in a
subprocess, an end-to-end file that can run anywhere plus one whose tests all
need a local platform, with `--endpoint` and the platform's admin
credentials.json: the first one's tests pass on this platform, the second
one's are deselected with a line that says so, and no second platform is
started.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deploy.local.layout import Layout, read_json
from deploy.local.stack import EtcdTarget
from tests.e2e.serving_platform import ROOT, ServingPlatform, clean_env

pytestmark = pytest.mark.slow

NAMESPACE = "/remote-platform"


@pytest.mark.timeout(900)
def test_e2e_tests_run_against_a_running_platform_without_starting_another(tmp_path):
    platform = ServingPlatform(str(tmp_path / "data"), up_args=("--etcd-namespace", NAMESPACE)).start()
    try:
        platform.wait_up()
        inner = tmp_path / "inner"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--basetemp", str(inner),
             "tests/e2e/test_train_deploy_predict.py", "tests/e2e/test_launcher_signing_keys.py",
             "--endpoint", platform.endpoint, "--credentials", platform.credentials_path],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=840)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-6000:]
        assert f"platform under test: {platform.endpoint} (--endpoint; none is started)" in output, output[-3000:]
        assert "3 passed, 1 deselected" in output, output[-3000:]
        assert f"--endpoint {platform.endpoint}: deselected 1 test(s) marked needs_local_platform" in output

        # The tests' job and model are this platform's.
        assert platform.cli_json("jobs", "describe", "linear")["state"] == "JOB_STATE_SUCCEEDED"
        described = platform.cli_json("models", "describe", "linear")
        assert [v["state"] for v in described["model_versions"]] == ["MODEL_VERSION_STATE_AVAILABLE"]
        # No second platform: nothing under the inner run's directories was ever a platform's data dir.
        started = [os.path.join(d, n) for d, _, names in os.walk(inner) for n in names
                   if n in ("platform.json", "supervisor.lock", "state.json")]
        assert started == []

        # Every key the services wrote lies under the platform's namespace.
        etcd = next(c for c in read_json(Layout.of(platform.data_dir).state)["components"] if c["name"] == "etcd")
        keys = EtcdTarget(etcd["address"]).get_prefix("/")
        assert any(k.startswith(f"{NAMESPACE}/cloudml/jobs/") for k in keys)
        assert [k for k in keys if not k.startswith(NAMESPACE + "/cloudml/")] == []
    finally:
        platform.down()
