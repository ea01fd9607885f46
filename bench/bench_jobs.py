#!/usr/bin/env python3
"""Jobs service figures (issue 3), on a real stack started for the run (its
own etcd, the auth service, one jobs service with the local runtime):

1. Submit throughput: N trivial jobs (a trainer that exits 0 at once)
   submitted concurrently; submissions per second, and the time until every
   one of them is in a final state.
2. Submit -> first replica process started, p50/p99: with a warm environment
   cache (the package's environment exists) and cold (every job a package of
   its own, so every job installs an environment first). "Started" is the
   replica's start time as the runtime recorded it (the shim spawned the
   process), against the client's clock at submit (same machine).
3. ListJobs, a page of 100, with 10,000 jobs stored in one tenant (records
   seeded straight into etcd as finished jobs, as the service itself writes
   them, index keys included), p50/p99; pages read from etcd with range reads.

Packages are uploaded (JobsService/UploadPackage) into each submitting
tenant's storage before the clock starts, as a user's are; uploads are not
part of any figure.

    .venv/bin/python bench/bench_jobs.py [--jobs 500] [--warm 40] [--cold 5] [--stored 10000] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from cloudml.jobs.v1 import jobs_service_pb2 as pb  # noqa: E402
from tests.integration.jobs_stack import MiB, JobsStack, build_packages, replica_spec, spec  # noqa: E402

FINAL = [pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED]
NOT_FINAL = [pb.JOB_STATE_QUEUED, pb.JOB_STATE_PREPARING, pb.JOB_STATE_RUNNING, pb.JOB_STATE_RESTARTING,
             pb.JOB_STATE_CANCELLING]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def trivial(package: str) -> pb.TrainJobSpec:
    return spec(package, "faulty_trainer.exit_code", ["--code", "0"],
                replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=10, memory=128 * MiB)])


def count(client, states) -> int:
    total, token = 0, ""
    while True:
        page = client.call("ListJobs", pb.ListJobsRequest(states=states, page_size=1000, page_token=token))
        total += len(page.jobs)
        token = page.next_page_token
        if not token:
            return total


def bench_throughput(stack, package: str, n: int) -> dict:
    client = stack.new_tenant("thru")
    stack.admin().set_quota(client.tenant, cpu_millis=64_000, memory_bytes=256 << 30, train_jobs=200)
    package = client.upload(package)
    # The tenant's environment of the package, built before the clock starts
    # (environments are per tenant): the figure is submissions, not one install.
    start_latency(client, package, "warm-up")
    started = time.perf_counter()
    futures = [client.stub.SubmitJob.future(pb.SubmitJobRequest(name=f"t-{i:04d}", spec=trivial(package)),
                                            metadata=client.md, timeout=120) for i in range(n)]
    for future in futures:
        future.result()
    submitted = time.perf_counter() - started
    while count(client, NOT_FINAL):
        time.sleep(0.1)
    done = time.perf_counter() - started
    succeeded = count(client, [pb.JOB_STATE_SUCCEEDED]) - 1  # not the warm-up
    return {"jobs": n, "submit_seconds": round(submitted, 3), "submissions_per_second": round(n / submitted, 1),
            "seconds_until_all_final": round(done, 2), "succeeded": succeeded}


def start_latency(client, package: str, name: str) -> float:
    sent = time.time()
    client.submit(name, trivial(package))
    job = client.wait(name, timeout=300)
    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{name} ended {pb.JobState.Name(job.state)}: {job.message}")
    return job.replicas[0].start_time.ToNanoseconds() / 1e9 - sent


def repack(package: str, out_dir: str, i: int) -> str:
    """The same sdist with different bytes (gzip header mtime): a new
    content hash, so a new environment."""
    dest = os.path.join(out_dir, f"cold{i}", os.path.basename(package))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(package, "rb") as f:
        raw = gzip.decompress(f.read())
    with open(dest, "wb") as f:
        f.write(gzip.compress(raw, mtime=1_000_000 + i))
    return dest


def bench_start_latency(stack, package: str, warm: int, cold: int, workdir: str) -> dict:
    client = stack.new_tenant("lat")
    uri = client.upload(package)
    start_latency(client, uri, "warm-up")
    warm_ms = [1000 * start_latency(client, uri, f"warm-{i}") for i in range(warm)]
    cold_ms = [1000 * start_latency(client, client.upload(repack(package, workdir, i)), f"cold-{i}")
               for i in range(cold)]
    return {
        "warm": {"n": warm, "p50_ms": round(pct(warm_ms, 0.5), 1), "p99_ms": round(pct(warm_ms, 0.99), 1),
                 "mean_ms": round(statistics.mean(warm_ms), 1)},
        "cold": {"n": cold, "p50_ms": round(pct(cold_ms, 0.5), 1), "p99_ms": round(pct(cold_ms, 0.99), 1)},
    }


def seed_records(endpoint: str, tenant: str, n: int, storage: str = "/bench/storage") -> None:
    from services.common.etcd import Etcd
    from services.jobs import records
    from services.jobs.store import record_ops

    now = time.time()

    def record(i: int) -> pb.TrainJob:
        job_spec = trivial(f"{storage}/{tenant}/packages/0123456789abcdef/faulty_trainer-1.0.tar.gz")
        job_spec.output_path = f"{storage}/{tenant}/jobs/job-{i:05d}"
        job = pb.TrainJob(name=f"job-{i:05d}", tenant=tenant, spec=job_spec, spec_hash="0" * 64, uid=f"{i:012x}",
                          state=pb.JOB_STATE_QUEUED, create_time=records.ts(now), attempts=1)
        records.add_event(job, pb.JOB_STATE_QUEUED, "Submitted", "submitted by bench", now=now)
        records.add_event(job, pb.JOB_STATE_PREPARING, "Admitted", "quota and local capacity reserved", now=now)
        records.add_event(job, pb.JOB_STATE_RUNNING, "Started", "attempt 1: master-0 pid 1", now=now)
        records.add_event(job, pb.JOB_STATE_SUCCEEDED if i % 10 else pb.JOB_STATE_FAILED,
                          "Succeeded" if i % 10 else "ReplicaFailed", "master-0 exited", now=now)
        job.replicas.add(replica=pb.ReplicaId(type=pb.REPLICA_TYPE_MASTER), state=pb.REPLICA_STATE_SUCCEEDED,
                         exit_code=0, address="127.0.0.1:40000", pid=1)
        return job

    async def write():
        etcd = await Etcd.connect(endpoint)
        try:
            for start in range(0, n, 40):  # 3 keys a job; etcd takes up to 128 operations a transaction
                ops = [op for i in range(start, min(n, start + 40)) for op in record_ops(record(i))]
                await etcd.txn([], ops)
        finally:
            await etcd.close()

    asyncio.run(write())


def bench_list(stack, stored: int, calls: int = 300) -> dict:
    client = stack.new_tenant("list")
    started = time.perf_counter()
    seed_records(stack.etcd.endpoint, client.tenant, stored, os.path.dirname(stack.storage(client.tenant)))
    while count(client, []) < stored:
        time.sleep(0.2)
    visible = time.perf_counter() - started
    tokens, token, step = [""], "", max(100, stored // calls)
    while len(tokens) * step < stored - 100:  # tokens spread over the listing, as pages hand them out
        token = client.call("ListJobs", pb.ListJobsRequest(page_size=step, page_token=token)).next_page_token
        tokens.append(token)
    for token in tokens[:20]:  # warm the channel
        client.call("ListJobs", pb.ListJobsRequest(page_size=100, page_token=token))
    latencies = []
    for i in range(calls):
        request = pb.ListJobsRequest(page_size=100, page_token=tokens[i % len(tokens)])
        t0 = time.perf_counter()
        page = client.call("ListJobs", request)
        latencies.append(1000 * (time.perf_counter() - t0))
        assert len(page.jobs) == 100
    filtered = []
    for i in range(50):
        t0 = time.perf_counter()
        client.call("ListJobs", pb.ListJobsRequest(page_size=100, states=[pb.JOB_STATE_FAILED],
                                                   page_token=tokens[i % len(tokens)]))
        filtered.append(1000 * (time.perf_counter() - t0))
    rss = psutil.Process(stack.jobs[0].process.pid).memory_info().rss
    return {"stored": stored, "seeded_and_visible_seconds": round(visible, 2),
            "page_100_p50_ms": round(pct(latencies, 0.5), 2), "page_100_p99_ms": round(pct(latencies, 0.99), 2),
            "page_100_failed_filter_p50_ms": round(pct(filtered, 0.5), 2),
            "jobs_service_rss_mib": round(rss / MiB)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs submitted concurrently")
    parser.add_argument("--warm", type=int, default=40, help="warm-cache latency samples")
    parser.add_argument("--cold", type=int, default=5, help="cold-cache latency samples")
    parser.add_argument("--stored", type=int, default=10_000, help="jobs stored for the ListJobs figure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="cloudml-bench-jobs-")
    results = {}
    stack = JobsStack(os.path.join(workdir, "stack"), envs_dir=os.path.join(workdir, "envs"), lease_ttl=10).start()
    try:
        packages = build_packages(os.path.join(workdir, "packages"))
        stack.start_jobs()
        results["start_latency"] = bench_start_latency(stack, packages["testing"], args.warm, args.cold, workdir)
        results["throughput"] = bench_throughput(stack, packages["testing"], args.jobs)
        results["list_jobs"] = bench_list(stack, args.stored)
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    lat, thr, lst = results["start_latency"], results["throughput"], results["list_jobs"]
    print(f"submit throughput: {thr['jobs']} jobs submitted concurrently in {thr['submit_seconds']} s "
          f"= {thr['submissions_per_second']} submissions/s; all final after {thr['seconds_until_all_final']} s "
          f"({thr['succeeded']} succeeded)")
    print(f"submit -> first replica started, warm cache: p50 {lat['warm']['p50_ms']} ms, "
          f"p99 {lat['warm']['p99_ms']} ms (n={lat['warm']['n']})")
    print(f"submit -> first replica started, cold cache: p50 {lat['cold']['p50_ms']} ms, "
          f"p99 {lat['cold']['p99_ms']} ms (n={lat['cold']['n']})")
    print(f"ListJobs page of 100 with {lst['stored']} jobs stored: p50 {lst['page_100_p50_ms']} ms, "
          f"p99 {lst['page_100_p99_ms']} ms (state filter FAILED: p50 {lst['page_100_failed_filter_p50_ms']} ms); "
          f"jobs service RSS {lst['jobs_service_rss_mib']} MiB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
