"""The jobs service as real processes: a key namespace of its own on the
session's etcd, a real auth service, the jobs service, and real trainer packages (examples/trainers) installed into
real environments and run by the local runtime.

The tests share one stack (`stack`, module-scoped, in
tests/integration/jobs_helpers.py): quota and capacity, and the API. The
trainers run end to end in test_jobs_trainers.py; the failure-tolerance tests
(kill -9, standby take-over) in test_jobs_failover.py. Packages are
built once (`built`) and uploaded through UploadPackage into the storage of
the tenant that submits, once per tenant and stack (`packages` is the admin's
view, `member.packages(built)` a member's). Trainer environments are shared by
all stacks (`envs_dir`); with tenant isolation they are per tenant, so each
package installs once per tenant.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from tests.integration.jobs_stack import replica_spec, spec

from tests.integration.jobs_helpers import (  # noqa: F401 - admin, packages, stack are fixtures
    CHIEF, MASTER, WORKER, Code, S, admin, expect_error, faulty, packages, plain, reasons, stack,
)


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


def test_list_jobs_pages_in_submission_order_and_filters_by_state(stack, admin, built):
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
