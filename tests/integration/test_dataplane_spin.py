"""When the native data plane polls (services/common/native/dataplane/spin.h):
only while a replica's reply is due, never while it waits for a caller's next
call, and not through a reply that is long overdue.

The data plane runs in replica front mode with a polling cap of 1 s
(`--spin-us 1000000`, far above any use, so that polling at the wrong time
shows as hundreds of ms of CPU) before a stand-in replica whose "slow" calls
take 1 s. Its CPU is its threads' run time from /proc schedstat. The bounds
(50 ms of CPU over ~1 s) leave room for a loaded machine; a data plane that
polled after each event, as it did before, used ~1 s of CPU per second
alone, and still over 100 ms with the 2 cores shared 15 ways."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import grpc
import pytest

from cloudml.tfs.tensorflow_serving.apis import prediction_service_pb2_grpc
from deploy.local.service_process import thread_cpu_ns
from services.common.native import binary_path
from tests.integration.batching_replica import BatchingReplica, request, tag_of

CPU_BOUND = 0.05  # seconds of data-plane CPU over about a second of waiting


def cpu_seconds(pid: int) -> float:
    return thread_cpu_ns(pid) / 1e9


@pytest.fixture(scope="module")
def front():
    assert os.access(binary_path(), os.X_OK), "the native data plane is not built: run scripts/build_native.sh"
    replica = BatchingReplica(slow_seconds=1.0)
    process = subprocess.Popen(
        [binary_path(), "--listen", "127.0.0.1:0", "--front-for", replica.address, "--coalesce-max", "0",
         "--spin-us", "1000000"], stdout=subprocess.PIPE, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{int(process.stdout.readline())}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        for i in range(20):  # the data plane learns the replica's round trip
            assert tag_of(stub.Predict(request(f"warm-{i}"), timeout=10)) == f"warm-{i}"
        yield process.pid, stub
    finally:
        channel.close()
        process.terminate()
        process.wait(10)
        replica.close()


def test_no_polling_between_calls(front):
    pid, stub = front
    assert tag_of(stub.Predict(request("before-idle"), timeout=10)) == "before-idle"
    start = cpu_seconds(pid)
    time.sleep(1.0)
    used = cpu_seconds(pid) - start
    assert used < CPU_BOUND, f"the data plane used {used * 1e3:.0f} ms of CPU in 1 s with no call in flight"


def test_no_polling_through_an_overdue_reply(front):
    pid, stub = front
    result = {}
    slow = threading.Thread(target=lambda: result.update(tag=tag_of(stub.Predict(request("slow-1"), timeout=10))))
    start = cpu_seconds(pid)
    slow.start()
    slow.join(10)
    used = cpu_seconds(pid) - start
    assert result.get("tag") == "slow-1"
    assert used < CPU_BOUND, f"the data plane used {used * 1e3:.0f} ms of CPU waiting 1 s for a reply"
