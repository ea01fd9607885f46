"""Batcher.run_group: the replica's side of the gateway's coalesced calls,
with a plain numpy runner (the replica's TensorFlow runs are covered by
tests/e2e/test_gateway_coalescing.py)."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.models.model_server import status
from services.models.model_server.batching import Batcher, BatchingConfig, TFExecutor, batch_key


class Runner:
    """y = 2x + 1, recording each call's rows and thread."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def __call__(self, arrays):
        self.calls.append((arrays[0].shape[0], threading.get_ident()))
        if self.fail:
            raise ValueError("the model failed")
        return [arrays[0] * 2 + 1]


def rows(*values, width=1):
    return [np.array([[v] * width for v in values], dtype=np.float32)]


def member(runner, arrays, signature="serving_default"):
    return batch_key(signature, ("y",), arrays), runner, arrays


def run(batcher_config: dict, make_members, inline_ms: float = 0.0):
    async def go():
        executor = TFExecutor(2)
        try:
            batcher = Batcher(BatchingConfig(enabled=True, **batcher_config), executor,
                              inline_group_max_seconds=inline_ms / 1e3)
            return await batcher.run_group(make_members())
        finally:
            executor.shutdown()
    return asyncio.run(go())


def test_members_get_their_own_rows_back_in_order():
    runner = Runner()
    inputs = [rows(1.0), rows(2.0, 3.0), rows(4.0), rows(5.0, width=2), rows(*range(9))]
    results = run({"max_batch_size": 8}, lambda: [member(runner, a) for a in inputs])
    for arrays, outputs in zip(inputs, results):
        np.testing.assert_array_equal(outputs[0], arrays[0] * 2 + 1)
    batch_rows = sorted(n for n, _ in runner.calls)
    # widths 1 and 2 are two batch keys; the 9-row member is over max_batch_size and runs alone
    assert batch_rows == [1, 4, 9], runner.calls


def test_a_key_over_max_batch_size_rows_is_split_into_batches():
    runner = Runner()
    inputs = [rows(float(i), float(i)) for i in range(5)]  # 10 rows, batches of at most 4
    results = run({"max_batch_size": 4}, lambda: [member(runner, a) for a in inputs])
    assert [n for n, _ in sorted(runner.calls)] == [2, 4, 4]
    assert [r[0][:, 0].tolist() for r in results] == [[2 * i + 1.0] * 2 for i in range(5)]


def test_batches_beyond_max_enqueued_batches_are_refused_with_unavailable():
    runner = Runner()
    inputs = [rows(1.0, width=w) for w in (1, 2, 3)]  # three keys, two batches may wait
    results = run({"max_enqueued_batches": 2}, lambda: [member(runner, a) for a in inputs])
    assert isinstance(results[2], status.ServingError)
    assert results[2].code.name == "UNAVAILABLE" and "queue" in results[2].message
    np.testing.assert_array_equal(results[0][0], inputs[0][0] * 2 + 1)
    np.testing.assert_array_equal(results[1][0], inputs[1][0] * 2 + 1)


def test_an_error_is_every_member_of_its_batch_s_error_only():
    bad, good = Runner(fail=True), Runner()
    results = run({}, lambda: [member(bad, rows(1.0), "a"), member(good, rows(2.0), "b"),
                               member(bad, rows(3.0), "a")])
    assert isinstance(results[0], ValueError) and isinstance(results[2], ValueError)
    np.testing.assert_array_equal(results[1][0], rows(5.0)[0])


@pytest.mark.parametrize("cost, inline_ms, on_loop", [
    (None, 2.0, False),   # never measured: a batch thread
    (0.0005, 2.0, True),  # cheap batches run on the event loop
    (0.005, 2.0, False),  # costly ones on a batch thread
    (0.0005, 0.0, False),  # inline off
])
def test_a_one_batch_group_runs_on_the_loop_only_while_its_batches_are_cheap(cost, inline_ms, on_loop):
    runner = Runner()
    if cost is not None:
        runner.batch_cost = cost
    loop_thread = []

    def members():
        loop_thread.append(threading.get_ident())
        return [member(runner, rows(1.0)), member(runner, rows(2.0))]

    results = run({}, members, inline_ms=inline_ms)
    assert [r[0].tolist() for r in results] == [[[3.0]], [[5.0]]]
    assert len(runner.calls) == 1
    assert (runner.calls[0][1] == loop_thread[0]) is on_loop
    assert runner.batch_cost is not None  # every batch run updates the measure


def test_a_group_of_several_batches_never_runs_on_the_loop():
    runner = Runner()
    runner.batch_cost = 0.0001
    loop_thread = []

    def members():
        loop_thread.append(threading.get_ident())
        return [member(runner, rows(1.0)), member(runner, rows(2.0, width=2))]

    run({}, members, inline_ms=2.0)
    assert len(runner.calls) == 2
    assert all(thread != loop_thread[0] for _, thread in runner.calls)
