"""Tenants are hostile: every path and URI a tenant gives is confined to its
own storage, through the real platform (`cloudml-platform up`, every call
through the gateway), and uploads go through the API.

The platform runs with CLOUDML_ALLOWED_URI_SCHEMES=http,https so that the
address checks (loopback, link-local, private) are what refuses http URIs,
and with a 32 MiB upload limit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from cloudml import errors
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.models.v1 import models_service_pb2_grpc as models_grpc
from cloudml.tuner.v1 import tuner_service_pb2 as tuner_pb
from cloudml.tuner.v1 import tuner_service_pb2_grpc as tuner_grpc
from tests.e2e.serving_platform import ROOT, ServingPlatform, clean_env
from tests.unit.test_jobs_metrics import event, record, simple_value

# Starts a platform of its own settings and reads tenants' storage on disk.
pytestmark = [pytest.mark.slow, pytest.mark.needs_local_platform]
REFUSED = (errors.InvalidArgument, errors.PermissionDenied)


CONFINED = {"CLOUDML_ALLOWED_URI_SCHEMES": "http,https", "CLOUDML_UPLOAD_MAX_BYTES": str(32 << 20)}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("confinement")
    platform = ServingPlatform(str(workdir / "data"), env=CONFINED).start()
    try:
        build = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "build_packages.py"),
                                str(workdir / "packages"), "--only", "plain", "--json"],
                               capture_output=True, text=True, timeout=120, env=clean_env())
        assert build.returncode == 0, build.stderr
        platform.package = json.loads(build.stdout)["plain"]
        platform.workdir = str(workdir)
        platform.wait_up()
        platform.a = platform.client(platform.new_tenant("team-a"))
        platform.b = platform.client(platform.new_tenant("team-b"))
        yield platform
    finally:
        platform.down()


def storage(platform, *parts) -> str:
    return os.path.join(os.path.realpath(platform.data_dir), "storage", *parts)


def saved_model_dir(path: str) -> str:
    os.makedirs(os.path.join(path, "variables"), exist_ok=True)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"not really a graph")
    return path


def bad_forms(platform, own_dir: str, theirs: str, suffix: str) -> list[str]:
    """Every form the hostile tester found (and a few more), for one field."""
    link = os.path.join(own_dir, "link" + suffix)
    if not os.path.lexists(link):
        os.symlink(theirs, link)
    return [
        theirs,                                                     # another tenant's storage, absolute
        "file://" + theirs,
        own_dir + "/../../team-b/" + os.path.basename(theirs),      # '..'
        link,                                                       # a symlink in the tenant's tree pointing out
        f"zip://m::file://{theirs}.zip", f"zip://m::{theirs}.zip",  # chained URIs
        f"http://127.0.0.1:{platform.grpc_port}/x{suffix}", f"http://[::1]/x{suffix}",
        f"http://169.254.169.254/latest/x{suffix}", f"http://10.0.0.1/x{suffix}",
        f"gopher://example.com/x{suffix}",                          # a scheme not allowed
        "file:///etc/passwd" if not suffix else "file:///etc/passwd" + suffix,
        "/etc/passwd",
    ]


def expect_refused(call, *args) -> str:
    with pytest.raises(REFUSED) as info:
        call(*args)
    return str(info.value)


def test_job_paths_are_confined_to_the_tenants_storage(platform):
    a, b = platform.a, platform.b
    theirs_pkg = b.upload_package(platform.package)
    own_pkg = a.upload_package(platform.package)
    assert own_pkg.startswith("file://" + storage(platform, "team-a", "packages") + "/")
    assert theirs_pkg.startswith("file://" + storage(platform, "team-b", "packages") + "/")
    stub = a.stub(jobs_grpc.JobsServiceStub)

    def submit(trainer_uri, output_path=""):
        spec = jobs_pb.TrainJobSpec(trainer_uri=trainer_uri, module_name="plain_trainer.task",
                                    output_path=output_path)
        return a.call(stub.SubmitJob, jobs_pb.SubmitJobRequest(name="j", spec=spec, validate_only=True))

    submit(own_pkg)  # the tenant's own upload is fine
    own_dir = storage(platform, "team-a")
    for uri in bad_forms(platform, own_dir, theirs_pkg[len("file://"):], ".tar.gz"):
        assert "spec.trainer_uri" in expect_refused(submit, uri), uri
    os.makedirs(storage(platform, "team-b", "jobs", "secret"), exist_ok=True)
    for path in bad_forms(platform, own_dir, storage(platform, "team-b", "jobs", "secret"), ""):
        assert "spec.output_path" in expect_refused(submit, own_pkg, path), path
    submit(own_pkg, storage(platform, "team-a", "jobs", "elsewhere"))

    # The tuner: a study's template is refused alike.
    tuner = a.stub(tuner_grpc.TunerServiceStub)
    for template in (jobs_pb.TrainJobSpec(trainer_uri=theirs_pkg, module_name="plain_trainer.task"),
                     jobs_pb.TrainJobSpec(trainer_uri=own_pkg, module_name="plain_trainer.task",
                                          output_path=storage(platform, "team-b", "studies"))):
        spec = tuner_pb.StudySpec(trial_template=template, goal=tuner_pb.GOAL_MINIMIZE, metric="loss", max_trials=1,
                                  parameters=[tuner_pb.ParameterSpec(name="x", double_range={"min": 0, "max": 1})])
        assert "spec.trial_template" in expect_refused(
            a.call, tuner.CreateStudy, tuner_pb.CreateStudyRequest(name="s", spec=spec))


def test_model_uris_are_confined_to_the_tenants_storage(platform):
    a, b = platform.a, platform.b
    models = a.stub(models_grpc.ModelsServiceStub)
    a.call(models.CreateModel, models_pb.CreateModelRequest(name="m"))
    theirs = b.upload_model("m", saved_model_dir(os.path.join(platform.workdir, "sm-b")))
    own_dir = storage(platform, "team-a")
    for uri in bad_forms(platform, own_dir, theirs[len("file://"):].rstrip("/"), ""):
        details = expect_refused(a.call, models.CreateVersion, models_pb.CreateVersionRequest(
            model="m", model_version=models_pb.ModelVersion(model_uri=uri)))
        assert "model_uri" in details, uri
    # A public http URI is still no SavedModel directory source.
    details = expect_refused(a.call, models.CreateVersion, models_pb.CreateVersionRequest(
        model="m", model_version=models_pb.ModelVersion(model_uri="https://93.184.216.34/m/")))
    assert "http" in details


def test_uploads_refuse_traversal_and_oversize_through_the_gateway(platform):
    a = platform.a
    models = a.stub(models_grpc.ModelsServiceStub)
    jobs = a.stub(jobs_grpc.JobsServiceStub)

    def upload_model(chunks):
        header = models_pb.UploadModelRequest(header=models_pb.UploadModelHeader(model="m"))
        return a.call(models.UploadModel, iter([header] + [models_pb.UploadModelRequest(
            chunk=models_pb.UploadFileChunk(path=p, data=d)) for p, d in chunks]))

    for chunks in ([("saved_model.pb", b"x"), ("../../team-b/evil", b"x")],
                   [("saved_model.pb", b"x"), ("/etc/cron.d/evil", b"x")],
                   [("saved_model.pb", b"x"), ("a/../../x", b"x")],
                   [("variables/only", b"x")]):
        with pytest.raises(errors.InvalidArgument):
            upload_model(chunks)
    for name in ("../../team-b/t-1.tar.gz", "/etc/t-1.tar.gz", "t-1.sh"):
        with pytest.raises(errors.InvalidArgument):
            a.call(jobs.UploadPackage, iter([jobs_pb.UploadPackageRequest(file_name=name, data=b"x")]))
    with pytest.raises(errors.ResourceExhausted):
        big = (jobs_pb.UploadPackageRequest(file_name="big-1.0.tar.gz" if i == 0 else "", data=b"\0" * (1 << 20))
               for i in range(33))
        a.call(jobs.UploadPackage, big, timeout=60)
    assert not os.path.exists(storage(platform, "team-b", "evil"))
    assert os.listdir(storage(platform, ".uploads")) == []
    # A planted symlink where uploads go is refused, not followed.
    os.makedirs(storage(platform, "team-b", "models"), exist_ok=True)
    os.makedirs(storage(platform, "team-a", "models"), exist_ok=True)
    os.symlink(storage(platform, "team-b", "models"), storage(platform, "team-a", "models", "evil"))
    with pytest.raises(errors.PermissionDenied):
        a.upload_model("evil", saved_model_dir(os.path.join(platform.workdir, "sm-a")))
    assert set(os.listdir(storage(platform, "team-b", "models"))) <= {"m"}  # nothing landed in team-b's tree


def test_get_job_metrics_does_not_read_another_tenants_events_through_a_symlink(platform):
    a = platform.a
    stub = a.stub(jobs_grpc.JobsServiceStub)
    own_pkg = a.upload_package(platform.package)
    spec = jobs_pb.TrainJobSpec(trainer_uri=own_pkg, module_name="plain_trainer.task", job_args=["--steps", "1"])
    job = a.call(stub.SubmitJob, jobs_pb.SubmitJobRequest(name="tb", spec=spec)).job
    out = job.spec.output_path
    assert out == storage(platform, "team-a", "jobs", "tb")
    theirs = storage(platform, "team-b", "jobs", "secret-run")
    os.makedirs(theirs, exist_ok=True)
    with open(os.path.join(theirs, "events.out.tfevents.1.h"), "wb") as f:
        f.write(record(event(1, 1.0, [simple_value("their_loss", 9.0)])))
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    with open(os.path.join(out, "train", "events.out.tfevents.1.h"), "wb") as f:
        f.write(record(event(1, 1.0, [simple_value("loss", 0.5)])))
    os.symlink(os.path.join(theirs, "events.out.tfevents.1.h"), os.path.join(out, "events.out.tfevents.2.h"))
    os.symlink(theirs, os.path.join(out, "linked"))
    series = a.call(stub.GetJobMetrics, jobs_pb.GetJobMetricsRequest(name="tb")).series
    names = [s.name for s in series]
    assert "train/loss" in names and not any("their_loss" in n for n in names), names


def test_cli_uploads_a_package_and_the_job_runs(platform):
    config = os.path.join(platform.data_dir, "credentials-team-a.json")
    submitted = platform.cli_json("jobs", "submit", "-n", "uploaded", "-m", "plain_trainer.task", "-u",
                                  platform.package, "-a", "--x1 1 --x2 2 --steps 2", config=config)
    assert submitted["job"]["spec"]["trainer_uri"].startswith("file://" + storage(platform, "team-a", "packages"))
    from tests.e2e.serving_platform import wait_until

    def finished():
        job = platform.cli_json("jobs", "describe", "uploaded", config=config)
        return job if job["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED") else None

    job = wait_until(finished, 240, "the uploaded job to finish", interval=1.0)
    logs = platform.cli("jobs", "logs", "uploaded", config=config, check=False).stdout
    assert job["state"] == "JOB_STATE_SUCCEEDED", (job.get("reason"), job.get("message"), logs[-3000:])
