"""A service killed with SIGKILL (its registry entry outlives it until its
lease expires) and replaced by a new instance on a new port: callers through
the gateway (Python proxy and native data plane alike) and through a
`Directory` of their own use the new instance within a second of it serving.

The windows are printed (run with -s to see them)."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc
from deploy.local.service_process import ServiceProcess
from deploy.local.stack import AuthGatewayStack, auth_flags
from services.common.registry import Directory
from tests.integration.restart_probe import Probe, wait_health

MAX_WINDOW = 1.0
# How long callers keep calling after the replacement serves (a failure after
# the first success counts too).
OBSERVE = float(os.environ.get("CLOUDML_TEST_RESTART_OBSERVE", "3"))


class LoopThread:
    """An asyncio loop in a thread, for async callers driven from sync probes."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def stack(tmp_path, etcd_server):
    stack = AuthGatewayStack(str(tmp_path), etcd_server.endpoint).start()
    yield stack
    stack.stop()


def start_second_auth(stack: AuthGatewayStack) -> ServiceProcess:
    """Another auth process with the first one's flags and files of its own (port 0: a new port)."""
    return stack.start_service("auth", "auth2", extra=auth_flags(stack.path("bootstrap.json"), stack.kek_file),
                               wait=None)


def test_killed_auth_replaced_on_new_port_is_used_within_a_second(stack):
    admin_key, admin_secret = stack.admin
    gw_channel = grpc.insecure_channel(stack.gateway.address)
    gw = pb_grpc.AuthServiceStub(gw_channel)
    token = gw.IssueToken(pb.IssueTokenRequest(access_key_id=admin_key, secret_key=admin_secret), timeout=5).token
    md = (("authorization", f"Bearer {token}"),)

    # An in-process caller with a Directory of its own, as every service has.
    loop = LoopThread()

    async def open_directory():
        etcd = await stack.etcd.connect()
        directory = Directory(etcd).start()
        await directory.wait_synced(5)
        return etcd, directory

    etcd, directory = loop.run(open_directory())

    async def issue_via_directory(timeout: float):
        stub = pb_grpc.AuthServiceStub(directory.channel("auth"))
        return await stub.IssueToken(pb.IssueTokenRequest(access_key_id=admin_key, secret_key=admin_secret),
                                     timeout=timeout)

    def via_directory(timeout: float):
        try:
            return loop.run(issue_via_directory(timeout))
        except Exception as err:  # errors.Unavailable (no instance known) counts as UNAVAILABLE
            if isinstance(err, grpc.RpcError):
                raise
            raise _Unavailable(str(err)) from err

    probes = [
        Probe("gateway IssueToken (public)",
              lambda t: gw.IssueToken(pb.IssueTokenRequest(access_key_id=admin_key, secret_key=admin_secret),
                                      timeout=t)),
        Probe("gateway WhoAmI (token)", lambda t: gw.WhoAmI(pb.WhoAmIRequest(), metadata=md, timeout=t)),
        Probe("directory IssueToken", via_directory),
    ]
    second = None
    try:
        for probe in probes:
            probe.start()
        began = time.monotonic()
        for probe in probes:
            probe.wait_ok(began)

        stack.auth.kill()  # SIGKILL: the lease is not revoked, the entry stays until it expires
        killed_at = time.monotonic()
        second = start_second_auth(stack)
        serving_at = wait_health(second.poll_address)
        assert second.address != stack.auth.address
        for probe in probes:
            probe.wait_ok(serving_at)
        time.sleep(OBSERVE)  # keep calling: a failure after the first success also counts
    finally:
        for probe in probes:
            probe.stop()
        loop.run(directory.close())
        loop.run(etcd.close())
        loop.close()
        gw_channel.close()
        if second is not None:
            second.stop()

    print(f"\nauth killed -> replacement SERVING after {serving_at - killed_at:.2f} s")
    windows = {}
    for probe in probes:
        windows[probe.name] = probe.window(serving_at)
        print(f"  {probe.name}: UNAVAILABLE for {windows[probe.name]:.3f} s after SERVING "
              f"(calls since the kill: {probe.summary(killed_at)})")
    assert all(w < MAX_WINDOW for w in windows.values()), windows
    for probe in probes:
        assert not probe.failures_since(serving_at + MAX_WINDOW), probe.name


class _Unavailable(grpc.RpcError):
    def __init__(self, message: str):
        super().__init__(message)

    def code(self):
        return grpc.StatusCode.UNAVAILABLE


def test_clean_exit_revokes_the_lease_so_the_entry_goes_at_once(stack):
    """SIGTERM: the registry entry disappears before the server drains (callers
    move on at once), and nothing is left once the process has exited."""
    loop = LoopThread()

    async def entries():
        etcd = await stack.etcd.connect()
        try:
            kvs, _, _ = await etcd.get_prefix("/cloudml/registry/auth/")
            return kvs
        finally:
            await etcd.close()

    # An open stream keeps the server draining (up to its 5 s grace) after SIGTERM.
    channel = grpc.insecure_channel(stack.auth.address)
    stream = pb_grpc.AuthServiceStub(channel).WatchVerificationKeys(pb.WatchVerificationKeysRequest(), timeout=30)
    try:
        next(stream)
        before = loop.run(entries())
        assert [kv for kv in before if stack.auth.address.encode() in kv.value]
        stack.auth.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while [kv for kv in loop.run(entries()) if stack.auth.address.encode() in kv.value]:
            assert time.monotonic() < deadline, "registry entry still there 3 s after SIGTERM"
            time.sleep(0.02)
        assert stack.auth.process.poll() is None  # gone from the registry while still draining
        stack.auth.process.wait(15)
        assert stack.auth.process.returncode == 0
        after = loop.run(entries())
        assert not [kv for kv in after if stack.auth.address.encode() in kv.value]
    finally:
        stream.cancel()
        channel.close()
        loop.close()

