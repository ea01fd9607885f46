"""The jobs service's failure tolerance, each test on a stack of its own (a
key namespace of its own on the session's etcd, a real auth service, jobs
service processes with a 2 s lease): kill -9 of the service mid-run and
mid-install, a standby taking over from a dead leader, and a job that
failed while the service was down.
"""
from __future__ import annotations

import gzip
import os
import signal
import time

import psutil
import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from tests.integration.jobs_stack import MiB, JobsStack, replica_spec, spec

from tests.integration.jobs_helpers import (
    MASTER, S, faulty, final_events, pids_of, plain, reasons,
)


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
