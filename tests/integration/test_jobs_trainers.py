"""The jobs service as real processes running real trainers: the examples
(examples/trainers) end to end, the replica environment contract, and
trainers that fail (exit codes, restart policies, OOM, timeouts, broken
packages, cancelling a distributed job).

A key namespace of its own on the session's etcd, a real auth service and
the jobs service (`stack`, module-scoped, tests/integration/jobs_helpers.py);
packages are built once a session (`built`) and uploaded into the admin's
storage (`packages`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psutil

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs.metrics import TensorBoardReader
from tests.integration.jobs_stack import MiB, replica_spec, spec

from tests.integration.jobs_helpers import (  # noqa: F401 - admin, packages, stack are fixtures
    CHIEF, MASTER, PS, TF_MEMORY, WORKER, S, admin, faulty, final_events, packages, pids_of, plain, reasons,
    stack, wait_gone,
)


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
    # TensorFlow's INFO chatter stays out (TF_CPP_MIN_LOG_LEVEL=2 unless the job's env says otherwise). The
    # lines TF 2.21 prints before its logging starts (oneDNN on, CUDA probing) ignore the level and appear.
    assert not [t for t in text if "cpu_feature_guard" in t], text[:20]
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
