"""services.common.etcd against a real etcd: CAS updates, sessions, leader
election, and list-then-watch across a compaction and an etcd restart."""
from __future__ import annotations

import asyncio

import pytest

from deploy.local.etcd import EtcdProcess
from services.common import errors
from services.common.etcd import Election, Etcd, Mirror, Session, op_delete_prefix, op_get, op_get_prefix


async def test_update_is_compare_and_swap_under_concurrency(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)
    key = etcd_prefix + "counter"

    def incr(kv):
        return str(int(kv.value) + 1 if kv else 1).encode()

    await asyncio.gather(*(etcd.update(key, incr) for _ in range(40)))
    assert (await etcd.get(key)).value == b"40"
    await etcd.close()


async def test_update_change_may_abort_with_typed_error(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)

    def refuse(kv):
        raise errors.FailedPrecondition("no")

    with pytest.raises(errors.FailedPrecondition):
        await etcd.update(etcd_prefix + "x", refuse)
    assert await etcd.get(etcd_prefix + "x") is None
    await etcd.close()


async def test_create_only_once(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)
    results = await asyncio.gather(*(etcd.create(etcd_prefix + "k", b"%d" % i) for i in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    await etcd.close()


async def test_prefix_ops_range_and_delete_only_under_the_prefix_in_one_transaction(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)
    for key in ("a/2", "a/1", "a/10", "ab", "b/1"):
        await etcd.put(etcd_prefix + key, key.encode())
    _, resp = await etcd.txn([], [op_get_prefix(etcd_prefix + "a/"), op_get(etcd_prefix + "ab")])
    listed, single = (r.response_range for r in resp.responses)
    assert [kv.value for kv in listed.kvs] == [b"a/1", b"a/10", b"a/2"]  # key order
    assert [kv.value for kv in single.kvs] == [b"ab"]
    ok, resp = await etcd.txn([], [op_delete_prefix(etcd_prefix + "a/")])
    assert ok and resp.responses[0].response_delete_range.deleted == 3
    kvs, _, _ = await etcd.get_prefix(etcd_prefix)
    assert [kv.key[len(etcd_prefix):] for kv in kvs] == ["ab", "b/1"]
    await etcd.close()


async def test_session_keys_vanish_when_session_closes(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)
    session = await Session(etcd, ttl=2).start()
    await session.keep(etcd_prefix + "me", b"here")
    assert (await etcd.get(etcd_prefix + "me")).lease == session.lease_id
    await asyncio.sleep(2.5)  # longer than the TTL: keep-alive holds it
    assert await etcd.get(etcd_prefix + "me") is not None
    await session.close()
    assert await etcd.get(etcd_prefix + "me") is None
    await etcd.close()


async def test_election_has_one_leader_and_fails_over(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)
    s1, s2 = await Session(etcd, ttl=2).start(), await Session(etcd, ttl=2).start()
    e1 = Election(s1, etcd_prefix + "election", b"one")
    e2 = Election(s2, etcd_prefix + "election", b"two")
    await e1.campaign()
    second = asyncio.create_task(e2.campaign())
    await asyncio.sleep(0.5)
    assert not second.done()
    assert await e1.leader() == "one"
    await s1.close()  # the leader dies: its lease is revoked
    await asyncio.wait_for(second, 5)
    assert await e2.leader() == "two"
    await s2.close()
    await etcd.close()


async def test_mirror_follows_changes_and_survives_compaction(etcd_endpoint, etcd_prefix):
    etcd = await Etcd.connect(etcd_endpoint)
    await etcd.put(etcd_prefix + "a", b"1")
    mirror = Mirror(etcd, etcd_prefix, decode=lambda kv: kv.value).start()
    await mirror.wait_synced(5)
    assert mirror.items == {etcd_prefix + "a": b"1"}
    await etcd.put(etcd_prefix + "b", b"2")
    await etcd.delete(etcd_prefix + "a")
    await _eventually(lambda: mirror.items == {etcd_prefix + "b": b"2"})
    await mirror.stop()

    # Changes made while nobody watches, then compacted away: a resumed watch
    # cannot replay them and must list again.
    watcher_revision = mirror.watcher.revision
    await etcd.put(etcd_prefix + "c", b"3")
    revision = await etcd.put(etcd_prefix + "d", b"4")
    from aetcd import rpc
    await etcd._kv.Compact(rpc.CompactionRequest(revision=revision, physical=True))
    mirror.watcher.synced.clear()
    mirror._task = asyncio.create_task(mirror.watcher.run())
    assert mirror.watcher.revision == watcher_revision
    await _eventually(lambda: set(mirror.items) == {etcd_prefix + k for k in "bcd"})
    await mirror.stop()
    await etcd.close()


async def test_mirror_resumes_after_etcd_restart(tmp_path, etcd_prefix):
    server = EtcdProcess(str(tmp_path / "etcd")).start()
    try:
        etcd = await Etcd.connect(server.endpoint)
        mirror = Mirror(etcd, etcd_prefix, decode=lambda kv: kv.value).start()
        await mirror.wait_synced(5)
        server.stop()
        with pytest.raises(errors.Unavailable):
            await etcd.ping()
        server.start()  # same ports, same data
        await _eventually(lambda: _pings(etcd), timeout=15)
        await etcd.put(etcd_prefix + "after", b"restart")
        await _eventually(lambda: mirror.items.get(etcd_prefix + "after") == b"restart", timeout=15)
        await mirror.stop()
        await etcd.close()
    finally:
        server.stop()


async def _pings(etcd) -> bool:
    try:
        await etcd.ping()
        return True
    except errors.Unavailable:
        return False


async def _eventually(predicate, timeout: float = 5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
