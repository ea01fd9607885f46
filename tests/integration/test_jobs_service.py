"""The jobs service as real processes: a key namespace of its own on the
session's etcd, a real auth service, the jobs service, and real trainer packages (examples/trainers) installed into
real environments and run by the local runtime.

Most tests share one stack (`stack`, module-scoped); the failure-tolerance
tests (kill -9, standby take-over) start stacks of their own. Packages are
built once (`built`) and uploaded through UploadPackage into the storage of
the tenant that submits, once per tenant and stack (`packages` is the admin's
view, `member.packages(built)` a member's). Trainer environments are shared by
all stacks (`envs_dir`); with tenant isolation they are per tenant, so each
package installs once per tenant.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs.metrics import TensorBoardReader
from tests.integration.jobs_stack import MiB, JobsStack, TenantPackages, build_packages, replica_spec, spec

Code = grpc.StatusCode
MASTER, CHIEF, PS, WORKER = pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_CHIEF, pb.REPLICA_TYPE_PS, pb.REPLICA_TYPE_WORKER
S = pb.JobState
TF_MEMORY = 1536 * MiB


def expect_error(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, f"expected {code.name}, got {info.value.code().name}: {info.value.details()}"
    return info.value


def reasons(job: pb.TrainJob) -> list[str]:
    return [e.reason for e in job.events]


def final_events(job: pb.TrainJob) -> list[pb.JobEvent]:
    return [e for e in job.events if e.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)]


def pids_of(job: pb.TrainJob) -> list[int]:
    return [r.pid for r in job.replicas if r.HasField("pid") and r.pid]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, str]:
    """{example: sdist path} on this machine, outside any tenant's storage."""
    return build_packages(str(tmp_path_factory.mktemp("packages")))


@pytest.fixture(scope="session")
def envs_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("envs"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, envs_dir, built, etcd_server):
    stack = JobsStack(str(tmp_path_factory.mktemp("jobs-stack")), envs_dir=envs_dir,
                      etcd_endpoint=etcd_server.endpoint).start()
    stack.start_jobs()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def admin(stack):
    return stack.admin()


@pytest.fixture(scope="module")
def packages(admin, built) -> TenantPackages:
    """{example: URI} of the packages uploaded into the admin's storage."""
    return admin.packages(built)


def plain(packages, steps: int = 3, sleep: float = 0.0, **fields) -> pb.TrainJobSpec:
    return spec(packages["plain"], "plain_trainer.task", f"--x1 3.14159 --x2 2.275 --steps {steps} --sleep {sleep}",
                replicas=[replica_spec(MASTER, cpu=100, memory=256 * MiB)], **fields)


def faulty(packages, module: str, args: str, memory: int = 256 * MiB, cpu: int = 100, **fields) -> pb.TrainJobSpec:
    return spec(packages["testing"], f"faulty_trainer.{module}", args,
                replicas=[replica_spec(MASTER, cpu=cpu, memory=memory)], **fields)


# --- the examples, end to end ------------------------------------------------------------


