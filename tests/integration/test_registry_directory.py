"""`Directory` against the real etcd and real gRPC servers on loopback: which
instances of a service callers get, as registrations come and instances die."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import errors
from services.common.etcd import Etcd
from services.common.etcd_concurrency import Session
from services.common.registry import Directory, register, registry_key


async def serve(port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def put_record(etcd: Etcd, session: Session, service: str, instance: str, address: str, host: str) -> None:
    record = {"address": address, "host": host, "pid": 0, "started": time.time()}
    await etcd.put(registry_key(service, instance), json.dumps(record).encode(), lease=session.lease_id)


@pytest.fixture
async def env(etcd_endpoint):
    etcd = await Etcd.connect(etcd_endpoint)
    session = await Session(etcd, ttl=30).start()
    directory = Directory(etcd).start()
    await directory.wait_synced(5)
    servers: list[grpc.aio.Server] = []
    yield etcd, session, directory, servers
    await directory.close()
    for server in servers:
        await server.stop(0)
    await session.close()
    await etcd.close()


async def test_new_registration_on_the_same_host_replaces_the_older_at_once(env):
    etcd, session, directory, servers = env
    service = f"svc-{uuid.uuid4().hex[:8]}"
    old, old_address = await serve()
    new, new_address = await serve()
    servers += [old, new]
    changes = []
    directory.listeners.append(lambda: changes.append(directory.addresses(service)))

    await register(session, service, "first", old_address)
    await eventually(lambda: directory.addresses(service) == [old_address])
    await register(session, service, "second", new_address)  # the first is still registered (and alive)
    await eventually(lambda: directory.addresses(service) == [new_address])

    assert [i.address for i in directory.instances(service)] == [new_address, old_address]
    assert [new_address] in changes
    for _ in range(20):
        channel = directory.channel(service)
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert directory.channel(service) is directory.channel(service)


async def test_instance_that_cannot_connect_is_skipped_until_it_is_back(env):
    etcd, session, directory, servers = env
    service = f"svc-{uuid.uuid4().hex[:8]}"
    a, a_address = await serve()
    b, b_address = await serve()
    servers.append(b)
    await put_record(etcd, session, service, "a", a_address, host="host-a")
    await put_record(etcd, session, service, "b", b_address, host="host-b")
    await eventually(lambda: sorted(directory.addresses(service)) == sorted([a_address, b_address]))

    await a.stop(0)  # its entry stays (as after SIGKILL, until the lease expires)
    await eventually(lambda: directory.addresses(service) == [b_address], timeout=1.0)
    assert {directory.channel(service) for _ in range(20)} == {directory.instance_channel(b_address)}

    a_again, _ = await serve(int(a_address.rpartition(":")[2]))  # back on the same address
    servers.append(a_again)
    await eventually(lambda: sorted(directory.addresses(service)) == sorted([a_address, b_address]), timeout=3.0)


async def test_when_every_instance_is_down_calls_fail_fast_with_unavailable(env):
    etcd, session, directory, servers = env
    service = f"svc-{uuid.uuid4().hex[:8]}"
    with pytest.raises(errors.Unavailable):
        directory.channel(service)
    a, a_address = await serve()
    await register(session, service, "a", a_address)
    await eventually(lambda: directory.addresses(service) == [a_address])
    await a.stop(0)
    await eventually(lambda: directory.instance_channel(a_address).get_state()
                     == grpc.ChannelConnectivity.TRANSIENT_FAILURE, timeout=1.0)
    assert directory.addresses(service) == [a_address]  # nothing better: callers get a quick UNAVAILABLE
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_pb2_grpc.HealthStub(directory.channel(service)).Check(health_pb2.HealthCheckRequest(),
                                                                           timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - began < 0.5


async def test_deregistered_instance_is_dropped_and_its_channel_closed(env):
    etcd, session, directory, servers = env
    service = f"svc-{uuid.uuid4().hex[:8]}"
    a, a_address = await serve()
    servers.append(a)
    await register(session, service, "a", a_address)
    await eventually(lambda: directory.addresses(service) == [a_address])
    channel = directory.channel(service)
    await session.forget(registry_key(service, "a"))
    await eventually(lambda: directory.addresses(service) == [])
    with pytest.raises(errors.Unavailable):
        directory.channel(service)
    assert directory.instance_channel(a_address) is None
    await eventually(lambda: channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN, timeout=7.0)
