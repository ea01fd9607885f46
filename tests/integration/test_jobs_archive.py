"""Finished jobs move from etcd to the archive and keep reading back
(services/jobs/archiver.py, services/common/archive.py), on a real etcd with
the real auth, jobs and gateway processes, a retention of 3 s.

Jobs that need no trainer are written as records straight into the store
(`seed`), as finished jobs a platform would have: through the store's own
`record_ops`, so they carry the same index keys as submitted ones.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request

import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common.archive import Archive, ArchiveSettings
from services.jobs import records
from services.jobs.archiver import KIND, JobArchive, JobArchiver
from services.jobs.store import ENDED, INDEX_VERSION, JobIndex, JobStore, job_key, record_ops
from tests.integration.auth_helpers import wait_until
from tests.integration.jobs_helpers import Code, S, expect_error, plain
from tests.integration.jobs_stack import JobsStack

RETENTION = 5.0
FLAGS = ["--retention-seconds", str(RETENTION), "--archive-seconds", "0.2", "--etcd-compact-seconds", "0.5",
         "--etcd-keep-revisions", "200", "--etcd-stats-seconds", "0.3", "--etcd-defrag-bytes", "1",
         "--metrics-listen", "127.0.0.1:0"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, envs_dir, built, etcd_server):
    stack = JobsStack(str(tmp_path_factory.mktemp("archive-stack")), envs_dir=envs_dir,
                      etcd_endpoint=etcd_server.endpoint).start()
    stack.start_jobs(extra=FLAGS)
    yield stack
    stack.stop()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    return wait_until(condition, timeout, what=what)


def in_etcd(stack, tenant: str, name: str) -> bool:
    return bool(stack.etcd.get_prefix(job_key(tenant, name)))


def archive_of(stack) -> Archive:
    return Archive(ArchiveSettings().root(stack.harness.data_dir))


def archived(stack, tenant: str, name: str) -> bool:
    return archive_of(stack).pointer(KIND, tenant, name) is not None


def finished_job(tenant: str, name: str, created: float, ended: float, state=S.JOB_STATE_SUCCEEDED) -> pb.TrainJob:
    job = pb.TrainJob(name=name, tenant=tenant, uid=secrets.token_hex(6), spec_hash="0" * 64,
                      spec=pb.TrainJobSpec(trainer_uri="file:///seeded/trainer-1.0.tar.gz", module_name="t.task"),
                      state=pb.JOB_STATE_QUEUED, create_time=records.ts(created))
    records.add_event(job, pb.JOB_STATE_QUEUED, "Submitted", "seeded", now=created)
    records.add_event(job, pb.JOB_STATE_PREPARING, "Admitted", "seeded", now=created)
    records.add_event(job, pb.JOB_STATE_RUNNING, "Started", "seeded", now=created)
    records.add_event(job, state, "Seeded", "seeded as finished", now=ended)
    return job


def seed(stack, jobs: list[pb.TrainJob]) -> None:
    async def write():
        async with stack.etcd.client() as etcd:
            for job in jobs:
                await etcd.txn([], record_ops(job))

    asyncio.run(write())


def list_all(client, page_size: int, states=(), tenant: str = "") -> list[str]:
    names, token = [], ""
    while True:
        page = client.call("ListJobs", pb.ListJobsRequest(page_size=page_size, page_token=token, states=states,
                                                          tenant=tenant))
        names += [j.name for j in page.jobs]
        token = page.next_page_token
        if not token:
            return names


def test_finished_job_is_archived_and_reads_back_with_the_same_authorization(stack, built):
    member, other = stack.new_tenant("arc"), stack.new_tenant("arc-other")
    packages = member.packages(built)
    member.submit("trained", plain(packages, steps=3))
    done = member.wait("trained", timeout=120)
    assert done.state == S.JOB_STATE_SUCCEEDED
    wait_for(lambda: not in_etcd(stack, member.tenant, "trained") and archived(stack, member.tenant, "trained"),
             timeout=RETENTION + 30, what="the job archived")
    # Gone from etcd with its index keys and metric series.
    assert not [k for k in stack.etcd.get_prefix("/cloudml/jobs/") if f"/{member.tenant}/trained" in k]

    assert member.get("trained") == done
    assert [j.name for j in member.call("ListJobs", pb.ListJobsRequest()).jobs] == ["trained"]
    assert [j.name for j in member.call("ListJobs", pb.ListJobsRequest(states=[S.JOB_STATE_FAILED])).jobs] == []
    assert any("Step: 2" in line.text for line in member.logs("trained"))
    assert any("Step: 2" in line.text for line in member.logs("trained", follow=True, timeout=10))
    series = member.metrics("trained")
    assert [s.name for s in series] == ["objective"] and len(series[0].points) == 3
    watched = list(member.stub.WatchJob(pb.WatchJobRequest(name="trained"), metadata=member.md, timeout=10))
    assert [w.job.state for w in watched] == [S.JOB_STATE_SUCCEEDED]
    assert member.cancel("trained").state == S.JOB_STATE_SUCCEEDED

    # Another tenant sees nothing of it, as of a live job.
    for call in (lambda: other.get("trained", tenant=member.tenant), lambda: other.get("trained"),
                 lambda: other.logs("trained", tenant=member.tenant),
                 lambda: other.metrics("trained", tenant=member.tenant),
                 lambda: other.cancel("trained", tenant=member.tenant),
                 lambda: other.call("DeleteJob", pb.DeleteJobRequest(tenant=member.tenant, name="trained")),
                 lambda: other.call("ListJobs", pb.ListJobsRequest(tenant=member.tenant))):
        expect_error(Code.NOT_FOUND, call)
    assert other.call("ListJobs", pb.ListJobsRequest()).jobs == []
    assert stack.admin().get("trained", tenant=member.tenant).uid == done.uid

    # The name stays taken: another spec is refused, the same one is the same job.
    err = expect_error(Code.ALREADY_EXISTS, member.submit, "trained", plain(packages, steps=4))
    assert "trained" in err.details()
    again = member.submit("trained", plain(packages, steps=3))
    assert not again.created and again.job.uid == done.uid

    # Deleting it frees the name and its files.
    member.call("DeleteJob", pb.DeleteJobRequest(name="trained"))
    expect_error(Code.NOT_FOUND, member.get, "trained")
    assert not archived(stack, member.tenant, "trained")
    assert not os.path.exists(os.path.join(stack.harness.data_dir, "jobs", member.tenant, "trained"))
    reborn = member.submit("trained", plain(packages, steps=1))
    assert reborn.created and reborn.job.uid != done.uid
    assert member.wait("trained").state == S.JOB_STATE_SUCCEEDED


def test_cli_reads_an_archived_job(stack, built):
    admin = stack.admin()
    admin.submit("cli-archived", plain(admin.packages(built), steps=2))
    admin.wait("cli-archived")
    wait_for(lambda: archived(stack, "admin", "cli-archived") and not in_etcd(stack, "admin", "cli-archived"),
             timeout=RETENTION + 30, what="the job archived")
    env = stack.cli_env()

    def cli(*argv):
        result = subprocess.run([sys.executable, "-m", "cloudml", *argv], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result.stdout

    assert "cli-archived" in [j["name"] for j in json.loads(cli("jobs", "list", "-o", "json"))]
    described = cli("jobs", "describe", "cli-archived")
    assert "Events:" in described and "Succeeded" in described
    assert "Step: 1" in cli("jobs", "logs", "cli-archived")
    series = json.loads(cli("jobs", "metrics", "cli-archived", "-o", "json"))["series"]
    assert series[0]["name"] == "objective" and len(series[0]["points"]) == 2


def test_list_pages_across_the_live_and_archived_boundary_without_gaps_or_duplicates(stack):
    member = stack.new_tenant("page")
    now = time.time()
    # Created in turn, a second apart: even ones ended a day ago (archived at
    # once), odd ones just now (live for the retention period).
    jobs = [finished_job(member.tenant, f"job-{i:02d}", now - 86400 * 3 + i, now - 86400 if i % 2 == 0 else now,
                         S.JOB_STATE_FAILED if i % 3 == 0 else S.JOB_STATE_SUCCEEDED) for i in range(12)]
    seed(stack, jobs)
    expected = [j.name for j in jobs]
    wait_for(lambda: all(archived(stack, member.tenant, n) for n in expected[::2]), what="the old half archived")
    assert list_all(member, 5) == expected
    assert list_all(member, 1000, states=[S.JOB_STATE_FAILED]) == [n for i, n in enumerate(expected) if i % 3 == 0]

    # A token taken now stays good while the rest moves to the archive.
    first = member.call("ListJobs", pb.ListJobsRequest(page_size=3))
    assert [j.name for j in first.jobs] == expected[:3]
    wait_for(lambda: all(archived(stack, member.tenant, n) and not in_etcd(stack, member.tenant, n)
                         for n in expected), timeout=RETENTION + 30, what="everything archived")
    rest, token = [], first.next_page_token
    while token:
        page = member.call("ListJobs", pb.ListJobsRequest(page_size=4, page_token=token))
        rest += [j.name for j in page.jobs]
        token = page.next_page_token
    assert [j.name for j in first.jobs] + rest == expected
    assert list_all(member, 7) == expected
    expect_error(Code.INVALID_ARGUMENT, member.call, "ListJobs", pb.ListJobsRequest(page_token="%%%"))
    expect_error(Code.INVALID_ARGUMENT, member.call, "ListJobs", pb.ListJobsRequest(page_token="am9iLTAx"))


def test_archiver_killed_between_write_and_delete_loses_nothing_and_shows_no_duplicate(stack, built):
    member = stack.new_tenant("crash")
    now = time.time()
    jobs = {n: finished_job(member.tenant, n, now - 60 + i, now) for i, n in enumerate(("a", "b", "c"))}
    seed(stack, list(jobs.values()))
    uri = ArchiveSettings().root(stack.harness.data_dir)

    async def archiver_steps():
        async with stack.etcd.client() as etcd:
            store = JobStore(etcd, JobIndex(etcd))
            archive = JobArchive(Archive(uri))
            # Its clock is past the retention of the seeded jobs; the service's is not yet.
            archiver = JobArchiver(store, archive, ArchiveSettings(retention_seconds=RETENTION, batch=500),
                                   clock=lambda: time.time() + 2 * RETENTION)
            due = [d for d in await archiver.due(int((time.time() + RETENTION) * 1e9)) if d[0].tenant == member.tenant]
            assert sorted(job.name for job, _ in due) == ["a", "b", "c"]
            # Killed after writing every record: nothing deleted from etcd.
            written = await archiver.write(due)
            return archiver, written

    archiver, written = asyncio.run(archiver_steps())
    for name, job in jobs.items():
        assert in_etcd(stack, member.tenant, name) and archived(stack, member.tenant, name)
        assert member.get(name).uid == job.uid
    assert list_all(member, 2) == ["a", "b", "c"]
    expect_error(Code.ALREADY_EXISTS, member.submit, "a", plain(member.packages(built)))
    # A DeleteJob of a half-moved job removes both copies.
    member.call("DeleteJob", pb.DeleteJobRequest(name="c"))
    expect_error(Code.NOT_FOUND, member.get, "c")

    # The next pass (here the service's own) finishes the move.
    wait_for(lambda: not any(in_etcd(stack, member.tenant, n) for n in jobs), timeout=RETENTION + 30,
             what="the next pass")
    assert list_all(member, 2) == ["a", "b"]
    assert [member.get(n).uid for n in ("a", "b")] == [jobs["a"].uid, jobs["b"].uid]
    expect_error(Code.NOT_FOUND, member.get, "c")
    # "a" was written twice; one line is visible.
    tenant_dir = os.path.join(stack.harness.data_dir, "archive", KIND, member.tenant)
    lines = [json.loads(line) for day in os.listdir(tenant_dir) if re.fullmatch(r"\d{4}-\d\d-\d\d", day)
             for part in os.listdir(os.path.join(tenant_dir, day))
             for line in open(os.path.join(tenant_dir, day, part), "rb")]
    assert sorted(row["name"] for row in lines).count("a") == 2

    # A delete that lands between the archiver's two steps wins: the pointer is taken back.
    late = finished_job(member.tenant, "late", now, now)
    seed(stack, [late])

    async def race():
        async with stack.etcd.client() as etcd:
            store = JobStore(etcd, JobIndex(etcd))
            steps = JobArchiver(store, archiver.archive, archiver.settings, clock=archiver.clock)
            due = [d for d in await steps.due(int((time.time() + RETENTION) * 1e9)) if d[0].name == "late"]
            written = await steps.write(due)
            member.call("DeleteJob", pb.DeleteJobRequest(name="late"))
            return await steps.remove(written)

    assert asyncio.run(race()) == 0
    expect_error(Code.NOT_FOUND, member.get, "late")
    assert not archived(stack, member.tenant, "late")


def test_records_stored_before_the_index_keys_are_listed_after_the_leader_restarts(stack):
    member = stack.new_tenant("old")
    now = time.time()
    jobs = [finished_job(member.tenant, f"old-{i}", now - 100 + i, now + 3600) for i in range(3)]

    async def as_an_older_version_wrote_them():
        async with stack.etcd.client() as etcd:
            for job in jobs:
                await etcd.put(job_key(job.tenant, job.name), job.SerializeToString())
            await etcd.delete(INDEX_VERSION)

    asyncio.run(as_an_older_version_wrote_them())
    assert member.call("ListJobs", pb.ListJobsRequest()).jobs == []  # no order/ keys yet
    stack.jobs[0].stop()
    stack.start_jobs(extra=FLAGS)
    admin = stack.admin()  # of the new jobs process
    wait_for(lambda: list_all(admin, 10, tenant=member.tenant) == [j.name for j in jobs], what="the old records listed")


def test_etcd_is_compacted_and_its_size_and_key_counts_are_exported(stack):
    ports = json.load(open(stack.harness.alive("jobs").port_file))

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(cloudml_etcd_\S+) (\S+)$", text, re.M)}

    async def revision() -> int:
        async with stack.etcd.client() as etcd:
            return (await etcd.status()).header.revision

    before = asyncio.run(revision())
    seed(stack, [finished_job("compaction", f"j-{i}", time.time(), time.time() + 3600) for i in range(250)])
    # A pass that began while the seed was still being written counts only part of it: wait for one after it.
    jobs_keys = 'cloudml_etcd_keys{prefix="/cloudml/jobs/jobs/"}'
    metrics = wait_for(lambda: (m := scrape()).get("cloudml_etcd_compactions_total", 0) >= 1
                       and m.get("cloudml_etcd_revision", 0) >= before + 250 and m.get(jobs_keys, 0) >= 250 and m,
                       what="a compaction and a count of the seeded jobs")
    assert metrics["cloudml_etcd_db_size_bytes"] > 0 and metrics["cloudml_etcd_db_size_in_use_bytes"] > 0

    # Space freed by deletes and compacted away is given back (--etcd-defrag-bytes 1: whenever a quarter is free).
    async def delete_seeded():
        async with stack.etcd.client() as etcd:
            for prefix in ("/cloudml/jobs/jobs/compaction/", "/cloudml/jobs/order/compaction/", ENDED):
                await etcd.delete_prefix(prefix)

    defrags = metrics.get("cloudml_etcd_defragmentations_total", 0)
    asyncio.run(delete_seeded())
    wait_for(lambda: scrape().get("cloudml_etcd_defragmentations_total", 0) > defrags, what="a defragmentation")

    async def old_read_fails() -> bool:
        async with stack.etcd.client() as etcd:
            try:
                await etcd.get_prefix(ENDED, revision=before)
            except Exception as err:  # noqa: BLE001 - etcd says the revision is compacted
                return "compacted" in str(err)
            return False

    wait_for(lambda: asyncio.run(old_read_fails()), what="history before the seed compacted")
