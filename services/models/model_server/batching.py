"""Running TensorFlow off the event loop, and server-side batching.

`TFExecutor` is the thread pool every TensorFlow call runs on, so the event
loop only parses, validates and encodes.

`Batcher` joins concurrent Predict calls into one TensorFlow call, like TF
Serving's `BasicBatchScheduler`. Requests with the same batch key (signature,
requested outputs, and each input's dtype and dimensions after the 0th) go
into the key's open batch; their inputs are concatenated along dimension 0,
run once, and the outputs are split back by the rows each request sent.

- A batch closes when it is full (`max_batch_size` rows) or its
  `batch_timeout_micros` has passed; closed batches run on
  `num_batch_threads` workers. A batch whose timeout has passed while every
  worker is busy keeps taking requests until a worker is free (it could not
  run sooner anyway), so under load batches grow instead of queueing.
- At most `max_enqueued_batches` batches wait (open or closed, not counting
  running ones); a request that needs another is refused with UNAVAILABLE
  "The batch scheduling queue to which this task was submitted is full", as
  TF Serving does.
- A request that cannot be batched (a scalar input, inputs with different
  0th dimensions, more rows than `max_batch_size`) runs on its own.
- If a batched call returns an output whose 0th dimension is not the batch's
  row count, the outputs cannot be split: each request of that batch is run
  again on its own, so results never mix.
- An error of a batched call is every member's error (as in TF Serving).
- A group of calls the gateway coalesced (`run_group`, from PredictBatch)
  skips the queue's waiting: its members form closed batches at once and
  open batches stop waiting for more. When the group makes one batch and
  that signature's batches recently ran in under `inline_group_max_seconds`
  (2 ms by default), the batch runs on the event loop itself (a thread
  hand-off and back costs two wake-ups, more than such a batch). On the MLP
  at concurrency 32 through the gateway, in alternating rounds: 7,405 rps
  inline against 6,584 on a batch thread (measured when the data plane sent
  one group at a time; it now sends a group once it is full or has waited
  the batch timeout, so several may arrive together). Groups of several
  batches run side by side on the batch threads.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from services.models.model_server import status

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[np.ndarray]], list]

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"


@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's BatchingParameters (zero or unset takes the default)."""

    enabled: bool = False
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 0  # 0: one per CPU

    @classmethod
    def from_dict(cls, raw: dict) -> "BatchingConfig":
        known = {"enabled", "max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown batching settings: {', '.join(sorted(unknown))}")
        defaults = cls()
        values = {}
        for name in known - {"enabled"}:
            value = int(raw.get(name) or 0)
            if value < 0:
                raise ValueError(f"batching {name} must not be negative")
            values[name] = value or getattr(defaults, name)
        return cls(enabled=bool(raw.get("enabled", False)), **values)

    @property
    def threads(self) -> int:
        return self.num_batch_threads or os.cpu_count() or 1


class TFExecutor:
    """The threads TensorFlow calls run on."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tf")

    def submit(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def batch_rows(arrays: Sequence[np.ndarray]) -> int | None:
    """The request's row count, or None when it cannot join a batch."""
    rows = None
    for arr in arrays:
        if arr.ndim == 0:
            return None
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            return None
    return rows


def batch_key(signature: str, fetches: tuple[str, ...], arrays: Sequence[np.ndarray]) -> tuple:
    return (signature, fetches, tuple((a.dtype.str, a.shape[1:]) for a in arrays))


@dataclass
class _Task:
    arrays: Sequence[np.ndarray]
    rows: int
    future: asyncio.Future