def test_linear_example_end_to_end(admin, packages):
    submitted = admin.submit("linear", spec(packages["linear"], "trainer.task", "--max_epochs 10",
                                            replicas=[replica_spec(MASTER, cpu=500, memory=TF_MEMORY)]))
    assert submitted.created and submitted.job.state == S.JOB_STATE_QUEUED
    assert list(submitted.job.spec.job_args) == ["--max_epochs", "10"]
    job = admin.wait("linear", timeout=180)
    assert job.state == S.JOB_STATE_SUCCEEDED, reasons(job)
    assert job.attempts == 1 and job.HasField("start_time") and job.HasField("end_time")
    assert reasons(job)[:2] == ["Submitted", "Admitted"] and reasons(job)[-2:] == ["Started", "Succeeded"]
    (master,) = job.replicas
    assert master.state == pb.REPLICA_STATE_SUCCEEDED and master.exit_code == 0
    assert re.fullmatch(r"127\.0\.0\.1:\d+", master.address)

    # The SavedModel, exported where CLOUDML_OUTPUT_PATH pointed.
    output = job.spec.output_path
    assert os.path.isfile(os.path.join(output, "model", "1", "saved_model.pb"))

    # The loss series, from cloudml.report through the metrics file.
    (loss,) = admin.metrics("linear", names=["loss"])
    assert loss.source == pb.METRIC_SOURCE_REPORTED and loss.replica.type == MASTER
    assert [p.step for p in loss.points] == list(range(10))
    assert all(p.attempt == 1 for p in loss.points)
    assert loss.points[-1].value < loss.points[0].value
    assert [p.step for p in admin.metrics("linear", names=["loss"], start_step=7)[0].points] == [7, 8, 9]

    # Logs, replayed after the end: the job's own lines and the trainer's.
    lines = admin.logs("linear")
    text = [line.text for line in lines if line.HasField("replica")]
    assert any(t.startswith("Epoch: 9, loss:") for t in text), text[-20:]
    assert any("Done exporting!" in t for t in text)
    # TensorFlow's start-up chatter stays out (TF_CPP_MIN_LOG_LEVEL=2 unless the job's env says otherwise).
    assert not [t for t in text if "cpu_feature_guard" in t or "oneDNN custom operations" in t], text[:20]
    assert any("[platform]" in line.text for line in lines if not line.HasField("replica"))
    w, b = map(float, re.search(r"w: ([-\d.e]+), b: ([-\d.e]+)", "\n".join(text)).groups())
    assert abs(w - 2) < 0.1 and abs(b - 10) < 0.5

    # The TensorBoard fallback reader parses TF's own event files, without TF.
    series = {s.name: s for s in TensorBoardReader().series(output, set(), 0)}
    assert any(name.endswith("loss") for name in series), list(series)
    tb_loss = next(s for name, s in series.items() if name.endswith("loss"))
    assert len(tb_loss.points) == 10 and abs(tb_loss.points[-1].value - loss.points[-1].value) < 1e-3

    # The exported model predicts 2x + 10 (loaded by TensorFlow in a child process).
    probe = (
        "import sys, numpy as np, tensorflow as tf\n"
        "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = f(keys=tf.constant([[1], [2]], tf.int32), X=tf.constant([[3.0], [40.0]], tf.float32))\n"
        "print(out['prediction'].numpy().ravel().tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, os.path.join(output, "model", "1")],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    p3, p40 = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(p3 - 16) < 0.5 and abs(p40 - 90) < 0.5


def test_distributed_example_with_ps_strategy(admin, packages):
    replicas = [replica_spec(CHIEF, cpu=400, memory=TF_MEMORY), replica_spec(PS, cpu=400, memory=TF_MEMORY),
                replica_spec(WORKER, 2, cpu=400, memory=TF_MEMORY)]
    admin.submit("distributed", spec(packages["distributed"], "distributed_trainer.task",
                                     ["--max_epochs", "3", "--steps_per_epoch", "5"], replicas=replicas))
    job = admin.wait("distributed", timeout=240)
    assert job.state == S.JOB_STATE_SUCCEEDED, [(e.reason, e.message) for e in job.events]
    states = {(r.replica.type, r.replica.index): r.state for r in job.replicas}
    assert states[(CHIEF, 0)] == pb.REPLICA_STATE_SUCCEEDED
    # Parameter servers and workers serve until the platform stops them.
    assert states[(PS, 0)] == pb.REPLICA_STATE_STOPPED
    assert len({r.address for r in job.replicas}) == 4
    assert os.path.isfile(os.path.join(job.spec.output_path, "model", "1", "saved_model.pb"))
    chief_lines = [line.text for line in admin.logs("distributed", replicas=[pb.ReplicaId(type=CHIEF)])]
    assert any("ParameterServerStrategy with 1 ps, 2 workers" in t for t in chief_lines), chief_lines[-20:]
    (loss,) = admin.metrics("distributed", names=["loss"])
    assert [p.step for p in loss.points] == [0, 1, 2]
    assert not wait_gone(pids_of(job), 1.0)


def test_plain_python_trainer_runs(admin, packages):
    admin.submit("plain", plain(packages, steps=4))
    job = admin.wait("plain", timeout=60)
    assert job.state == S.JOB_STATE_SUCCEEDED, reasons(job)
    (objective,) = admin.metrics("plain")
    assert objective.name == "objective" and [p.step for p in objective.points] == [0, 1, 2, 3]
    assert [line.text for line in admin.logs("plain", replicas=[pb.ReplicaId(type=MASTER)])][-1].startswith('{"x1"')


def test_replica_environment_contract(admin, packages):
    """Every replica gets TF_CONFIG (Kubeflow's layout), CLOUDML_* and
    CUDA_VISIBLE_DEVICES as documented; read from the live processes."""
    replicas = [replica_spec(CHIEF, cpu=100, memory=256 * MiB), replica_spec(WORKER, 2, cpu=100, memory=256 * MiB),
                replica_spec(pb.REPLICA_TYPE_EVALUATOR, cpu=100, memory=256 * MiB)]
    admin.submit("envdump", spec(packages["testing"], "faulty_trainer.sleep", ["--seconds", "30"],
                                 replicas=replicas, env={"MY_FLAG": "on"}))
    job = admin.wait("envdump", states={S.JOB_STATE_RUNNING}, timeout=60)
    by_name = {(r.replica.type, r.replica.index): r for r in job.replicas}
    cluster = {"chief": [by_name[(CHIEF, 0)].address],
               "worker": [by_name[(WORKER, 0)].address, by_name[(WORKER, 1)].address]}
    assert by_name[(pb.REPLICA_TYPE_EVALUATOR, 0)].address == ""
    for (kind, index), replica in by_name.items():
        env = psutil.Process(replica.pid).environ()
        role = pb.ReplicaType.Name(kind).removeprefix("REPLICA_TYPE_").lower()
        assert json.loads(env["TF_CONFIG"]) == {"cluster": cluster, "task": {"type": role, "index": index},
                                                "environment": "cloud"}
        assert env["CLOUDML_JOB_NAME"] == "envdump" and env["CLOUDML_TENANT"] == "admin"
        assert env["CLOUDML_REPLICA_TYPE"] == role and env["CLOUDML_REPLICA_INDEX"] == str(index)
        assert env["CLOUDML_ATTEMPT"] == "1"
        assert env["CLOUDML_OUTPUT_PATH"] == job.spec.output_path
        assert env["CLOUDML_METRICS_FILE"].endswith(os.path.join("attempt-1", f"{role}-{index}.jsonl"))
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env["MY_FLAG"] == "on" and env["PYTHONUNBUFFERED"] == "1"
        assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert job.spec.output_path.endswith(os.path.join("storage", "admin", "jobs", "envdump"))
    admin.cancel("envdump")
    assert admin.wait("envdump", timeout=10).state == S.JOB_STATE_CANCELLED


# --- failures ----------------------------------------------------------------------------


def test_exit_1_fails_with_the_exit_code_in_the_event(admin, packages):
    admin.submit("exit1", faulty(packages, "exit_code", "--code 1"))
    job = admin.wait("exit1", timeout=60)
    assert job.state == S.JOB_STATE_FAILED
    # The reason carries the last line the replica wrote, so a user sees why without reading logs.
    said = "faulty_trainer.exit_code: exiting with code 1"
    assert job.reason == "ReplicaFailed" and job.message == f"ReplicaFailed master-0 exit 1: {said}"
    assert final_events(job)[-1].message == f"ReplicaFailed master-0 exit 1: {said}"
    (master,) = job.replicas
    assert master.state == pb.REPLICA_STATE_FAILED and master.exit_code == 1


def test_exit_code_policy_does_not_retry_the_trainers_own_error(admin, packages):
    admin.submit("exit3", faulty(packages, "exit_code", "--code 3", restart_policy=pb.RESTART_POLICY_EXIT_CODE,
                                 max_retries=2))
    job = admin.wait("exit3", timeout=60)
    assert job.state == S.JOB_STATE_FAILED and job.attempts == 1
    assert job.message == "ReplicaFailed master-0 exit 3: faulty_trainer.exit_code: exiting with code 3"


def test_memory_hog_is_oom_killed(admin, packages):
    admin.submit("hog", faulty(packages, "hog_memory", "--mb 400 --hold 30", memory=150 * MiB))
    job = admin.wait("hog", timeout=60)
    assert job.state == S.JOB_STATE_FAILED and job.reason == "OOMKilled", reasons(job)
    assert "OOMKilled master-0 exit 137" in job.message and "150Mi" in job.message
    (master,) = job.replicas
    assert master.reason == "OOMKilled" and master.exit_code == 137


def test_timeout_fails_with_deadline_exceeded(admin, packages):
    job_spec = faulty(packages, "sleep", "--seconds 60 --every 0.5")
    job_spec.timeout.seconds = 2
    started = time.monotonic()
    admin.submit("sleepy", job_spec)
    job = admin.wait("sleepy", timeout=60)
    assert job.state == S.JOB_STATE_FAILED and job.reason == "DeadlineExceeded", reasons(job)
    assert time.monotonic() - started < 15
    assert job.replicas[0].state == pb.REPLICA_STATE_STOPPED
    assert not wait_gone(pids_of(job), 2.0)


def test_on_failure_restarts_and_succeeds_on_the_third_attempt(admin, packages):
    admin.submit("flaky", faulty(packages, "flaky", "--fail-times 2", restart_policy=pb.RESTART_POLICY_ON_FAILURE,
                                 max_retries=3))
    job = admin.wait("flaky", timeout=60)
    assert job.state == S.JOB_STATE_SUCCEEDED and job.attempts == 3, reasons(job)
    restarts = [e for e in job.events if e.state == S.JOB_STATE_RESTARTING]
    assert [(e.reason, e.attempt) for e in restarts] == [("ReplicaFailed", 1), ("ReplicaFailed", 2)]
    assert restarts[0].message == ("ReplicaFailed master-0 exit 1: faulty_trainer.flaky: attempt 1 of 2 failing ones: "
                                   "exit 1; restarting (attempt 2 of at most 4)")
    starts = [e.attempt for e in job.events if e.reason == "Started"]
    assert starts == [1, 2, 3]
    # Each attempt has its own log.
    by_attempt = {line.attempt for line in admin.logs("flaky", replicas=[pb.ReplicaId(type=MASTER)])}
    assert by_attempt == {1, 2, 3}


def test_on_failure_gives_up_after_max_retries(admin, packages):
    admin.submit("flaky-out", faulty(packages, "flaky", "--fail-times 5",
                                     restart_policy=pb.RESTART_POLICY_ON_FAILURE, max_retries=1))
    job = admin.wait("flaky-out", timeout=60)
    assert job.state == S.JOB_STATE_FAILED and job.attempts == 2


def test_broken_package_fails_with_install_failed(admin, packages):
    admin.submit("broken", spec(packages["broken"], "broken_trainer.task"))
    job = admin.wait("broken", timeout=120)
    assert job.state == S.JOB_STATE_FAILED and job.reason == "InstallFailed", reasons(job)
    assert "fails to install on purpose" in job.message
    assert job.attempts == 0
    assert any("fails to install on purpose" in line.text for line in admin.logs("broken"))


def test_cancel_running_distributed_job_stops_every_replica_within_5s(admin, packages):
    replicas = [replica_spec(CHIEF, cpu=100, memory=TF_MEMORY), replica_spec(PS, cpu=100, memory=TF_MEMORY),
                replica_spec(WORKER, 2, cpu=100, memory=TF_MEMORY)]
    admin.submit("dist-cancel", spec(packages["distributed"], "distributed_trainer.task", ["--max_epochs", "50"],
                                     replicas=replicas))
    job = admin.wait("dist-cancel", states={S.JOB_STATE_RUNNING}, timeout=60)
    # Cancel mid-training: once the chief has finished an epoch.
    deadline = time.monotonic() + 90
    while not any(line.text.startswith("Epoch:")
                  for line in admin.logs("dist-cancel", replicas=[pb.ReplicaId(type=CHIEF)])):
        assert time.monotonic() < deadline, "the distributed job never trained"
        time.sleep(0.2)
    pids = pids_of(job)
    assert len(pids) == 4 and all(psutil.pid_exists(p) for p in pids)
    started = time.monotonic()
    cancelled = admin.cancel("dist-cancel")
    assert cancelled.state == S.JOB_STATE_CANCELLING and cancelled.reason == "CancelRequested"
    job = admin.wait("dist-cancel", timeout=10)
    assert not wait_gone(pids, max(0.0, 5.0 - (time.monotonic() - started)))
    assert time.monotonic() - started < 5.0
    assert job.state == S.JOB_STATE_CANCELLED and reasons(job)[-2:] == ["CancelRequested", "Cancelled"]
    assert {r.state for r in job.replicas} == {pb.REPLICA_STATE_STOPPED}
    assert admin.cancel("dist-cancel").state == S.JOB_STATE_CANCELLED  # a retried cancel is a no-op


# --- quota and capacity ------------------------------------------------------------------


def test_quota_queueing_starts_the_second_job_after_the_first(stack, admin, built):
    member = stack.new_tenant("q")
    packages = member.packages(built)
    admin.set_quota(member.tenant, cpu_millis=1000, memory_bytes=4 << 30, train_jobs=10)
    first = faulty(packages, "sleep", "--seconds 2 --every 1", cpu=1000)
    second = plain(packages, steps=1)
    second.replica_specs[0].resources.cpu_millis = 1000
    member.submit("first", first)
    member.wait("first", states={S.JOB_STATE_RUNNING}, timeout=30)
    member.submit("second", second)
    deadline = time.monotonic() + 10
    while member.get("second").reason != "QuotaExceeded" and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = member.get("second")
    assert waiting.state == S.JOB_STATE_QUEUED and waiting.reason == "QuotaExceeded", reasons(waiting)
    assert "cpu" in waiting.message
    done_first = member.wait("first", timeout=30)
    done_second = member.wait("second", timeout=30)
    assert done_first.state == done_second.state == S.JOB_STATE_SUCCEEDED
    assert done_second.start_time.ToNanoseconds() >= done_first.end_time.ToNanoseconds()
    assert reasons(done_second)[:3] == ["Submitted", "QuotaExceeded", "Admitted"]
    # However the jobs ended, their quota is back.
    deadline = time.monotonic() + 5
    while admin.usage(member.tenant).cpu_millis and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admin.usage(member.tenant).cpu_millis == 0 and admin.usage(member.tenant).train_jobs == 0


def test_cancel_of_a_queued_job_is_immediate(stack, admin, built):
    member = stack.new_tenant("qc")
    packages = member.packages(built)
    admin.set_quota(member.tenant, cpu_millis=100, memory_bytes=1 << 30, train_jobs=10)
    member.submit("holder", faulty(packages, "sleep", "--seconds 30 --every 1"))
    member.wait("holder", states={S.JOB_STATE_RUNNING}, timeout=30)
    member.submit("waiter", plain(packages))
    job = member.cancel("waiter")
    assert job.state == S.JOB_STATE_CANCELLED and job.reason == "Cancelled" and job.HasField("end_time")
    member.cancel("holder")
    assert member.wait("holder", timeout=10).state == S.JOB_STATE_CANCELLED


def test_job_that_can_never_fit_is_refused_naming_the_resource(stack, admin, packages, built):
    err = expect_error(Code.RESOURCE_EXHAUSTED, admin.submit, "too-many-gpus",
                       spec(packages["plain"], "plain_trainer.task", replicas=[replica_spec(MASTER, gpus=1)]))
    assert "gpus" in err.details()
    err = expect_error(Code.RESOURCE_EXHAUSTED, admin.submit, "too-much-memory",
                       spec(packages["plain"], "plain_trainer.task", replicas=[replica_spec(MASTER, memory=1 << 50)]))
    assert "memory" in err.details()
    member = stack.new_tenant("nf")
    admin.set_quota(member.tenant, cpu_millis=500, memory_bytes=8 << 30, train_jobs=10)
    err = expect_error(Code.RESOURCE_EXHAUSTED, member.submit, "over-quota",
                       spec(member.upload(built["plain"]), "plain_trainer.task",
                            replicas=[replica_spec(WORKER, 2, cpu=300)]))
    assert "cpu" in err.details() and "quota" in err.details()
    expect_error(Code.NOT_FOUND, member.get, "over-quota")


def test_docker_image_is_refused_naming_the_runtime(admin, packages):
    err = expect_error(Code.FAILED_PRECONDITION, admin.submit, "image", plain(packages, docker_image="tf:2.21"))
    assert "`local`" in err.details()


# --- the API -----------------------------------------------------------------------------


def test_submit_is_exactly_once(admin, packages):
    as_line = plain(packages, steps=1)
    first = admin.submit("once", as_line)
    as_list = plain(packages, steps=1)
    as_list.job_args_line = ""
    as_list.job_args.extend(["--x1", "3.14159", "--x2", "2.275", "--steps", "1", "--sleep", "0.0"])
    again = admin.submit("once", as_list)
    assert first.created and not again.created
    assert again.job.uid == first.job.uid and again.job.spec_hash == first.job.spec_hash
    different = plain(packages, steps=2)
    err = expect_error(Code.ALREADY_EXISTS, admin.submit, "once", different)
    assert "different spec" in err.details()
    assert admin.wait("once").state == S.JOB_STATE_SUCCEEDED
    # Even after it ended, the same submission is answered with the job.
    assert not admin.submit("once", as_line).created


def test_concurrent_identical_submissions_create_one_job(admin, packages):
    results, errors = [], []

    def submit():
        try:
            results.append(admin.submit("racy", plain(packages, steps=1)))
        except grpc.RpcError as err:
            errors.append(err)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sum(r.created for r in results) == 1
    assert len({r.job.uid for r in results}) == 1


def test_validate_only_creates_nothing(admin, packages):
    resp = admin.submit("dry", plain(packages), validate_only=True)
    assert not resp.created and resp.job.spec_hash and resp.job.spec.output_path
    expect_error(Code.NOT_FOUND, admin.get, "dry")


@pytest.mark.parametrize("mutate,field", [
    (lambda s: setattr(s, "module_name", "no such"), "module_name"),
    # In the tenant's storage, but no such file.
    (lambda s: setattr(s, "trainer_uri", os.path.dirname(s.trainer_uri) + "-gone/x.tar.gz"), "no such file"),
    (lambda s: setattr(s, "trainer_uri", "relative.tar.gz"), "trainer_uri"),
    (lambda s: setattr(s, "trainer_uri", os.path.dirname(s.trainer_uri) + "/../x/plain_trainer-1.0.tar.gz"), "'..'"),
    (lambda s: setattr(s, "trainer_uri", "zip://t/x.tar.gz::" + s.trainer_uri), "chained"),
    (lambda s: setattr(s, "trainer_uri", "s3://bucket/x.tar.gz"), "not allowed"),
    (lambda s: setattr(s, "output_path", "out"), "output_path"),
    (lambda s: s.replica_specs.add(type=MASTER, replica_count=1), "replica_specs[1]"),
    (lambda s: s.replica_specs.add(type=CHIEF, replica_count=1), "MASTER or a CHIEF"),
    (lambda s: s.replica_specs.add(type=WORKER, replica_count=0), "replica_count"),
    (lambda s: s.env.update({"TF_CONFIG": "{}"}), "env"),
    (lambda s: s.env.update({"CLOUDML_X": "1"}), "env"),
    (lambda s: setattr(s, "max_retries", 101), "max_retries"),
    (lambda s: setattr(s, "priority", 5000), "priority"),
    (lambda s: setattr(s, "job_args_line", "--a 'unbalanced"), "job_args_line"),
])
def test_bad_spec_is_invalid_argument_naming_the_field(admin, packages, mutate, field):
    job_spec = plain(packages)
    mutate(job_spec)
    err = expect_error(Code.INVALID_ARGUMENT, admin.submit, "bad", job_spec)
    assert field in err.details()


def test_path_outside_the_tenants_storage_is_permission_denied(stack, admin, packages, built, tmp_path):
    """Local paths must resolve inside DATA_DIR/storage/<tenant>/."""
    storage = stack.storage("admin")
    other = stack.storage("someone-else")
    os.makedirs(os.path.join(storage, "links"), exist_ok=True)
    link = os.path.join(storage, "links", f"{tmp_path.name}.tar.gz")
    os.symlink(built["plain"], link)  # inside by name, outside once resolved
    refused = {
        "spec.trainer_uri": ["file://" + built["plain"], built["plain"], "file:///nowhere/x.tar.gz",
                             "file://" + link, f"file://{other}/packages/plain_trainer-1.0.tar.gz",
                             f"file://{storage}-evil/plain_trainer-1.0.tar.gz"],
        "spec.output_path": [str(tmp_path / "out"), "file:///etc/cloudml", other + "/jobs/x", storage + "-evil/x"],
    }
    for field, values in refused.items():
        for value in values:
            job_spec = plain(packages)
            setattr(job_spec, field.removeprefix("spec."), value)
            err = expect_error(Code.PERMISSION_DENIED, admin.submit, "outside", job_spec)
            assert err.details().startswith(field) and "outside tenant 'admin'" in err.details(), err.details()
    expect_error(Code.NOT_FOUND, admin.get, "outside")
    # Inside the tenant's storage, an output path of its own choosing is fine.
    job_spec = plain(packages, output_path=os.path.join(storage, "mine", "out"))
    assert admin.submit("inside", job_spec, validate_only=True).job.spec.output_path == job_spec.output_path


def test_upload_package_stores_the_package_by_content_in_the_tenants_storage(stack, admin, built, tmp_path):
    stored = admin.upload_package(built["testing"])
    again = admin.upload_package(built["testing"])
    with open(built["testing"], "rb") as f:
        data = f.read()
    assert stored == again and stored.size_bytes == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.uri == "file://" + os.path.join(stack.storage("admin"), "packages", stored.sha256[:16],
                                                  os.path.basename(built["testing"]))
    with open(stored.uri.removeprefix("file://"), "rb") as f:
        assert f.read() == data
    renamed = tmp_path / "notes.txt"
    renamed.write_bytes(data)
    err = expect_error(Code.INVALID_ARGUMENT, admin.upload_package, str(renamed))
    assert "file_name" in err.details()


def test_a_queued_job_whose_package_became_a_symlink_out_fails_with_path_refused(stack, admin, built):
    """The scheduler checks the paths again right before a job runs: a job
    accepted before (here: a package later swapped for a symlink to a file
    outside the tenant's storage) fails with reason PathRefused."""
    member = stack.new_tenant("pr")
    packages = member.packages(built)
    admin.set_quota(member.tenant, cpu_millis=100, memory_bytes=1 << 30, train_jobs=10)
    member.submit("holder", faulty(packages, "sleep", "--seconds 30 --every 1"))
    member.wait("holder", states={S.JOB_STATE_RUNNING}, timeout=60)
    own = os.path.join(stack.storage(member.tenant), "mine")
    os.makedirs(own, exist_ok=True)
    package = os.path.join(own, os.path.basename(built["plain"]))
    shutil.copyfile(built["plain"], package)
    member.submit("swapped", plain({"plain": package}))
    assert member.get("swapped").state == S.JOB_STATE_QUEUED
    os.unlink(package)
    os.symlink(built["plain"], package)
    member.cancel("holder")
    job = member.wait("swapped", timeout=30)
    assert job.state == S.JOB_STATE_FAILED and job.reason == "PathRefused", reasons(job)
    assert "spec.trainer_uri" in job.message and "outside" in job.message
    assert job.attempts == 0


def test_bad_name_is_invalid_argument(admin, packages):
    expect_error(Code.INVALID_ARGUMENT, admin.submit, "Not_A_Label", plain(packages))


def test_tenancy_members_see_only_their_own_jobs(stack, admin, built):
    alice, bob = stack.new_tenant("alice"), stack.new_tenant("bob")
    alices, bobs = alice.packages(built), bob.packages(built)
    alice.submit("mine", plain(alices, steps=1))
    expect_error(Code.NOT_FOUND, bob.get, "mine", tenant=alice.tenant)
    expect_error(Code.NOT_FOUND, bob.get, "mine")
    expect_error(Code.NOT_FOUND, bob.cancel, "mine", tenant=alice.tenant)
    err = expect_error(Code.NOT_FOUND, bob.submit, "theirs", plain(bobs), tenant=alice.tenant)
    assert alice.tenant in err.details()
    expect_error(Code.NOT_FOUND, bob.call, "ListJobs", pb.ListJobsRequest(tenant=alice.tenant))
    # Nor may bob upload into alice's storage, or run a package from it.
    err = expect_error(Code.NOT_FOUND, bob.upload_package, built["plain"], tenant=alice.tenant)
    assert alice.tenant in err.details()
    err = expect_error(Code.PERMISSION_DENIED, bob.submit, "borrowed", plain(alices))
    assert "spec.trainer_uri" in err.details() and bob.tenant in err.details()
    # The admin may act on any tenant.
    assert admin.get("mine", tenant=alice.tenant).tenant == alice.tenant
    assert admin.wait("mine", tenant=alice.tenant).state == S.JOB_STATE_SUCCEEDED
    assert [j.name for j in bob.call("ListJobs", pb.ListJobsRequest()).jobs] == []


def test_list_jobs_pages_in_name_order_and_filters_by_state(stack, admin, built):
    member = stack.new_tenant("list")
    packages = member.packages(built)
    for i in range(5):
        member.submit(f"job-{i}", faulty(packages, "exit_code", f"--code {i % 2}"))
    for i in range(5):
        member.wait(f"job-{i}", timeout=60)
    names, token = [], ""
    while True:
        page = member.call("ListJobs", pb.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2 and all(not j.events for j in page.jobs)
        names += [j.name for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"job-{i}" for i in range(5)]
    failed = member.call("ListJobs", pb.ListJobsRequest(states=[S.JOB_STATE_FAILED]))
    assert [j.name for j in failed.jobs] == ["job-1", "job-3"]
    expect_error(Code.INVALID_ARGUMENT, member.call, "ListJobs", pb.ListJobsRequest(page_token="%%%"))


def test_delete_only_finished_jobs(admin, packages):
    admin.submit("to-delete", faulty(packages, "sleep", "--seconds 30 --every 1"))
    admin.wait("to-delete", states={S.JOB_STATE_RUNNING}, timeout=30)
    expect_error(Code.FAILED_PRECONDITION, admin.call, "DeleteJob", pb.DeleteJobRequest(name="to-delete"))
    admin.cancel("to-delete")
    job = admin.wait("to-delete", timeout=10)
    logs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(job.spec.output_path)))),
                            "jobs", "admin", "to-delete")
    assert os.path.isdir(logs_dir)
    admin.call("DeleteJob", pb.DeleteJobRequest(name="to-delete"))
    expect_error(Code.NOT_FOUND, admin.get, "to-delete")
    assert not os.path.exists(logs_dir)
    expect_error(Code.NOT_FOUND, admin.call, "DeleteJob", pb.DeleteJobRequest(name="to-delete"))


