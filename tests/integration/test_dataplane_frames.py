"""The native data plane's framed replica protocol (services/common/native/dataplane/frame.h):
a call whose route is cached goes to the replica's framed socket, when the
route names one, instead of its gRPC server.

The data plane is the real binary, in gateway mode behind the stand-in
control plane (whose RouteDecision names a gRPC stand-in replica and a
framed stand-in, tests/integration/frame_replica.py), and in replica front
mode. What a user and an attacker would look at:
- the answer, the status and its message (non-ASCII too) come back as over
  gRPC; the caller's time left and the routed version reach the replica;
- a caller that gives up cancels its call at the replica;
- a replica that sends anything but valid REPLY frames (it runs tenant
  code) loses its connection; the call is answered the slow way, and the
  data plane serves on;
- no framed socket, or --frames off: gRPC to the same replica.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

import grpc
import pytest

from cloudml.tfs.tensorflow_serving.apis import prediction_service_pb2_grpc
from services.common.native import binary_path
from tests.integration.batching_replica import BatchingReplica, request, tag_of
from tests.integration.frame_replica import FrameReplica
from tests.integration.proc_status import status_kb
from tests.integration.stand_in_control_plane import ControlPlane

SECRET = "frames-test-secret"


class Plane:
    """The data plane in gateway mode before a gRPC and a framed stand-in of one replica."""

    def __init__(self, tmp_path, *flags: str, frame: bool = True, batching: tuple[int, int] = (0, 0)):
        self.replica = BatchingReplica(slow_seconds=1.0)
        self.frames = FrameReplica(str(tmp_path / "r.frame.sock"), slow_seconds=1.0)
        self.control = ControlPlane()
        self.control.change(self.replica.address, self.frames.address if frame else "", *batching)
        self.process = subprocess.Popen(
            [binary_path(), "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{self.control.port}", *flags],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, CLOUDML_DATAPLANE_SECRET=SECRET))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{int(self.process.stdout.readline())}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def predict(self, tag: str, timeout: float = 10, **kwargs) -> str:
        return tag_of(self.stub.Predict(request(tag, **kwargs), timeout=timeout))

    def warm(self, **kwargs) -> None:
        """The first call of a spec goes to the control plane, which returns the decision to cache."""
        deadline = time.monotonic() + 10
        while self.predict("warm", **kwargs) == "control":
            assert time.monotonic() < deadline, "the data plane never cached the route"

    def close(self) -> None:
        self.channel.close()
        self.process.kill()
        self.process.wait()
        self.control.close()
        self.replica.close()
        self.frames.close()


@pytest.fixture
def plane(tmp_path):
    assert os.access(binary_path(), os.X_OK), "the native data plane is not built: run scripts/build_native.sh"
    p = Plane(tmp_path)
    p.warm()
    yield p
    p.close()


def test_a_cached_route_goes_to_the_framed_socket_with_deadline_and_version(plane):
    assert plane.predict("one", timeout=5) == "one"
    call = plane.frames.call("one")
    assert call.method == 0  # Predict
    assert call.resolved_version == 0  # the spec names the replica's model alone: it resolves it itself
    # (gRPC rounds the grpc-timeout it sends up, to at most ~1 % more)
    assert 4.0e6 < call.timeout_us <= 5.05e6, call.timeout_us
    # A spec the replica cannot resolve alike (another name for the model, as
    # a public model's <tenant>.<name> is): the routed version goes with it.
    plane.warm(model="alias")
    assert plane.predict("pinned", model="alias") == "pinned"
    assert plane.frames.call("pinned").resolved_version == 1
    assert plane.predict("no-deadline", timeout=None) == "no-deadline"
    assert plane.frames.call("no-deadline").timeout_us == 0
    assert "one" not in plane.replica.tags(), "the call also went over gRPC"


def test_status_and_message_come_back_as_over_grpc(plane):
    for code, message in ((grpc.StatusCode.INVALID_ARGUMENT, "bad input 'x' ünïcode 100%"),
                          (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(m, 7)"),
                          (grpc.StatusCode.RESOURCE_EXHAUSTED, "too large")):
        with pytest.raises(grpc.RpcError) as err:
            plane.predict(f"error:{code.value[0]}:{message}")
        assert err.value.code() == code and err.value.details() == message


def test_many_calls_interleave_on_one_connection(plane):
    results, errors = {}, []

    def one(i: int) -> None:
        tag = f"slow-{i}" if i % 4 == 0 else f"fast-{i}"
        try:
            results[tag] = plane.predict(tag)
        except grpc.RpcError as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert results == {tag: tag for tag in results} and len(results) == 40
    assert plane.frames.connections == 1, "each call should not open a connection of its own"


def test_a_caller_that_gives_up_cancels_its_call_at_the_replica(plane):
    with pytest.raises(grpc.RpcError) as err:
        plane.predict("slow-cancelled", timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = plane.frames.call("slow-cancelled")
    plane.frames.wait(lambda: call.id in plane.frames.cancels, "a CANCEL for the abandoned call")
    assert plane.predict("after-cancel") == "after-cancel"  # the late REPLY is ignored; the connection serves on


def test_a_reply_to_an_id_not_in_flight_is_ignored(plane):
    assert plane.predict("stray") == "stray"
    assert plane.predict("after-stray") == "after-stray"
    assert plane.frames.closed == 0


@pytest.mark.parametrize("what", ["huge", "kind", "code", "message", "short", "garbage"])
def test_a_replica_sending_bytes_that_are_not_a_reply_loses_its_connection(plane, what):
    before = status_kb(plane.process.pid, "VmRSS")
    # The call is answered the slow way (the stand-in control plane answers "control").
    assert plane.predict(f"hostile:{what}") == "control"
    plane.frames.wait(lambda: plane.frames.closed >= 1, "the data plane closes the hostile connection")
    assert status_kb(plane.process.pid, "VmRSS") - before < 16 << 10, "the data plane buffered what was claimed"
    plane.warm()
    assert plane.predict("after-hostile") == "after-hostile"
    assert plane.frames.call("after-hostile")
    assert plane.frames.connections == 2


def test_a_framed_socket_that_is_gone_means_grpc_to_the_same_replica(plane):
    plane.frames.close()  # its connections too
    plane.warm()  # (a call sent before the data plane saw the close is answered the slow way)
    assert plane.predict("via-grpc") == "via-grpc"
    assert "via-grpc" in plane.replica.tags()


def test_frames_off_and_a_route_without_a_framed_socket_use_grpc(tmp_path):
    for flags, frame in ((("--frames", "off"), True), ((), False)):
        p = Plane(tmp_path, *flags, frame=frame)
        try:
            p.warm()
            assert p.predict("grpc-only") == "grpc-only"
            assert "grpc-only" in p.replica.tags() and not p.frames.calls
        finally:
            p.close()


def test_a_replica_front_sends_every_model_call_to_its_framed_socket(tmp_path):
    replica = BatchingReplica(slow_seconds=1.0)
    frames = FrameReplica(str(tmp_path / "front.frame.sock"))
    process = subprocess.Popen(
        [binary_path(), "--listen", "127.0.0.1:0", "--front-for", replica.address, "--coalesce-max", "0",
         "--front-frame", frames.address], stdout=subprocess.PIPE, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{int(process.stdout.readline())}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        assert tag_of(stub.Predict(request("direct", version=3), timeout=5)) == "direct"
        call = frames.call("direct")
        assert call.resolved_version == 0, "a replica's front routes nothing: the replica checks the spec"
        assert not replica.tags()
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request("error:5:not here"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "not here"
    finally:
        channel.close()
        process.kill()
        process.wait()
        replica.close()
        frames.close()


# --- a batching replica: groups over the framed socket ------------------------------------------

@pytest.fixture
def batching(tmp_path):
    p = Plane(tmp_path, batching=(8, 100_000))  # coalesce_max 8, batch timeout 100 ms
    p.warm()
    yield p
    p.close()


def test_calls_behind_one_in_flight_go_as_one_group_each_with_its_own_status(batching):
    slow = batching.stub.Predict.future(request("slow-first"), timeout=10)
    batching.frames.call("slow-first")
    futures = {tag: batching.stub.Predict.future(request(tag), timeout=10)
               for tag in ("g-1", "g-2", "error:3:bad member", "g-3")}
    assert tag_of(futures["g-1"].result()) == "g-1" and tag_of(futures["g-3"].result()) == "g-3"
    with pytest.raises(grpc.RpcError) as err:
        futures["error:3:bad member"].result()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "bad member"
    got = [batching.frames.call(t) for t in ("g-1", "g-2", "error:3:bad member", "g-3")]
    assert {c.group for c in got} == {4} and len({c.id for c in got}) == 1, got
    assert got[0].method == 5 and got[0].resolved_version == 1
    assert tag_of(slow.result()) == "slow-first"
    assert not [t for t in batching.replica.tags() if not t.startswith("warm")]


def test_a_group_reply_without_a_result_per_member_is_an_internal_error_for_each(batching):
    slow = batching.stub.Predict.future(request("slow-first"), timeout=10)
    batching.frames.call("slow-first")
    futures = [batching.stub.Predict.future(request(tag), timeout=10) for tag in ("hostile:count", "bystander")]
    for f in futures:
        with pytest.raises(grpc.RpcError) as err:
            f.result()
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "malformed PredictBatch response"
    slow.result()
    assert batching.predict("after") == "after"  # the connection serves on


def test_a_group_whose_connection_breaks_is_answered_the_slow_way(batching):
    slow = batching.stub.Predict.future(request("slow-first"), timeout=10)
    batching.frames.call("slow-first")
    waiting = batching.stub.Predict.future(request("slow-member"), timeout=10)
    batching.frames.call("slow-member")  # the group is at the replica
    batching.frames.close()  # and the replica goes away
    # Both the lone call and the group's member: the control plane answers them.
    assert tag_of(slow.result()) == "control" and tag_of(waiting.result()) == "control"
