"""Train, deploy, predict: the platform's whole story, as a user runs it.

On one platform (`cloudml-platform up --detach`):

1. `cloudml jobs submit` the linear example trainer (its sdist built with
   examples/build_packages.py), wait for SUCCEEDED;
2. `cloudml models create` from the job's exported SavedModel
   (<output_path>/model/1), with --wait;
3. `cloudml models predict linear -d data.json` with the seed's format
   ({"keys_dtype": "int32", "keys": [[1],[2]], "X_dtype": "float32",
   "X": [[10.0],[30.0]]}) and with TF Serving's row format: the keys come
   back, the predictions are 2x+10 within 0.5;
4. the same through the gateway's gRPC port with the stock TF Serving client
   (examples/predict_client.py, run as its own process: the pytest process
   never imports TensorFlow).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.serving_platform import ROOT, clean_env, wait_until

pytestmark = pytest.mark.slow

SEED_DATA = {"keys_dtype": "int32", "keys": [[1], [2]], "X_dtype": "float32", "X": [[10.0], [30.0]]}
EXPECTED = [30.0, 70.0]  # 2x + 10


@pytest.fixture(scope="module")
def platform(tmp_path_factory, serving_platform):
    workdir = tmp_path_factory.mktemp("train_deploy_predict")
    platform = serving_platform(str(workdir / "data")).start()
    try:
        build = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), str(workdir / "packages"),
             "--only", "linear", "--json"], capture_output=True, text=True, timeout=120, env=clean_env(),
        )
        assert build.returncode == 0, build.stderr
        platform.package = json.loads(build.stdout)["linear"]
        platform.workdir = str(workdir)
        platform.wait_up()
        yield platform
    finally:
        platform.down()


@pytest.fixture(scope="module")
def trained(platform) -> str:
    """Submits the linear trainer and returns its SavedModel directory once SUCCEEDED."""
    submitted = platform.cli_json("jobs", "submit", "-n", "linear", "-m", "trainer.task", "-u", platform.package,
                                  "-a", "--max_epochs 10")
    assert submitted["created"] and submitted["job"]["name"] == "linear", submitted

    def finished():
        job = platform.cli_json("jobs", "describe", "linear")
        return job if job["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED") else None

    job = wait_until(finished, 240, "the linear job to finish", interval=1.0)
    logs = platform.cli("jobs", "logs", "linear", check=False).stdout
    assert job["state"] == "JOB_STATE_SUCCEEDED", f"{job}\n{logs[-3000:]}"
    assert "Epoch: 9, loss: " in logs and "Done exporting!" in logs, logs[-3000:]
    output = job["spec"]["output_path"]
    if output.startswith("file://"):
        output = output[len("file://"):]
    saved_model = os.path.join(output, "model", "1")
    assert os.path.isfile(os.path.join(saved_model, "saved_model.pb")), os.listdir(output)
    return saved_model


@pytest.fixture(scope="module")
def deployed(platform, trained) -> dict:
    created = platform.cli_json("models", "create", "-n", "linear", "-v", "v1", "-u", trained, "--wait",
                                "--timeout", "180")
    version = created["model_version"]
    assert created["created"] and version["state"] == "MODEL_VERSION_STATE_AVAILABLE", created
    assert version["version"] == "1" and len(version["replicas"]) == 1, version
    return version


def assert_linear(outputs: dict) -> None:
    assert outputs["keys"] == [[1], [2]], outputs
    predictions = [row[0] for row in outputs["prediction"]]
    assert all(abs(p - e) < 0.5 for p, e in zip(predictions, EXPECTED)) and len(predictions) == 2, outputs


def test_cli_predict_with_the_seed_format(platform, deployed):
    data = os.path.join(platform.workdir, "data.json")
    with open(data, "w") as f:
        json.dump(SEED_DATA, f)
    answer = platform.cli_json("models", "predict", "linear", "-d", data)
    assert set(answer) == {"outputs"}, answer
    assert_linear(answer["outputs"])
    # The readable form prints the same JSON; an explicit version works too.
    text = platform.cli("models", "predict", "linear", "1", "-d", data).stdout
    assert_linear(json.loads(text)["outputs"])


def test_cli_predict_with_tf_serving_row_format(platform, deployed):
    data = os.path.join(platform.workdir, "rows.json")
    with open(data, "w") as f:
        json.dump({"instances": [{"keys": [1], "X": [10.0]}, {"keys": [2], "X": [30.0]}]}, f)
    answer = platform.cli_json("models", "predict", "linear", "-d", data)
    rows = answer["predictions"]
    assert_linear({"keys": [r["keys"] for r in rows], "prediction": [r["prediction"] for r in rows]})


def test_stock_grpc_client_through_the_gateway(platform, deployed):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "predict_client.py"), "--endpoint", platform.endpoint,
         "--model", "linear", "--token", platform.token(), "--input", "keys:int32:1,2",
         "--input", "X:float32:10,30"],
        capture_output=True, text=True, timeout=120, env=clean_env(), cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    assert answer["model_spec"] == {"name": "linear", "version": 1, "signature_name": "serving_default"}
    assert_linear(answer["outputs"])

