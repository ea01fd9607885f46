#!/usr/bin/env python3
"""A year of a busy platform's history against an empty platform (issue 17),
side by side in one run, each on a stack of its own (etcd, auth, jobs,
tuner, models, gateway):

- the history: N finished jobs (default 1,000,000) over 1,000 tenants,
  created evenly over the last 365 days, each ended 10 minutes after its
  creation; tenant-0000 has `--heavy-share` of them (default 15 %), the
  others share the rest. Jobs that ended within the retention period (7
  days) are written into etcd through the store's own `record_ops`, the
  rest straight into the archive's format through `services.common.archive`
  (what the archiver writes), in two processes;
- then the same figures on both platforms:
  resident memory of each service (and etcd), etcd's db size,
  ListJobs of tenant-0000 (first page right after the services start, and
  again once they are idle, as every later figure is; the page after 1,000 pages of 100,
  reached by walking the tokens: also the p50 of all those pages),
  GetJob of archived jobs of random tenants,
  GetStudy, ListTrials and ListStudies (tenant-0000's first page) on
  archived studies, GetVersion of archived model versions and ListVersions
  of tenant-0000's biggest model, and submit -> first replica started for
  new jobs (warm environment).

Model versions: `--versions` (default 10,000) that ended (failed to load)
10 minutes after their creation, spread like the jobs over the tenants
(three models each), created evenly over the year: those that ended within
the retention period written into etcd through `ModelStore.create_version`
(with the ended/ key the store writes), the rest into the archive's format
through `services.models.archiver.VersionArchive` (what the archiver writes).

    .venv/bin/python bench/bench_history.py [--jobs 1000000] [--tenants 1000] [--versions 10000] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_foundation import process_memory  # noqa: E402
from bench.bench_jobs import pct, start_latency  # noqa: E402
from cloudml.jobs.v1 import jobs_service_pb2 as pb  # noqa: E402
from tests.integration.jobs_stack import JobsStack, build_packages  # noqa: E402

DAY = 86400.0
RETENTION_DAYS = 7
RUN_SECONDS = 600.0
SERVICES = ("auth", "jobs", "tuner", "models", "gateway")


def tenant_of(i: int, tenants: int, heavy_share: float) -> str:
    """Job i's tenant: tenant-0000 for a `heavy_share` of them, the rest round robin."""
    if (i * 7919) % 1000 < heavy_share * 1000:
        return "tenant-0000"
    return f"tenant-{1 + i % (tenants - 1):04d}"


def make_job(i: int, tenant: str, created: float) -> pb.TrainJob:
    """A finished job as the service records one (~1.2 KB: spec, 4 events, a replica)."""
    from services.jobs import records  # noqa: PLC0415

    storage = f"/data/storage/{tenant}"
    job_spec = pb.TrainJobSpec(trainer_uri=f"file://{storage}/packages/0123456789abcdef/trainer-1.0.tar.gz",
                               module_name="trainer.task", output_path=f"file://{storage}/jobs/job-{i:07d}",
                               job_args=["--epochs", "10", "--lr", "0.01", "--batch-size", "64"])
    job_spec.replica_specs.add(type=pb.REPLICA_TYPE_MASTER, replica_count=1).resources.cpu_millis = 500
    job = pb.TrainJob(name=f"job-{i:07d}", tenant=tenant, spec=job_spec, spec_hash="0" * 64, uid=f"{i:012x}",
                      state=pb.JOB_STATE_QUEUED, create_time=records.ts(created), attempts=1)
    records.add_event(job, pb.JOB_STATE_QUEUED, "Submitted", f"submitted by {tenant}", now=created)
    records.add_event(job, pb.JOB_STATE_PREPARING, "Admitted", "quota and local capacity reserved", now=created + 0.1)
    records.add_event(job, pb.JOB_STATE_RUNNING, "Started", "attempt 1: master-0 pid 4242", now=created + 1)
    ok = i % 10 != 0
    records.add_event(job, pb.JOB_STATE_SUCCEEDED if ok else pb.JOB_STATE_FAILED,
                      "Succeeded" if ok else "ReplicaFailed", "master-0 exited with code 0" if ok else "exit 1",
                      now=created + RUN_SECONDS)
    job.replicas.add(replica=pb.ReplicaId(type=pb.REPLICA_TYPE_MASTER), state=pb.REPLICA_STATE_SUCCEEDED,
                     exit_code=0 if ok else 1, address="127.0.0.1:40000", pid=4242)
    return job


