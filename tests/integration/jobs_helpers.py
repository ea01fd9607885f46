"""Helpers of the jobs service's tests (tests/integration/test_jobs_*.py):
the module's stack (`stack`, `admin`, `packages`: a test module imports them
as fixtures; each module gets its own stack), the trainer specs most tests
submit, calls that expect an error, and what a job's events and replica
processes show. The packages (`built`) and trainer environments
(`envs_dir`) are the session's (tests/integration/conftest.py).
"""
from __future__ import annotations

import time

import grpc
import psutil
import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from tests.integration.jobs_stack import MiB, JobsStack, TenantPackages, replica_spec, spec

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
