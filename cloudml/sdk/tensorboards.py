"""`client.tensorboards`: managed TensorBoards (JobsService through the gateway).

    board = client.tensorboards.for_job("linear")          # the job's <output_path>/tensorboard; waits until it runs
    board = client.tensorboards.for_study("study1")        # every trial side by side, a run per trial
    board = client.tensorboards.create("loss", logdir="runs")  # a directory in your storage
    print(client.tensorboards.login_link(board))           # a one-time browser login link (about a minute)
    client.tensorboards.delete("loss")                     # its event files stay

A TensorBoard runs as a replica of the tenant (it holds CPU and memory of the
quota) and is reached only through the gateway's HTTP port, at
/tensorboard/<tenant>/<name>/, after logging in with a link. Unused for the
platform's idle time (default 4 h), it is deleted.
"""
from __future__ import annotations

import re
from typing import Iterable

from cloudml import errors
from cloudml.sdk.base import Group, wait_running
from cloudml.sdk.types import TensorBoard, Trial, params_text

#: how long `create`, `for_job` and `for_study` wait for a TensorBoard to run, by default
WAIT_TIMEOUT = 120.0


def _pb():
    from cloudml.jobs.v1 import tensorboards_pb2

    return tensorboards_pb2


def run_name(trial: Trial) -> str:
    """A trial's run name in a study's TensorBoard: `t<number> <param>=<value> ...`,
    within the platform's run-name rule."""
    text = f"t{trial.number} {params_text(trial.proto.params)}".strip()
    return re.sub(r"[^A-Za-z0-9_.=+ -]", "_", text)[:100]


class TensorBoards(Group):
    """TensorBoards of the caller's tenant (or, for an admin, of `tenant=`)."""

    _service = ("jobs_service_pb2_grpc", "JobsServiceStub")

    def _create(self, request, *, wait: bool, wait_timeout: float, reuse=None) -> TensorBoard:
        try:
            board = TensorBoard(self._rpc("CreateTensorBoard", request).tensorboard)
        except errors.AlreadyExists:
            if reuse is None:
                raise
            board = self.get(request.name, tenant=request.tenant)
            if not reuse(board):
                raise
        return self.wait(board, timeout=wait_timeout) if wait else board

    def create(self, name: str, *, logdir: str | None = None, job: str | None = None,
               runs: dict[str, str] | Iterable | None = None, tenant: str | None = None, wait: bool = True,
               wait_timeout: float = WAIT_TIMEOUT) -> TensorBoard:
        """Starts a TensorBoard named `name` on exactly one of: `logdir` (a
        directory in the tenant's storage, a path or file:// URI), `job` (the
        job's <output_path>/tensorboard) or `runs` (several side by side:
        {run name: job name}, or cloudml.jobs.v1.TensorBoardRun messages).

        With `wait=True` it returns once the TensorBoard runs (see `wait`).
        AlreadyExists when `name` is taken; the platform's refusals as
        `CloudMLError`s (InvalidArgument, ResourceExhausted over the quota).
        """
        pb = _pb()
        if isinstance(runs, dict):
            runs = [pb.TensorBoardRun(name=run, job=job_name) for run, job_name in runs.items()]
        request = pb.CreateTensorBoardRequest(tenant=tenant or "", name=name, logdir=logdir or "", job=job or "",
                                              runs=list(runs or ()))
        return self._create(request, wait=wait, wait_timeout=wait_timeout)

    def for_job(self, job: str, *, name: str | None = None, tenant: str | None = None, wait: bool = True,
                wait_timeout: float = WAIT_TIMEOUT) -> TensorBoard:
        """A TensorBoard on the job's event files, named `name` (default: the
        job's): started, or the existing one when a TensorBoard of that name
        is on that job already (AlreadyExists when it is on something else).
        `wait` as in `create`."""
        request = _pb().CreateTensorBoardRequest(tenant=tenant or "", name=name or job, job=job)
        return self._create(request, wait=wait, wait_timeout=wait_timeout, reuse=lambda board: board.job == job)

    def for_study(self, study: str, *, name: str | None = None, tenant: str | None = None, wait: bool = True,
                  wait_timeout: float = WAIT_TIMEOUT) -> TensorBoard:
        """A TensorBoard over the study's trials side by side, a run per
        trial that has a job, named by its parameters (`run_name`), named
        `name` (default: the study's): started, or the existing one of that
        name when it is over runs. FailedPrecondition when no trial has a job
        yet. `wait` as in `create`."""
        pb = _pb()
        trials = sorted((t for t in self._client.studies.trials(study, tenant=tenant) if t.job_name),
                        key=lambda t: t.number)
        if not trials:
            raise errors.FailedPrecondition(f"study {study} has no trial with a job yet", code="FAILED_PRECONDITION")
        request = pb.CreateTensorBoardRequest(tenant=tenant or "", name=name or study,
                                              runs=[pb.TensorBoardRun(name=run_name(t), job=t.job_name)
                                                    for t in trials])
        return self._create(request, wait=wait, wait_timeout=wait_timeout, reuse=lambda board: bool(board.runs))

    def get(self, name: str, *, tenant: str | None = None) -> TensorBoard:
        """The TensorBoard `name`. NotFound when there is none."""
        return TensorBoard(self._rpc("GetTensorBoard", _pb().GetTensorBoardRequest(tenant=tenant or "",
                                                                                   name=name)).tensorboard)

    def list(self, *, tenant: str | None = None) -> list[TensorBoard]:
        """Every TensorBoard of the tenant."""
        resp = self._rpc("ListTensorBoards", _pb().ListTensorBoardsRequest(tenant=tenant or ""))
        return [TensorBoard(b) for b in resp.tensorboards]

    def delete(self, name: str, *, tenant: str | None = None) -> None:
        """Stops and deletes the TensorBoard (its event files stay); it is
        DELETING for a moment afterwards."""
        self._rpc("DeleteTensorBoard", _pb().DeleteTensorBoardRequest(tenant=tenant or "", name=name))

    def wait(self, board: TensorBoard | str, *, tenant: str | None = None,
             timeout: float = WAIT_TIMEOUT) -> TensorBoard:
        """Polls the TensorBoard (a name or a `TensorBoard`) while it is
        STARTING and returns it once RUNNING. FailedPrecondition when it
        FAILED (its message says why) or still starts after `timeout` seconds."""
        if isinstance(board, str):
            board = self.get(board, tenant=tenant)
        return wait_running(board, lambda b: self.get(b.name, tenant=b.tenant), "tensorboard", timeout)

    def login_link(self, board: TensorBoard | str, *, tenant: str | None = None) -> str:
        """A one-time browser login link (valid about a minute; it works once)
        that opens the TensorBoard (a name or a `TensorBoard`) in a browser."""
        if isinstance(board, str):
            board = self.get(board, tenant=tenant)
        return self._client.login_link(board.path)