def _plan(n: int, now: float) -> list[float]:
    """Creation times: evenly over the year before `now`, oldest first."""
    return [now - 365 * DAY + i * (365 * DAY - RUN_SECONDS) / n for i in range(n)]


def _archive_worker(args) -> int:
    """Writes the archived jobs of some tenants (a process of its own)."""
    uri, names, n, tenants, heavy_share, now, cutoff = args
    from services.common.archive import Archive  # noqa: PLC0415
    from services.jobs.archiver import JobArchive  # noqa: PLC0415

    archive = Archive(uri, fsync=False)
    jobs_archive = JobArchive(archive)
    mine = set(names)
    by_tenant: dict[str, list] = {}
    written = 0
    for i, created in enumerate(_plan(n, now)):
        if created + RUN_SECONDS >= cutoff:
            break
        tenant = tenant_of(i, tenants, heavy_share)
        if tenant not in mine:
            continue
        by_tenant.setdefault(tenant, []).append((make_job(i, tenant, created), []))
        if len(by_tenant[tenant]) >= 2000:
            written += len(jobs_archive.write(tenant, by_tenant.pop(tenant)))
    for tenant, jobs in by_tenant.items():
        written += len(jobs_archive.write(tenant, jobs))
    return written


TRIALS_PER_STUDY = 20


def make_study(s: int, tenant: str, created: float):
    """A finished study of TRIALS_PER_STUDY trials as the tuner records one: (StudyRecord, [TrialRecord])."""
    from cloudml.tuner.v1 import tuner_service_pb2 as tpb  # noqa: PLC0415
    from services.jobs import records  # noqa: PLC0415
    from services.tuner.store import StudyRecord, TrialRecord, apply_to_summary  # noqa: PLC0415

    spec = tpb.StudySpec(goal=tpb.GOAL_MINIMIZE, metric="objective", algorithm=tpb.ALGORITHM_RANDOM,
                         max_trials=TRIALS_PER_STUDY, max_parallel_trials=2, seed=s)
    spec.parameters.add(name="lr", double_range=tpb.DoubleRange(min=1e-4, max=1e-1, scale=tpb.SCALE_LOG))
    study = tpb.Study(name=f"study-{s:06d}", tenant=tenant, spec=spec, state=tpb.STUDY_STATE_SUCCEEDED,
                      reason="Succeeded", message="all trials ended", create_time=records.ts(created),
                      trial_counts=tpb.TrialCounts())
    trials = []
    for n in range(1, TRIALS_PER_STUDY + 1):
        at = created + n * RUN_SECONDS / 2
        trial = tpb.Trial(study=study.name, tenant=tenant, number=n, job_name=f"{study.name}-{n}",
                          state=tpb.TRIAL_STATE_SUCCEEDED, objective_value=1.0 / n, objective_step=10,
                          client_id="driver", reason="Succeeded", create_time=records.ts(at),
                          start_time=records.ts(at + 1), end_time=records.ts(at + RUN_SECONDS / 2))
        trial.params["lr"].double_value = 0.001 * n
        old = None
        apply_to_summary(study, old, trial)
        trials.append(TrialRecord(trial))
    study.end_time.CopyFrom(records.ts(created + (TRIALS_PER_STUDY + 1) * RUN_SECONDS / 2))
    return StudyRecord(study, released=True), trials