def test_stream_logs_follows_live_and_ends_with_the_job(admin, packages):
    admin.submit("follow", plain(packages, steps=4, sleep=0.4))
    received = []
    request = pb.StreamLogsRequest(name="follow", follow=True, replicas=[pb.ReplicaId(type=MASTER)])
    for response in admin.stub.StreamLogs(request, metadata=admin.md, timeout=60):
        for line in response.lines:
            received.append((time.monotonic(), line.text))
    steps = [(at, t) for at, t in received if t.startswith("Step:")]
    assert [t.split(",")[0] for _, t in steps] == [f"Step: {i}" for i in range(4)]
    assert steps[-1][0] - steps[0][0] > 0.8  # lines arrived as written, not all at the end
    assert admin.get("follow").state == S.JOB_STATE_SUCCEEDED
    tail = admin.logs("follow", replicas=[pb.ReplicaId(type=MASTER)], tail_lines=1)
    assert len(tail) == 1 and tail[0].text.startswith('{"x1"')
    expect_error(Code.INVALID_ARGUMENT, admin.logs, "follow", replicas=[pb.ReplicaId(type=WORKER, index=3)])


def test_watch_job_streams_states_until_final(admin, packages):
    admin.submit("watched", plain(packages, steps=2, sleep=0.2))
    states = []
    for response in admin.stub.WatchJob(pb.WatchJobRequest(name="watched"), metadata=admin.md, timeout=60):
        states.append(response.job.state)
    assert states[-1] == S.JOB_STATE_SUCCEEDED and S.JOB_STATE_RUNNING in states
    assert states.index(S.JOB_STATE_RUNNING) < len(states) - 1


