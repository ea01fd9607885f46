"""The Python SDK and the examples/sdk_*.py workflows against a real platform
slice (etcd, auth, jobs, models, tuner and a gateway with its native data
plane, on loopback), run as a user would: as a tenant of its own, inside its
quota, the examples as their own processes with CLOUDML_* credentials.

- examples/sdk_train.py trains the linear example; examples/sdk_deploy_predict.py
  deploys the SavedModel it printed, labels it and predicts with numpy;
- examples/sdk_tune.py runs examples/studies/plain_space.json (Cloud ML
  Engine's parameter shape), `cloudml hp submit --watch` the same file;
- the SDK's typed results and errors, paging, and Predict's error messages
  (NOT_FOUND names the tenant, a missing input lists the signature's inputs,
  examples/predict_client.py prints one line).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

import cloudml
from cloudml import errors
from deploy.local.stack import Stack

# Training, a model replica and two studies: minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(900)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module")
def platform(tmp_path_factory, etcd_server):
    workdir = tmp_path_factory.mktemp("sdk-examples")
    stack = Stack(str(workdir / "stack"), etcd_endpoint=etcd_server.endpoint, lease_ttl=3,
                  service_flags={"models": ["--stop-grace", "2"]})
    # The packages, built as a user does, into ./pkgs where the study files name them.
    build = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "build_packages.py"), str(workdir / "pkgs"),
                              "--only", "linear", "plain", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        stack.start("jobs", "models", "tuner", "gateway")
        out, err = build.communicate(timeout=180)
        assert build.returncode == 0, err
        stack.packages = json.loads(out)
        stack.home = str(workdir)
        tenant = f"sdk-{uuid.uuid4().hex[:8]}"
        access_key, secret = stack.create_tenant(tenant)
        with cloudml.Client(stack.gateway.address, *stack.admin) as admin:
            admin.set_quota(tenant, cpu="4", memory="8Gi", train_jobs=4, model_replicas=2, studies=4)
        stack.tenant = tenant
        stack.env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
        stack.env.update(CLOUDML_ENDPOINT=stack.gateway.address, CLOUDML_ACCESS_KEY=access_key,
                         CLOUDML_SECRET_KEY=secret, CLOUDML_REST_ENDPOINT=stack.rest,
                         CLOUDML_CONFIG=str(workdir / "none.json"), TF_CPP_MIN_LOG_LEVEL="2")
        yield stack
    finally:
        if build.poll() is None:
            build.kill()
        stack.stop()


@pytest.fixture(scope="module")
def client(platform):
    with cloudml.Client(platform.env["CLOUDML_ENDPOINT"], platform.env["CLOUDML_ACCESS_KEY"],
                        platform.env["CLOUDML_SECRET_KEY"], config_path=platform.env["CLOUDML_CONFIG"]) as c:
        c.rest_endpoint = platform.rest
        yield c


def run(platform, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command as the tenant, from the user's working directory (where ./pkgs is)."""
    return subprocess.run(list(argv), cwd=platform.home, env=platform.env, capture_output=True, text=True,
                          timeout=timeout)