def generate_studies(stack: JobsStack, studies: int, tenants: int, heavy_share: float, now: float) -> dict:
    from services.common.archive import Archive  # noqa: PLC0415
    from services.common.etcd import op_put  # noqa: PLC0415
    from services.tuner.archiver import StudyArchive  # noqa: PLC0415
    from services.tuner.store import study_key, trial_key  # noqa: PLC0415

    cutoff = now - RETENTION_DAYS * DAY
    archive = StudyArchive(Archive("file://" + os.path.join(stack.harness.data_dir, "archive"), fsync=False))
    span = (TRIALS_PER_STUDY + 1) * RUN_SECONDS / 2
    by_tenant: dict[str, list] = {}
    recent = []
    for s, created in enumerate(_plan(studies, now - span)):
        record, trials = make_study(s, tenant_of(s, tenants, heavy_share), created)
        if created + span >= cutoff:
            recent.append((record, trials))
        else:
            by_tenant.setdefault(record.study.tenant, []).append((record, trials, {}, {}))
    for tenant, rows in by_tenant.items():
        archive.write(tenant, rows)

    async def write():
        async with stack.etcd.client() as etcd:
            for record, trials in recent:
                study = record.study
                await etcd.txn([], [op_put(study_key(study.tenant, study.name), record.encode()),
                                    *(op_put(trial_key(study.tenant, study.name, t.trial.number), t.encode())
                                      for t in trials)])

    asyncio.run(write())
    return {"studies_archived": sum(len(v) for v in by_tenant.values()), "studies_in_etcd": len(recent)}


MODELS_PER_TENANT = 3


def make_version(i: int, tenant: str, model: str, number: int, created: float):
    """An ended model version as the models service records one (failed to load, replica gone)."""
    from cloudml.common.v1 import resources_pb2  # noqa: PLC0415
    from cloudml.models.v1 import models_service_pb2 as mpb  # noqa: PLC0415
    from services.models.rules import ts  # noqa: PLC0415

    return mpb.ModelVersion(
        model=model, tenant=tenant, version=number, description=f"nightly {i}",
        model_uri=f"file:///data/storage/{tenant}/models/{model}/{number}/",
        resources=resources_pb2.Resources(cpu_millis=500, memory_bytes=2 << 30), min_replicas=1, max_replicas=1,
        batching=mpb.BatchingConfig(), state=mpb.MODEL_VERSION_STATE_END, desired_replicas=1,
        status=mpb.ErrorStatus(code=3, message="the SavedModel failed to load: Op type not registered 'Foo'"),
        create_time=ts(created))


def version_plan(n: int, tenants: int, heavy_share: float, now: float) -> list[tuple[int, str, str, int, float]]:
    """(i, tenant, model, number, created) of each version, oldest first; numbers count up per model."""
    numbers: dict[tuple[str, str], int] = {}
    plan = []
    for i, created in enumerate(_plan(n, now)):
        tenant = tenant_of(i, tenants, heavy_share)
        model = f"model-{(i // 7) % MODELS_PER_TENANT}"
        numbers[(tenant, model)] = number = numbers.get((tenant, model), 0) + 1
        plan.append((i, tenant, model, number, created))
    return plan


