"""The native data plane (gateway mode) does not grow with replica churn: its
channels to replicas that no decision uses any more are dropped.

The cheapest faithful driver is the data plane's own protocol: a stand-in
control plane serves Dataplane.Attach and the forwarded Predict calls, and
for each of 10,000 replica endpoint changes it streams a new generation and
answers with a RouteDecision naming a new replica address. The replica is
one stand-in server bound to every loopback address, so each
`127.0.x.y:port` is a distinct address (its own channel and connection in
the data plane) that really answers. Each change is followed by a call on
the data plane's fast path to the new address. The real gateway would add
only etcd and its Python routing to each change (it has its own tests:
test_gateway_dataplane.py); what grows or not is this process.

The data plane's memory (VmRSS) and open file descriptors must stay flat
from the first thousand changes to the ten-thousandth."""
from __future__ import annotations

import os
import subprocess
import time

import grpc
import pytest

from cloudml.tfs.tensorflow_serving.apis import prediction_service_pb2_grpc
from services.common.native import binary_path
from tests.integration.batching_replica import BatchingReplica, request, tag_of
from tests.integration.stand_in_control_plane import ControlPlane
from tests.integration.proc_status import status_kb

CHANGES = 10_000
SECRET = "backends-test-secret"


@pytest.fixture
def plane():
    assert os.access(binary_path(), os.X_OK), "the native data plane is not built: run scripts/build_native.sh"
    replica = BatchingReplica(host="0.0.0.0")
    control = ControlPlane()
    process = subprocess.Popen(
        [binary_path(), "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{control.port}", "--spin-us", "0"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, CLOUDML_DATAPLANE_SECRET=SECRET))
    port = int(process.stdout.readline())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"replica": replica, "control": control, "process": process,
           "stub": prediction_service_pb2_grpc.PredictionServiceStub(channel)}
    channel.close()
    process.kill()
    process.wait()
    control.close()
    replica.close()


def test_data_plane_memory_is_flat_over_10000_replica_endpoint_changes(plane):
    replica, control, stub, pid = plane["replica"], plane["control"], plane["stub"], plane["process"].pid
    samples = {}
    start = time.monotonic()
    for i in range(CHANGES):
        address = f"127.0.{i // 250 + 1}.{i % 250 + 1}:{replica.port}"
        control.change(address)
        # Until the call reaches the replica on the fast path: the first one
        # (or any sent before the data plane saw the new generation) goes
        # through the control plane and brings its decision back.
        for _ in range(50):
            if tag_of(stub.Predict(request(f"c{i}"), timeout=5)) == f"c{i}":
                break
        else:
            raise AssertionError(f"change {i}: the data plane never took the fast path to {address}")
        if (i + 1) % 1000 == 0:
            samples[i + 1] = (status_kb(pid, "VmRSS"), len(os.listdir(f"/proc/{pid}/fd")))
    elapsed = time.monotonic() - start
    rss = {n: s[0] for n, s in samples.items()}
    fds = {n: s[1] for n, s in samples.items()}
    print(f"{CHANGES} changes in {elapsed:.1f} s; VmRSS kB {rss}; fds {fds}")
    # Each live channel holds a connection (a descriptor) and its state; the
    # old data plane kept all of them (~10,000 fds, RSS growing steadily).
    assert max(fds.values()) - fds[1000] <= 10, fds
    assert rss[CHANGES] - rss[1000] < 4 * 1024, rss  # kB