def example(platform, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(platform, sys.executable, os.path.join(EXAMPLES, name), *args, timeout=timeout)


def cli(platform, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(platform, sys.executable, "-m", "cloudml.cli.main", *args, timeout=timeout)


@pytest.fixture(scope="module")
def saved_model(platform) -> str:
    """examples/sdk_train.py on the linear trainer: the SavedModel it printed."""
    trained = example(platform, "sdk_train.py", platform.packages["linear"], "--name", "linear")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    out = trained.stdout
    assert "job linear: QUEUED" in out or "job linear: PREPARING" in out or "job linear: RUNNING" in out, out[:500]
    assert "[master-0] Epoch: 9, loss: " in out and "Done exporting!" in out, out[-2000:]
    assert "job linear: SUCCEEDED" in out, out[-2000:]
    losses = [line for line in out.splitlines() if line.startswith("loss (master-0): ")]
    assert len(losses) == 1 and len(losses[0].split(": ", 1)[1].split()) == 10, out[-2000:]
    path = out.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(path, "saved_model.pb")), path
    return path


def test_sdk_train_then_deploy_and_predict_examples(platform, saved_model):
    deployed = example(platform, "sdk_deploy_predict.py", saved_model, "--name", "linear")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    out = deployed.stdout
    assert "model linear v1: AVAILABLE, 1/1 replicas ready" in out, out
    assert "0/1 replicas ready" in out, out  # the progress of the wait
    (line,) = [line for line in out.splitlines() if line.startswith("prediction: ")]
    predictions = json.loads(line.split(": ", 1)[1])
    assert abs(predictions[0] - 30.0) < 0.5 and abs(predictions[1] - 70.0) < 0.5, out  # y = 2x + 10
    assert "keys: [1, 2]" in out, out
    assert (f"a mistyped name: NOT_FOUND: Servable not found for request: Latest(linear-typo) (cloudml: no model "
            f"'linear-typo' in tenant '{platform.tenant}' that you may call; see `cloudml models list`)") in out, out


def test_sdk_models_typed_results_and_predict_errors(platform, client, saved_model):
    # The same spec as examples/sdk_deploy_predict.py's: created once, whichever runs first.
    version = client.models.create("linear", saved_model, version=1, wait=True, timeout=300, cpu="0.5",
                                   memory="1Gi", replicas=1)
    assert version.state == "AVAILABLE" and version.ready_replicas == 1 and version.desired_replicas == 1
    assert version.uri.startswith("file://") and version.created in (True, False)
    model = client.models.label("linear", "stable", 1)
    assert model.labels["stable"] == 1 and model.tenant == platform.tenant and model.name == "linear"
    assert "linear" in [m.name for m in client.models.list()]
    assert [v.version for v in client.models.versions("linear")] == [1]
    import numpy  # the SDK's own dependency here (TF Serving's answer as arrays)

    y = client.models.predict("linear", {"keys": numpy.array([[1], [2]]), "X": numpy.array([[10.0], [30.0]])},
                              label="stable")
    assert isinstance(y["prediction"], numpy.ndarray) and y["prediction"].shape == (2, 1), y
    assert abs(float(y["prediction"][1][0]) - 70.0) < 0.5 and y["keys"].tolist() == [[1], [2]]
    rows = client.models.predict("linear", [{"keys": [1], "X": [10.0]}], raw=True)
    assert set(rows) == {"predictions"}
    # A missing input: TF Serving's message, then the signature's inputs.
    with pytest.raises(errors.InvalidArgument) as info:
        client.models.predict("linear", {"X": [[10.0]]})
    assert info.value.code == "INVALID_ARGUMENT"
    message = info.value.message
    assert "takes inputs: X (DT_FLOAT [-1,1]), keys (DT_INT32 [-1,1])" in message, message
    with pytest.raises(errors.NotFound) as info:
        client.models.predict("nope", [[1.0]])
    assert f"tenant '{platform.tenant}'" in info.value.message and "cloudml models list" in info.value.message
    with pytest.raises(errors.NotFound) as info:
        client.models.predict("linear", [[1.0]], version=7)
    assert "cloudml models describe linear" in info.value.message, info.value.message


def test_predict_client_prints_one_line_on_error(platform, client):
    result = example(platform, "predict_client.py", "--endpoint", platform.gateway.address, "--model", "nope",
                     "--token", client.token(), "--input", "X:float32:10", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: NOT_FOUND: Servable not found for request: Latest(nope) (cloudml: no model 'nope' in "
                     f"tenant '{platform.tenant}' that you may call; see `cloudml models list`)"], result.stderr
    bad = example(platform, "predict_client.py", "--model", "nope", "--input", "X:float32", timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("error: --input 'X:float32'"), bad.stderr


def test_sdk_tune_example_with_cloud_ml_engine_parameter_specs(platform, client):
    tuned = example(platform, "sdk_tune.py", os.path.join(EXAMPLES, "studies", "plain_space.json"), "--package",
                    platform.packages["plain"])
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    out = tuned.stdout
    assert "study plain-space: MINIMIZE objective, 4 trials" in out, out
    assert "4/4 done, 0 running, 0 queued, best objective=0.3979 (trial" in out, out
    assert "study plain-space: SUCCEEDED" in out, out
    assert "best: trial" in out and "{'x1': 3.14159, 'x2': 2.275} objective=0.397887" in out, out
    # The same study through the SDK's typed results.
    study = client.studies.get("plain-space")
    assert study.succeeded and study.counts["succeeded"] == 4 and study.goal == "MINIMIZE"
    trials = list(client.studies.trials("plain-space", states=["SUCCEEDED"]))
    assert [t.number for t in trials] == [1, 2, 3, 4]
    assert client.studies.best("plain-space").params == {"x1": 3.14159, "x2": 2.275}
    # Its trials ran as jobs of the tenant; list() pages through them two at a time.
    names = [j.name for j in client.jobs.list(page_size=2)]
    assert {f"plain-space-{n}" for n in range(1, 5)} <= set(names), names
    assert len(names) == len(set(names))


def test_cli_hp_submit_watch_prints_progress_and_exits_by_the_end_state(platform):
    # The example file as it is: its trainer_uri is ./pkgs/plain_trainer-1.0.tar.gz, uploaded by the CLI.
    watched = cli(platform, "hp", "submit", "-f", os.path.join(EXAMPLES, "studies", "plain_space.json"), "--name",
                  "watched", "--parallel", "4", "--watch")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    err = watched.stderr
    assert "uploaded pkgs/plain_trainer-1.0.tar.gz" in err, err
    assert "0/4 trials done, " in err and " queued" in err, err
    assert "4/4 trials done (4 succeeded), 0 running, 0 queued; best objective=0.397887 (trial " in err, err
    assert err.strip().splitlines()[-1] == "study watched: SUCCEEDED Succeeded" or \
        err.strip().splitlines()[-1].startswith("study watched: SUCCEEDED"), err
    # A study whose trials fail: `hp watch` exits 1.
    spec = json.load(open(os.path.join(EXAMPLES, "studies", "plain_space.json")))
    spec.update(job_name="failing", module_name="plain_trainer.tsk")
    spec["hyperparameters"].update(maxTrials=1, maxFailedTrials=1)
    with open(os.path.join(platform.home, "failing.json"), "w") as f:
        json.dump(spec, f)
    assert cli(platform, "hp", "submit", "-f", "failing.json").returncode == 0
    failed = cli(platform, "hp", "watch", "failing")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("study failing: FAILED"), failed.stderr


def test_sdk_jobs_typed_results_logs_metrics_and_errors(platform, client):
    job = client.jobs.submit("sdk-plain", module="plain_trainer.task", package=platform.packages["plain"],
                             args="--x1 3.14159 --x2 2.275 --steps 3", cpu="100m", memory="256Mi")
    assert job.created is True and job.tenant == platform.tenant and job.name == "sdk-plain"
    again = client.jobs.submit("sdk-plain", module="plain_trainer.task", package=platform.packages["plain"],
                               args="--x1 3.14159 --x2 2.275 --steps 3", cpu="100m", memory="256Mi")
    assert again.created is False
    lines = list(client.jobs.logs("sdk-plain", follow=True))
    assert any(line.replica == "master-0" and line.text.startswith("Step: 2") for line in lines), lines
    done = client.jobs.wait("sdk-plain", timeout=120)
    assert done.succeeded and done.done and done.replicas == {"master-0": "SUCCEEDED"}
    metrics = client.jobs.metrics("sdk-plain")
    (series,) = metrics.series("objective")
    assert series.steps == [0, 1, 2] and series.source == "REPORTED" and series.replica == "master-0"
    assert [j.name for j in client.jobs.list(states=["SUCCEEDED"], limit=1)] and \
        len(list(client.jobs.list(limit=1))) == 1
    # Typed errors carry the status code and the server's one-line reason.
    with pytest.raises(errors.NotFound) as info:
        client.jobs.get("no-such-job")
    assert info.value.code == "NOT_FOUND" and "no-such-job" in info.value.message
    with pytest.raises(errors.SpecError) as info:
        client.jobs.submit("bad", module="m", package=platform.packages["plain"], cpu="lots")
    assert isinstance(info.value, errors.InvalidArgument) and "invalid CPU 'lots'" in str(info.value)
    with pytest.raises(errors.ResourceExhausted) as info:
        client.jobs.submit("huge", module="plain_trainer.task", package=platform.packages["plain"], cpu="64",
                           args="--x1 1 --x2 1")
    assert info.value.code == "RESOURCE_EXHAUSTED"
    client.jobs.delete("sdk-plain")
    with pytest.raises(errors.NotFound):
        client.jobs.get("sdk-plain")


def test_readme_probes_metrics_and_reflection_without_a_token(platform):
    """What the README tells users about the gateway's ports holds: /healthz,
    /readyz, /metrics on REST; reflection (what grpcurl uses) with no token."""
    import urllib.request

    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert json.load(urllib.request.urlopen(platform.rest + "/healthz", timeout=10)) == {"status": "ok"}
    assert json.load(urllib.request.urlopen(platform.rest + "/readyz", timeout=10)) == {"status": "ready"}
    metrics = urllib.request.urlopen(platform.rest + "/metrics", timeout=10).read().decode()
    assert "grpc_server_handled_total" in metrics
    with grpc.insecure_channel(platform.gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="cloudml.jobs.v1.JobsService")]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"cloudml.jobs.v1.JobsService", "tensorflow.serving.PredictionService"} <= names, names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert "cloudml.jobs.v1.JobsService" in services, services