def generate_versions(stack: JobsStack, n: int, tenants: int, heavy_share: float, now: float) -> dict:
    from cloudml.models.v1 import models_service_pb2 as mpb  # noqa: PLC0415
    from services.common.archive import Archive  # noqa: PLC0415
    from services.common.etcd import op_put  # noqa: PLC0415
    from services.models.archiver import ArchivedVersion, VersionArchive  # noqa: PLC0415
    from services.models.rules import ts  # noqa: PLC0415
    from services.models.store import ModelStore  # noqa: PLC0415

    cutoff = now - RETENTION_DAYS * DAY
    plan = version_plan(n, tenants, heavy_share, now)
    highest: dict[tuple[str, str], int] = {}
    for _, tenant, model, number, _ in plan:
        highest[(tenant, model)] = number
    born = now - 366 * DAY
    started = time.perf_counter()
    archive = VersionArchive(Archive("file://" + os.path.join(stack.harness.data_dir, "archive"), fsync=False))
    old: dict[tuple[str, str], list] = {}
    recent = []
    for i, tenant, model, number, created in plan:
        version = make_version(i, tenant, model, number, created)
        if created + RUN_SECONDS < cutoff:
            old.setdefault((tenant, model), []).append(ArchivedVersion(version, [], int(born * 1e9)))
        else:
            recent.append((version, created + RUN_SECONDS))
    for (tenant, model), versions in old.items():
        archive.write(tenant, model, versions)

    async def write():
        async with stack.etcd.client() as etcd:
            store = ModelStore(etcd)
            for (tenant, model), top in highest.items():
                record = mpb.Model(name=model, tenant=tenant, create_time=ts(born), update_time=ts(born))
                assert await store.create_model(record)
                await etcd.txn([], [op_put(store.keys.counter(tenant, model), str(top).encode())])
            for version, ended in recent:
                store.clock = lambda ended=ended: ended
                _, model_revision = await store.get_model(version.tenant, version.model)
                top, counter_revision = await store.get_counter(version.tenant, version.model)
                assert await store.create_version(version, model_revision, top, counter_revision)

    asyncio.run(write())
    return {"versions_archived": sum(len(v) for v in old.values()), "versions_in_etcd": len(recent),
            "models": len(highest), "versions_seconds": round(time.perf_counter() - started, 1)}