def test_report_metrics_rpc_replaces_a_step(admin, packages):
    admin.submit("reported", faulty(packages, "sleep", "--seconds 30 --every 1"))
    admin.wait("reported", states={S.JOB_STATE_RUNNING}, timeout=30)
    for value in (0.5, 0.75):
        admin.call("ReportMetrics", pb.ReportMetricsRequest(job_name="reported", replica=pb.ReplicaId(type=MASTER),
                                                            step=1, metrics={"accuracy": value}))
    deadline = time.monotonic() + 5
    while not admin.metrics("reported") and time.monotonic() < deadline:
        time.sleep(0.1)
    (series,) = admin.metrics("reported")
    assert series.name == "accuracy" and [(p.step, p.value) for p in series.points] == [(1, 0.75)]
    expect_error(Code.INVALID_ARGUMENT, admin.call, "ReportMetrics",
                 pb.ReportMetricsRequest(job_name="reported", replica=pb.ReplicaId(type=MASTER), step=1,
                                         metrics={"bad name!": 1.0}))
    admin.cancel("reported")
    admin.wait("reported", timeout=10)
    expect_error(Code.FAILED_PRECONDITION, admin.call, "ReportMetrics",
                 pb.ReportMetricsRequest(job_name="reported", replica=pb.ReplicaId(type=MASTER), step=2,
                                         metrics={"accuracy": 1.0}))


