"""`client.jobs`: train jobs (JobsService through the gateway).

    job = client.jobs.submit("linear", module="trainer.task", package="pkgs/trainer-1.0.tar.gz",
                             args=["--max_epochs", "10"], cpu="0.5", memory="1Gi")
    for line in client.jobs.logs("linear", follow=True):
        print(line)
    job = client.jobs.wait("linear")             # SUCCEEDED, FAILED or CANCELLED
    loss = client.jobs.metrics("linear").series("loss")[0].values
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from cloudml import errors, specs, units
from cloudml.sdk.types import Job, LogLine, Metrics


def _pb():
    from cloudml.jobs.v1 import jobs_service_pb2

    return jobs_service_pb2


def _state_value(state: str) -> int:
    pb = _pb()
    try:
        return pb.JobState.Value("JOB_STATE_" + state.upper().removeprefix("JOB_STATE_"))
    except ValueError:
        raise errors.SpecError(f"unknown job state {state!r}") from None


class Jobs:
    """Train jobs of the caller's tenant (or, for an admin, of `tenant=`)."""

    def __init__(self, client):
        self._client = client

    # --- plumbing ------------------------------------------------------------------

    @property
    def _stub(self):
        from cloudml.jobs.v1 import jobs_service_pb2_grpc

        return self._client.stub(jobs_service_pb2_grpc.JobsServiceStub)

    def _rpc(self, method: str, request):
        return self._client.call(getattr(self._stub, method), request)

    def _stream(self, method: str, request, timeout: float | None = None):
        import grpc

        try:
            yield from getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self._client.endpoint) from None

    # --- calls ---------------------------------------------------------------------

    def submit(self, name: str | None = None, module: str | None = None, package: str | None = None, *,
               args: Iterable[str] | str | None = None, cpu=None, memory=None, gpus=None, workers: int | None = None,
               ps: int | None = None, chief: bool = False, evaluator: int | None = None, env: dict | None = None,
               output_path: str | None = None, restart_policy: str | None = None, max_retries: int | None = None,
               timeout=None, priority: int | None = None, spec=None, seed: dict | None = None,
               tenant: str | None = None, validate_only: bool = False, wait: bool = False,
               wait_timeout: float | None = None, progress: Callable[[int, int], None] | None = None) -> Job:
        """Submits a train job and returns it (`job.created` False when the
        same spec had been submitted before: submitting is idempotent).

        `package` is the trainer package: a path on this machine (uploaded
        first into the tenant's storage, `progress(sent, total)` after each
        chunk) or a URI the platform can read. `cpu` ("0.5", "500m"),
        `memory` ("1Gi"), `gpus` are per replica; `workers`, `ps`,
        `evaluator` and `chief=True` make it distributed. `timeout` is the
        job's active deadline (seconds or "30m"). Instead of keywords, give
        `seed` (a dict with the seed's JSON field names, as for
        `cloudml jobs submit -f`; keywords override it) or a ready
        `spec` (cloudml.jobs.v1.TrainJobSpec). With `wait=True` it returns
        once the job ended (see `wait`).

        Raises SpecError (an InvalidArgument) for a malformed spec before
        anything is sent; the platform's refusals as `CloudMLError`s
        (ResourceExhausted over the quota, InvalidArgument, ...).
        """
        pb = _pb()
        if spec is None:
            try:
                given = specs.flags(
                    name=name, module=module, trainer_uri=package,
                    args=list(specs.split_args(args)) if args is not None else None,
                    cpu=units.parse_cpu(cpu) if cpu is not None else None,
                    memory=units.parse_memory(memory) if memory is not None else None,
                    gpus=units.parse_count(gpus, "gpus") if gpus is not None else None,
                    workers=workers, ps=ps, chief=chief, evaluator=evaluator, env=env, output_path=output_path,
                    restart_policy=restart_policy, max_retries=max_retries, timeout=timeout, priority=priority)
            except ValueError as err:
                raise errors.SpecError(str(err)) from None
            if seed is not None:
                specs.check_seed_fields(seed, "seed spec")
            name, spec = specs.build_spec(given, seed)
            local = package if package is not None else (seed or {}).get("trainer_uri")
            if local and "://" not in str(local):
                spec.trainer_uri = self._client.upload_package(spec.trainer_uri[len("file://"):], tenant=tenant,
                                                               progress=progress)
        elif not name:
            raise errors.SpecError("a job needs a name")
        resp = self._rpc("SubmitJob", pb.SubmitJobRequest(tenant=tenant or "", name=name, spec=spec,
                                                           validate_only=validate_only))
        job = Job(resp.job, created=resp.created)
        if wait and not validate_only:
            done = self.wait(job.name, tenant=job.tenant, timeout=wait_timeout)
            done.created = job.created
            return done
        return job

    def get(self, name: str, *, tenant: str | None = None) -> Job:
        """The job `name`, with its events and replicas. NotFound when there is none."""
        return Job(self._rpc("GetJob", _pb().GetJobRequest(tenant=tenant or "", name=name)).job)

    def list(self, *, states: Iterable[str] = (), tenant: str | None = None, page_size: int = 1000,
             limit: int = 0) -> Iterator[Job]:
        """Every job (of `states`, e.g. ["RUNNING"], when given), fetched page
        by page as the iterator advances; at most `limit` when non-zero."""
        pb = _pb()
        wanted = [_state_value(s) for s in states]
        token, count = "", 0
        while True:
            size = min(limit or page_size, page_size)
            page = self._rpc("ListJobs", pb.ListJobsRequest(tenant=tenant or "", states=wanted, page_token=token,
                                                            page_size=size))
            for job in page.jobs:
                yield Job(job)
                count += 1
                if limit and count >= limit:
                    return
            token = page.next_page_token
            if not token:
                return

    def cancel(self, name: str, *, tenant: str | None = None) -> Job:
        """Cancels the job (its replicas are stopped); returns it, CANCELLING
        or already ended."""
        return Job(self._rpc("CancelJob", _pb().CancelJobRequest(tenant=tenant or "", name=name)).job)

    def delete(self, name: str, *, tenant: str | None = None) -> None:
        """Deletes an ended job's record, logs and metrics (FailedPrecondition
        while it runs)."""
        self._rpc("DeleteJob", _pb().DeleteJobRequest(tenant=tenant or "", name=name))

    def logs(self, name: str, *, follow: bool = False, replicas: Iterable[str] = (), tail: int = 0,
             tenant: str | None = None, timeout: float | None = None) -> Iterator[LogLine]:
        """The job's log lines as an iterator. With `follow=True` it keeps
        yielding new lines until the job ends. `replicas` (e.g. ["worker-1"])
        narrows it; `tail` keeps the last N lines of each replica."""
        pb = _pb()
        try:
            wanted = [specs.parse_replica(r) if isinstance(r, str) else r for r in replicas]
        except ValueError as err:
            raise errors.SpecError(str(err)) from None
        request = pb.StreamLogsRequest(tenant=tenant or "", name=name, follow=follow, replicas=wanted,
                                       tail_lines=tail)
        for resp in self._stream("StreamLogs", request, timeout):
            for line in resp.lines:
                yield LogLine(line)

    def metrics(self, name: str, *, names: Iterable[str] = (), start_step: int = 0,
                tenant: str | None = None) -> Metrics:
        """The job's metric series (what trainers report with
        `cloudml.report`, and TensorBoard scalars): a list of
        `MetricSeries`, with `.series("loss")`."""
        resp = self._rpc("GetJobMetrics", _pb().GetJobMetricsRequest(
            tenant=tenant or "", name=name, metric_names=list(names), start_step=start_step))
        return Metrics(resp)

    def watch(self, name: str, *, tenant: str | None = None, timeout: float | None = None) -> Iterator[Job]:
        """The job now, then again at each change, until it ends (a stream)."""
        pb = _pb()
        for resp in self._stream("WatchJob", pb.WatchJobRequest(tenant=tenant or "", name=name), timeout):
            yield Job(resp.job)

    def wait(self, name: str, *, tenant: str | None = None, timeout: float | None = None) -> Job:
        """Blocks until the job ends and returns it (check `job.succeeded`).
        DeadlineExceeded after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                for job in self.watch(name, tenant=tenant, timeout=left):
                    if job.done:
                        return job
            except errors.DeadlineExceeded:
                pass
            job = self.get(name, tenant=tenant)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.DeadlineExceeded(f"job {name!r} is {job.state} after {timeout:.0f}s")