def generate(stack: JobsStack, n: int, tenants: int, heavy_share: float, now: float) -> dict:
    from services.jobs.store import record_ops  # noqa: PLC0415

    cutoff = now - RETENTION_DAYS * DAY
    uri = "file://" + os.path.join(stack.harness.data_dir, "archive")
    started = time.perf_counter()
    names = [f"tenant-{t:04d}" for t in range(tenants)]
    shards = [(uri, names[k::2], n, tenants, heavy_share, now, cutoff) for k in range(2)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        archived = sum(pool.map(_archive_worker, shards))
    archived_seconds = time.perf_counter() - started

    recent = [(i, created) for i, created in enumerate(_plan(n, now)) if created + RUN_SECONDS >= cutoff]

    async def write():
        async with stack.etcd.client() as etcd:
            for start in range(0, len(recent), 40):  # 3 keys a job; at most 128 operations a transaction
                ops = [op for i, created in recent[start:start + 40]
                       for op in record_ops(make_job(i, tenant_of(i, tenants, heavy_share), created))]
                await etcd.txn([], ops)

    asyncio.run(write())
    return {"archived": archived, "in_etcd": len(recent), "archive_seconds": round(archived_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "archive_bytes": du(os.path.join(stack.harness.data_dir, "archive"))}


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def etcd_db_size(stack: JobsStack) -> int:
    async def status():
        async with stack.etcd.client() as etcd:
            return (await etcd.status()).dbSize

    return asyncio.run(status())


def timed(call, times: int) -> list[float]:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        call()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def measure_versions(stack: JobsStack, admin, n: int, tenants: int, heavy_share: float, now: float,
                     samples: int) -> dict:
    """GetVersion of archived versions of random tenants; ListVersions (first page of 100) of tenant-0000's
    biggest model, live and archived merged."""
    import grpc  # noqa: PLC0415

    from cloudml.models.v1 import models_service_pb2 as mpb  # noqa: PLC0415
    from cloudml.models.v1 import models_service_pb2_grpc as mpb_grpc  # noqa: PLC0415

    plan = version_plan(n, tenants, heavy_share, now)
    cutoff = now - RETENTION_DAYS * DAY
    rng = random.Random(17)
    old = [p for p in (plan[rng.randrange(n)] for _ in range(samples * 3)) if p[4] + RUN_SECONDS < cutoff][:samples]
    channel = grpc.insecure_channel(stack.harness.alive("models").poll_address())
    stub = mpb_grpc.ModelsServiceStub(channel)

    def call(method, request):
        return getattr(stub, method)(request, metadata=admin.md, timeout=20)

    gets = []
    for _, tenant, model, number, _ in old:
        t0 = time.perf_counter()
        version = call("GetVersion", mpb.GetVersionRequest(tenant=tenant, model=model, version=number)).model_version
        gets.append(1000 * (time.perf_counter() - t0))
        assert version.version == number and version.state == mpb.MODEL_VERSION_STATE_END
    counts: dict[str, int] = {}
    for _, tenant, model, _, _ in plan:
        if tenant == "tenant-0000":
            counts[model] = counts.get(model, 0) + 1
    biggest = max(counts, key=counts.get)
    listed = call("ListVersions", mpb.ListVersionsRequest(tenant="tenant-0000", model=biggest, page_size=100))
    assert len(listed.model_versions) == min(100, counts[biggest])
    lists = timed(lambda: call("ListVersions", mpb.ListVersionsRequest(tenant="tenant-0000", model=biggest,
                                                                       page_size=100)), samples)
    channel.close()
    return {"get_version_archived_p50_ms": round(pct(gets, 0.5), 2),
            "get_version_archived_p99_ms": round(pct(gets, 0.99), 2),
            "list_versions_first_page_p50_ms": round(pct(lists, 0.5), 2),
            "list_versions_model_versions": counts[biggest]}


def settle(stack: JobsStack, idle_share: float = 0.05, timeout: float = 120.0) -> float:
    """Waits until the services' start-up work is done (each process under
    `idle_share` of a core over a second: the jobs index listed, the models
    mirrored, etcd's first maintenance pass); the seconds it took."""
    import psutil  # noqa: PLC0415

    procs = [psutil.Process(stack.harness.alive(s).process.pid) for s in SERVICES]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = [p.cpu_times() for p in procs]
        time.sleep(1.0)
        busy = [sum(p.cpu_times()[:2]) - sum(b[:2]) for p, b in zip(procs, before)]
        if max(busy) < idle_share:
            break
    return round(time.monotonic() - started, 1)


def measure(stack: JobsStack, package: str, n: int, tenants: int, heavy_share: float, now: float,
            samples: int, starts: int, studies: int = 0, versions: int = 0) -> dict:
    admin = stack.admin()
    heavy = "tenant-0000"

    def page(token: str = "", size: int = 100):
        return admin.call("ListJobs", pb.ListJobsRequest(tenant=heavy, page_size=size, page_token=token))

    at_start = timed(lambda: page(), samples)  # while the services still do their start-up work
    settled = settle(stack)
    first = timed(lambda: page(), samples)
    walk, token, depth = [], "", 0
    while depth < 1000:
        t0 = time.perf_counter()
        response = page(token)
        walk.append(1000 * (time.perf_counter() - t0))
        depth += 1
        token = response.next_page_token
        if not token:
            break
    deep = timed(lambda: page(token), samples) if token else []

    archived_names = []
    cutoff = now - RETENTION_DAYS * DAY
    rng = random.Random(17)
    plan = _plan(n, now) if n else []
    while plan and len(archived_names) < samples:
        i = rng.randrange(n)
        if plan[i] + RUN_SECONDS < cutoff:
            archived_names.append((tenant_of(i, tenants, heavy_share), f"job-{i:07d}"))
    gets = []
    for tenant, name in archived_names:
        t0 = time.perf_counter()
        job = admin.get(name, tenant=tenant)
        gets.append(1000 * (time.perf_counter() - t0))
        assert job.name == name and job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)

    tuner = {}
    if studies:
        import grpc  # noqa: PLC0415

        from cloudml.tuner.v1 import tuner_service_pb2 as tpb  # noqa: PLC0415
        from cloudml.tuner.v1 import tuner_service_pb2_grpc as tpb_grpc  # noqa: PLC0415

        channel = grpc.insecure_channel(stack.harness.alive("tuner").poll_address())
        stub = tpb_grpc.TunerServiceStub(channel)
        span = (TRIALS_PER_STUDY + 1) * RUN_SECONDS / 2
        splan = _plan(studies, now - span)
        old = [s for s in (rng.randrange(studies) for _ in range(samples * 3)) if splan[s] + span < cutoff][:samples]

        def call(method, request):
            return getattr(stub, method)(request, metadata=admin.md, timeout=20)

        get_study = []
        list_trials = []
        for s in old:
            tenant, name = tenant_of(s, tenants, heavy_share), f"study-{s:06d}"
            t0 = time.perf_counter()
            assert call("GetStudy", tpb.GetStudyRequest(tenant=tenant, name=name)).study.name == name
            get_study.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            assert len(call("ListTrials", tpb.ListTrialsRequest(tenant=tenant, study=name)).trials) == TRIALS_PER_STUDY
            list_trials.append(1000 * (time.perf_counter() - t0))
        list_studies = timed(lambda: call("ListStudies", tpb.ListStudiesRequest(tenant=heavy, page_size=100)), samples)
        channel.close()
        tuner = {"get_study_archived_p50_ms": round(pct(get_study, 0.5), 2),
                 "list_trials_archived_p50_ms": round(pct(list_trials, 0.5), 2),
                 "list_studies_first_page_p50_ms": round(pct(list_studies, 0.5), 2)}

    models = measure_versions(stack, admin, versions, tenants, heavy_share, now, samples) if versions else {}

    client = stack.new_tenant("lat")
    uri = client.upload(package)
    start_latency(client, uri, "warm-up")
    latency = [1000 * start_latency(client, uri, f"start-{i}") for i in range(starts)]
    time.sleep(2)  # let allocations from the calls settle before reading RSS
    rss = {service: process_memory(stack.harness.alive(service).process.pid)["rss_mb"] for service in SERVICES}
    etcd_process = stack.etcd.process
    rss["etcd"] = process_memory(etcd_process.process.pid)["rss_mb"] if etcd_process else None
    return {
        "rss_mb": rss,
        "etcd_db_bytes": etcd_db_size(stack),
        "list_first_page_at_start_p50_ms": round(pct(at_start, 0.5), 2),
        "settled_seconds": settled,
        "list_first_page_p50_ms": round(pct(first, 0.5), 2),
        "list_pages_walked": len(walk),
        "list_walk_p50_ms": round(pct(walk, 0.5), 2) if walk else None,
        "list_page_1000_deep_p50_ms": round(pct(deep, 0.5), 2) if deep else None,
        "get_archived_p50_ms": round(pct(gets, 0.5), 2) if gets else None,
        "get_archived_p99_ms": round(pct(gets, 0.99), 2) if gets else None,
        "submit_to_first_replica_p50_ms": round(pct(latency, 0.5), 1),
        "submit_to_first_replica_p99_ms": round(pct(latency, 0.99), 1),
        **tuner,
        **models,
    }


def platform(workdir: str, envs: str, package: str, n: int, args, now: float) -> dict:
    stack = JobsStack(workdir, envs_dir=envs, lease_ttl=10).start()
    try:
        studies = args.trials // TRIALS_PER_STUDY if n else 0
        generated = generate(stack, n, args.tenants, args.heavy_share, now) if n else {}
        if studies:
            generated.update(generate_studies(stack, studies, args.tenants, args.heavy_share, now))
        versions = args.versions if n else 0
        if versions:
            generated.update(generate_versions(stack, versions, args.tenants, args.heavy_share, now))
        db_before = etcd_db_size(stack)
        stack.start_jobs(wait=True)
        for service in ("tuner", "models", "gateway"):
            stack.harness.start_service(service, wait=60) if service != "gateway" else stack.harness.start_gateway()
        figures = measure(stack, package, n, args.tenants, args.heavy_share, now, args.samples, args.starts, studies,
                          versions)
        return {"jobs": n, "generated": generated, "etcd_db_bytes_before_services": db_before, **figures}
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="finished jobs in the history")
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=50_000, help="finished trials, in studies of 20")
    parser.add_argument("--versions", type=int, default=10_000, help="ended model versions in the history")
    parser.add_argument("--heavy-share", type=float, default=0.15, help="tenant-0000's share of the jobs")
    parser.add_argument("--samples", type=int, default=100, help="calls per latency figure")
    parser.add_argument("--starts", type=int, default=20, help="submit -> first replica samples")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="cloudml-bench-history-")
    now = time.time()
    try:
        package = build_packages(os.path.join(workdir, "packages"))["testing"]
        envs = os.path.join(workdir, "envs")
        empty = platform(os.path.join(workdir, "empty"), envs, package, 0, args, now)
        full = platform(os.path.join(workdir, "history"), envs, package, args.jobs, args, now)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {"empty": empty, "history": full}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    g = full["generated"]
    print(f"history: {args.jobs:,} finished jobs over {args.tenants} tenants: {g['archived']:,} archived, "
          f"{g['in_etcd']:,} in etcd (last {RETENTION_DAYS} days); jobs generated in {g['total_seconds']} s; "
          f"jobs' archive {g['archive_bytes'] / 2**20:.0f} MiB on disk; studies of {TRIALS_PER_STUDY} trials: "
          f"{g.get('studies_archived', 0):,} archived, {g.get('studies_in_etcd', 0):,} in etcd; "
          f"model versions: {g.get('versions_archived', 0):,} archived, {g.get('versions_in_etcd', 0):,} in etcd "
          f"({g.get('models', 0):,} models)")
    rows = [("RSS " + s + " (MB)", empty["rss_mb"][s], full["rss_mb"][s]) for s in (*SERVICES, "etcd")]
    rows += [("etcd db size (MB)", round(empty["etcd_db_bytes"] / 2**20, 1), round(full["etcd_db_bytes"] / 2**20, 1)),
             ("ListJobs first page p50, right after start (ms)", empty["list_first_page_at_start_p50_ms"],
              full["list_first_page_at_start_p50_ms"]),
             ("seconds until the services were idle", empty["settled_seconds"], full["settled_seconds"]),
             ("ListJobs first page p50 (ms)", empty["list_first_page_p50_ms"], full["list_first_page_p50_ms"]),
             ("ListJobs p50 walking 1,000 pages of 100 (ms)", empty["list_walk_p50_ms"], full["list_walk_p50_ms"]),
             ("ListJobs page 1,000 deep p50 (ms)", empty["list_page_1000_deep_p50_ms"],
              full["list_page_1000_deep_p50_ms"]),
             ("GetJob archived p50 / p99 (ms)", "-", f"{full['get_archived_p50_ms']} / {full['get_archived_p99_ms']}"),
             ("GetStudy archived p50 (ms)", "-", full.get("get_study_archived_p50_ms")),
             ("ListTrials of an archived study (20) p50 (ms)", "-", full.get("list_trials_archived_p50_ms")),
             ("ListStudies first page p50 (ms)", "-", full.get("list_studies_first_page_p50_ms")),
             ("GetVersion archived p50 / p99 (ms)", "-",
              f"{full.get('get_version_archived_p50_ms')} / {full.get('get_version_archived_p99_ms')}"),
             (f"ListVersions first page ({full.get('list_versions_model_versions')} versions) p50 (ms)", "-",
              full.get("list_versions_first_page_p50_ms")),
             ("submit -> first replica p50 / p99 (ms)",
              f"{empty['submit_to_first_replica_p50_ms']} / {empty['submit_to_first_replica_p99_ms']}",
              f"{full['submit_to_first_replica_p50_ms']} / {full['submit_to_first_replica_p99_ms']}")]
    print(f"{'figure':48} {'empty':>14} {'history':>16}")
    for name, a, b in rows:
        print(f"{name:48} {str(a):>14} {str(b):>16}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