def test_cli_jobs_commands_through_the_gateway(stack, built, tmp_path):
    env = stack.cli_env()

    def cli(*argv, check=True):
        result = subprocess.run([sys.executable, "-m", "cloudml", *argv], capture_output=True, text=True, env=env,
                                timeout=120)
        if check:
            assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result

    # A path on this machine: the CLI uploads it (UploadPackage) and submits the stored copy.
    seed = {"job_name": "cli-job", "module_name": "plain_trainer.task", "trainer_uri": built["plain"],
            "job_args": "--x1 3.14159 --x2 2.275 --steps 3", "cpu_limit": "0.1", "memory_limit": "256Mi"}
    (tmp_path / "spec.json").write_text(json.dumps(seed))
    watched = cli("jobs", "submit", "-f", str(tmp_path / "spec.json"), "--watch")
    assert "[master-0] Step: 2" in watched.stdout and "succeeded" in watched.stderr
    assert "uploaded" in watched.stderr
    listed = json.loads(cli("jobs", "list", "--state", "succeeded", "-o", "json").stdout)
    assert "cli-job" in [j["name"] for j in listed]
    described = cli("jobs", "describe", "cli-job").stdout
    assert "Events:" in described and "Succeeded" in described and "master-0" in described
    series = json.loads(cli("jobs", "metrics", "cli-job", "-o", "json").stdout)["series"]
    assert series[0]["name"] == "objective" and len(series[0]["points"]) == 3
    tail = cli("jobs", "logs", "cli-job", "--replica", "master-0", "--tail", "1").stdout
    assert tail.startswith('{"x1"')
    again = cli("jobs", "submit", "-n", "cli-job", "-m", "other.module", "-u", built["plain"], check=False)
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
    cli("jobs", "delete", "cli-job")
    missing = cli("jobs", "describe", "cli-job", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    # A typo in the module name: the job's status says what Python said, not only "exit 1".
    (tmp_path / "typo.json").write_text(json.dumps({**seed, "job_name": "cli-typo", "module_name": "plain_trainer.tsk"}))
    failed = cli("jobs", "submit", "-f", str(tmp_path / "typo.json"), "--watch", check=False)
    assert failed.returncode == 1 and "No module named plain_trainer.tsk" in failed.stderr, failed.stderr
    described = cli("jobs", "describe", "cli-typo").stdout
    assert "ReplicaFailed master-0 exit 1: " in described and "No module named plain_trainer.tsk" in described
    events = [line for line in described.splitlines() if "Installing" in line]
    assert not [line for line in events if "installing" in line.split("Installing", 1)[1]], events


def test_jobs_service_process_never_loaded_tensorflow(stack):
    for process in stack.jobs:
        if process.alive():
            maps = psutil.Process(process.process.pid).memory_maps()
            assert not [m.path for m in maps if "tensorflow" in m.path.lower()]


# --- failure tolerance: own stacks -------------------------------------------------------


@pytest.fixture
def own_stack(tmp_path, envs_dir, etcd_server):
    stack = JobsStack(str(tmp_path / "stack"), envs_dir=envs_dir, lease_ttl=2, etcd_endpoint=etcd_server.endpoint).start()
    yield stack
    stack.stop()


def test_kill_9_of_the_jobs_service_mid_run_loses_no_job(own_stack, built):
    jobs = own_stack.start_jobs()
    client = own_stack.admin()
    packages = client.packages(built)
    client.submit("short", faulty(packages, "sleep", "--seconds 1.5 --every 0.5"))
    client.submit("long", faulty(packages, "sleep", "--seconds 8 --every 0.5"))
    client.submit("fails", faulty(packages, "flaky", "--fail-times 1",
                                  restart_policy=pb.RESTART_POLICY_ON_FAILURE, max_retries=2))
    client.wait("fails", timeout=30)
    for name in ("short", "long"):
        client.wait(name, states={S.JOB_STATE_RUNNING}, timeout=30)
    long_pid = pids_of(client.get("long"))[0]
    jobs.kill()
    time.sleep(2.5)  # "short" ends while no scheduler runs
    assert psutil.pid_exists(long_pid), "replicas outlive the jobs service"
    own_stack.start_jobs()
    client = own_stack.admin()
    for name in ("short", "long", "fails"):
        job = client.wait(name, timeout=30)
        assert job.state == S.JOB_STATE_SUCCEEDED, (name, reasons(job))
        assert len(final_events(job)) == 1
    long_job = client.get("long")
    assert long_job.attempts == 1 and "Recovered" in reasons(long_job)
    assert pids_of(long_job) == [long_pid]  # adopted, not started again
    assert client.get("short").attempts == 1
    assert client.get("fails").attempts == 2
    deadline = time.monotonic() + 5
    while client.usage("admin").train_jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.usage("admin").train_jobs == 0


def test_kill_9_while_installing_resumes_the_job(own_stack, built, tmp_path):
    jobs = own_stack.start_jobs()
    client = own_stack.admin()
    # The same package with other bytes: a cache miss, so it installs anew.
    cold = tmp_path / "cold" / os.path.basename(built["plain"])
    cold.parent.mkdir()
    with open(built["plain"], "rb") as f:
        cold.write_bytes(gzip.compress(gzip.decompress(f.read()), mtime=12345))
    client.submit("installing", spec(client.upload(str(cold)), "plain_trainer.task", "--x1 1 --x2 2",
                                     replicas=[replica_spec(MASTER, cpu=100, memory=256 * MiB)]))
    deadline = time.monotonic() + 30
    while client.get("installing").reason != "Installing":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    jobs.kill()
    own_stack.start_jobs()
    client = own_stack.admin()
    job = client.wait("installing", timeout=60)
    assert job.state == S.JOB_STATE_SUCCEEDED and job.attempts == 1, reasons(job)
    assert "Recovered" in reasons(job) and len(final_events(job)) == 1


def test_standby_takes_over_when_the_leader_dies(own_stack, built):
    first = own_stack.start_jobs()
    second = own_stack.start_jobs()
    client = own_stack.admin(second)
    packages = client.packages(built)
    client.submit("handover", faulty(packages, "sleep", "--seconds 3 --every 0.5"))
    client.wait("handover", states={S.JOB_STATE_RUNNING}, timeout=30)
    leader = next(p for p in (first, second) if "scheduler: leading" in open(p.log_path).read())
    standby = second if leader is first else first
    leader.kill()
    client = own_stack.admin(standby)
    job = client.wait("handover", timeout=30)
    assert job.state == S.JOB_STATE_SUCCEEDED and job.attempts == 1 and len(final_events(job)) == 1
    client.submit("after", plain(packages, steps=1))
    assert client.wait("after", timeout=30).state == S.JOB_STATE_SUCCEEDED
    assert "scheduler: leading" in open(standby.log_path).read()


def test_a_job_that_failed_while_the_service_was_down_follows_its_policy(own_stack, built):
    jobs = own_stack.start_jobs()
    client = own_stack.admin()
    packages = client.packages(built)
    client.submit("dies", faulty(packages, "sleep", "--seconds 1 --every 0.5"))
    job = client.wait("dies", states={S.JOB_STATE_RUNNING}, timeout=30)
    jobs.kill()
    os.kill(pids_of(job)[0], signal.SIGKILL)  # ends by a signal while nobody watches
    time.sleep(0.5)
    own_stack.start_jobs()
    client = own_stack.admin()
    job = client.wait("dies", timeout=30)
    assert job.state == S.JOB_STATE_FAILED and job.message.startswith("ReplicaFailed master-0 exit 137"), reasons(job)