@dataclass
class _Batch:
    key: tuple
    runner: Runner
    tasks: list[_Task] = field(default_factory=list)
    rows: int = 0
    expired: bool = False
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(self, config: BatchingConfig, executor: TFExecutor, metrics=None,
                 inline_group_max_seconds: float = 0.0):
        self.config = config
        self.inline_group_max_seconds = inline_group_max_seconds
        self.executor = executor
        self.metrics = metrics
        self._open: dict[tuple, _Batch] = {}
        self._ready: collections.deque[_Batch] = collections.deque()
        self._free = config.threads
        self._pump_scheduled = False
        self._timeout = config.batch_timeout_micros / 1e6

    async def run(self, key: tuple, runner: Runner, arrays: Sequence[np.ndarray]) -> list:
        rows = batch_rows(arrays)
        if rows is None or rows == 0 or rows > self.config.max_batch_size:
            return await self.executor.run(runner, arrays)
        loop = asyncio.get_running_loop()
        task = _Task(arrays, rows, loop.create_future())
        self._enqueue(key, runner, task, loop)
        return await task.future

    async def run_group(self, members: Sequence[tuple[tuple, Runner, Sequence[np.ndarray]]]) -> list:
        """Runs a group of calls that already waited together (the gateway's
        coalesced Predict calls): each member is `(key, runner, arrays)`.
        Members with the same key go into closed batches of at most
        `max_batch_size` rows, which run as soon as a batch thread is free,
        without waiting out the batch timeout (its calls already waited up
        to it in the data plane, and no more of them are coming); open
        batches stop waiting too, since the data plane sends a group only
        while calls queue. Returns each member's outputs or its
        exception, in order; a member that needs a batch beyond
        `max_enqueued_batches` gets UNAVAILABLE, as `run` does."""
        loop = asyncio.get_running_loop()
        results: list = [None] * len(members)
        futures: list[tuple[int, asyncio.Future]] = []
        batches: dict[tuple, _Batch] = {}
        for i, (key, runner, arrays) in enumerate(members):
            rows = batch_rows(arrays)
            if rows is None or rows == 0 or rows > self.config.max_batch_size:
                futures.append((i, self.executor.submit(runner, arrays)))
                continue
            batch = batches.get(key)
            if batch is not None and batch.rows + rows > self.config.max_batch_size:
                self._ready.append(batch)
                batch = None
            if batch is None:
                if len(self._open) + len(self._ready) + len(batches) >= self.config.max_enqueued_batches:
                    results[i] = status.unavailable(QUEUE_FULL)
                    continue
                batch = batches[key] = _Batch(key, runner)
            task = _Task(arrays, rows, loop.create_future())
            batch.tasks.append(task)
            batch.rows += rows
            futures.append((i, task.future))
        inline = len(batches) == 1 and not self._ready  # else the batch threads run them side by side
        for batch in batches.values():
            cost = getattr(batch.runner, "batch_cost", None)
            if inline and cost is not None and cost < self.inline_group_max_seconds:
                self._deliver(batch, self._outcomes(batch))
            else:
                self._ready.append(batch)
        for batch in self._open.values():  # calls waiting here need not wait out the timeout either
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
            batch.expired = True
        if self._ready or self._open:
            self._schedule_pump(loop)
        outcomes = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        for (i, _), outcome in zip(futures, outcomes):
            results[i] = outcome
        return results

    # --- queueing (event loop thread only) ---------------------------------------------

    def _enqueue(self, key, runner, task: _Task, loop) -> None:
        batch = self._open.get(key)
        if batch is not None and batch.rows + task.rows > self.config.max_batch_size:
            self._close(batch)
            batch = None
        if batch is None:
            if len(self._open) + len(self._ready) >= self.config.max_enqueued_batches:
                if self._ready:
                    self._schedule_pump(loop)
                raise status.unavailable(QUEUE_FULL)
            batch = _Batch(key, runner)
            self._open[key] = batch
            if self._timeout > 0:
                batch.timer = loop.call_later(self._timeout, self._expire, batch)
            else:
                batch.expired = True
        batch.tasks.append(task)
        batch.rows += task.rows
        if batch.rows >= self.config.max_batch_size:
            self._close(batch)
        if batch.expired or self._ready:
            self._schedule_pump(loop)

    def _close(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        self._ready.append(batch)

    def _expire(self, batch: _Batch) -> None:
        batch.timer = None
        batch.expired = True
        self._pump()

    def _schedule_pump(self, loop) -> None:
        # Deferred to the end of this loop iteration, so requests that arrived
        # together can still join the batch.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        while self._free > 0:
            if self._ready:
                batch = self._ready.popleft()
            else:
                batch = next((b for b in self._open.values() if b.expired), None)
                if batch is None:
                    return
                del self._open[batch.key]
            self._free -= 1
            future = self.executor.submit(self._execute, batch)
            future.add_done_callback(lambda f, b=batch: self._finished(b, f))

    def _finished(self, batch: _Batch, future: asyncio.Future) -> None:
        self._free += 1
        try:
            results = future.result()
        except BaseException as err:  # noqa: BLE001 - every member gets the batch's error
            results = [err] * len(batch.tasks)
        self._deliver(batch, results)
        self._pump()

    def _outcomes(self, batch: _Batch) -> list:
        """Runs `batch` on this thread: each member's outputs, or the batch's error."""
        try:
            return self._execute(batch)
        except Exception as err:  # noqa: BLE001 - every member gets the batch's error
            return [err] * len(batch.tasks)

    @staticmethod
    def _deliver(batch: _Batch, results: list) -> None:
        for task, result in zip(batch.tasks, results):
            if task.future.done():
                continue
            if isinstance(result, BaseException):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)

    # --- running (worker thread) ------------------------------------------------------

    def _execute(self, batch: _Batch) -> list:
        tasks = batch.tasks
        if self.metrics is not None:
            self.metrics.batches.inc()
            self.metrics.batch_requests.observe(len(tasks))
            self.metrics.batch_rows.observe(batch.rows)
        if len(tasks) == 1:
            return [timed(batch.runner, tasks[0].arrays, "batch_cost")]
        inputs = [np.concatenate([t.arrays[i] for t in tasks]) for i in range(len(tasks[0].arrays))]
        outputs = timed(batch.runner, inputs, "batch_cost")
        log.debug("ran a batch of %d requests (%d rows) in one call", len(tasks), batch.rows)
        if not all(o.ndim >= 1 and o.shape[0] == batch.rows for o in outputs):
            log.warning("batched outputs do not have the batch's %d rows; running its %d requests one by one",
                        batch.rows, len(tasks))
            results = []
            for task in tasks:
                try:
                    results.append(batch.runner(task.arrays))
                except Exception as err:  # noqa: BLE001
                    results.append(err)
            return results
        results = []
        start = 0
        for task in tasks:
            end = start + task.rows
            results.append([o[start:end] for o in outputs])
            start = end
        return results


def timed(runner: Runner, arrays: Sequence[np.ndarray], attribute: str = "cost") -> list:
    """Calls `runner` and keeps a moving average of its run time on it, as
    `attribute`: `cost` for single calls (ServedModel runs cheap ones on the
    event loop), `batch_cost` for batches (read by `Batcher.run_group`)."""
    start = time.perf_counter()
    try:
        return runner(arrays)
    finally:
        elapsed = time.perf_counter() - start
        cost = getattr(runner, attribute, None)
        setattr(runner, attribute, elapsed if cost is None else 0.8 * cost + 0.2 * elapsed)
