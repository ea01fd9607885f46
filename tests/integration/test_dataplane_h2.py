"""The native data plane's HTTP/2 front (services/common/native/dataplane/h2front.h):
the gateway's public port, where a model call whose route is cached goes
straight to its replica and everything else on, frame by frame, to the
process's own gRPC side.

Driven by the stand-in control plane (Attach, decisions) and a stand-in
replica, as test_dataplane_backends.py; the data plane is the real binary.
What an attacker and a user would look at:
- a caller's hop headers (x-cloudml-*, its token) never reach a replica on
  the fast path; its own metadata does, and the replica's trailers come back;
- a replica that cannot be reached costs the caller nothing but the slow
  path (the control plane answers), and its cached route is dropped;
- a long bidirectional stream to a platform API is relayed whole, in order,
  with the relay's memory bounded by HTTP/2 flow control, not by the stream;
- a caller that floods a model call larger than the limit is refused
  (RESOURCE_EXHAUSTED), never buffered without bound.
"""
from __future__ import annotations

import os
import subprocess
import threading

import grpc
import pytest

from cloudml.tfs.tensorflow_serving.apis import prediction_service_pb2_grpc
from services.common.native import binary_path
from tests.integration.batching_replica import BatchingReplica, request, tag_of
from tests.integration.stand_in_control_plane import ControlPlane
from tests.integration.proc_status import status_kb

SECRET = "h2-test-secret"
ECHO = "/test.Echo/Chat"
MAX_REQUEST = 1 << 20


async def _chat(requests, context):
    async for message in requests:
        yield message


@pytest.fixture
def plane():
    assert os.access(binary_path(), os.X_OK), "the native data plane is not built: run scripts/build_native.sh"
    replica = BatchingReplica()
    control = ControlPlane(extra={ECHO: grpc.stream_stream_rpc_method_handler(_chat)})
    control.change(replica.address)
    process = subprocess.Popen(
        [binary_path(), "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{control.port}",
         "--max-request-bytes", str(MAX_REQUEST)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, CLOUDML_DATAPLANE_SECRET=SECRET))
    port = int(process.stdout.readline())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    yield {"replica": replica, "control": control, "process": process, "channel": channel,
           "stub": prediction_service_pb2_grpc.PredictionServiceStub(channel)}
    channel.close()
    process.kill()
    process.wait()
    control.close()
    replica.close()


def fast_call(stub, tag: str, metadata=(), timeout: float = 5):
    """Calls until the replica answers (the first call of a key goes through
    the control plane, which answers "control" and hands back the route)."""
    for _ in range(50):
        response, call = stub.Predict.with_call(request(tag), metadata=metadata, timeout=timeout)
        if tag_of(response) == tag:
            return response, call
    raise AssertionError("the data plane never took the fast path")


def test_hop_headers_and_the_token_stop_at_the_data_plane(plane):
    metadata = (("authorization", "Bearer secret-token"), ("x-cloudml-resolved-version", "9"),
                ("x-cloudml-dataplane", "guess"), ("x-cloudml-route-bin", b"forged"), ("x-tag", "mine"))
    _, call = fast_call(plane["stub"], "hdr", metadata)
    seen = plane["replica"].get("hdr").metadata
    assert seen["x-tag"] == "mine"
    assert not [k for k in seen if k.startswith("x-cloudml-") or k == "authorization"], seen
    assert seen["user-agent"].startswith("cloudml-dataplane-h2"), seen
    assert dict(call.trailing_metadata())["x-echo"] == "mine"


@pytest.mark.parametrize("timeout", [3.0, 600.0])
def test_the_replica_sees_the_time_left(plane, timeout):
    """What is left of the caller's deadline when the call leaves the data
    plane, in gRPC's 8-digit format (microseconds up to ~100 s, then milliseconds)."""
    fast_call(plane["stub"], f"left-{timeout:g}", timeout=timeout)
    left = plane["replica"].get(f"left-{timeout:g}").time_left
    # gRPC's server rounds what it receives up a little (600 s arrives as
    # ~601 s even sent exactly; test_gateway_deadlines.assert_remaining).
    assert timeout - 1.0 < left <= timeout * 1.02 + 0.05, left


def test_a_caller_flooding_headers_is_refused_and_its_connection_stays_good(plane):
    flood = tuple((f"x-h{i}", "v" * 1000) for i in range(100))  # 100 KB of metadata
    with pytest.raises(grpc.RpcError) as err:
        plane["stub"].Predict(request("flood"), metadata=flood, timeout=5)
    # Reset by the data plane as the headers come (the gRPC servers behind
    # it would answer RESOURCE_EXHAUSTED after reading them all).
    assert err.value.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in err.value.details(), err.value
    assert "flood" not in plane["replica"].tags()
    fast_call(plane["stub"], "after-flood")


def test_an_unreachable_replica_costs_the_caller_only_the_slow_path(plane):
    stub, control = plane["stub"], plane["control"]
    fast_call(stub, "before")
    with socket_that_refuses() as dead:
        control.change(dead)
        # Until the data plane has the new generation (its cache then empty).
        for i in range(100):
            if tag_of(stub.Predict(request(f"probe{i}"), timeout=5)) == "control":
                break
        else:
            raise AssertionError("the data plane never saw the new generation")
        # Each call is answered: by the control plane (its route to the dead
        # address cached), then again by it after the fast path found nobody.
        for i in range(5):
            assert tag_of(stub.Predict(request(f"dead{i}"), timeout=5)) == "control"
    assert not any(t.startswith("dead") for t in plane["replica"].tags())


class socket_that_refuses:
    """A loopback address where nothing listens (bound, never listening)."""

    def __enter__(self) -> str:
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


def test_a_long_stream_is_relayed_whole_with_bounded_memory(plane):
    chat = plane["channel"].stream_stream(ECHO, request_serializer=None, response_deserializer=None)
    messages = [bytes([i % 251]) * (256 << 10) for i in range(400)]  # 100 MiB each way
    rss_before = status_kb(plane["process"].pid, "VmRSS")
    peak = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], status_kb(plane["process"].pid, "VmRSS"))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        got = list(chat(iter(messages), timeout=120))
    finally:
        stop.set()
        sampler.join()
    assert got == messages
    print(f"data plane VmRSS {rss_before} kB before, {peak[0]} kB at most while 100 MiB went each way")
    # Held whole, the stream would cost 200 MiB (the relay once buffered all of
    # it: 110 MiB more at 50 MiB each way). Flow control keeps it to windows
    # of 1 MiB per stream each way on this side, the gRPC side's own, and what
    # malloc keeps of freed buffers (~20-30 MiB here).
    assert peak[0] - rss_before < 56 * 1024, (rss_before, peak[0])


def test_a_model_call_over_the_limit_is_refused(plane):
    big = request("big")
    big.inputs["pad"].dtype = 7
    big.inputs["pad"].string_val.append(b"x" * (4 << 20))
    with pytest.raises(grpc.RpcError) as err:
        plane["stub"].Predict(big, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "big" not in plane["replica"].tags()
    # The connection is still good.
    fast_call(plane["stub"], "after-big")
