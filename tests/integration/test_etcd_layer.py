"""services.common.etcd against a real etcd: CAS updates, sessions, leader
election, list-then-watch across a compaction and an etcd restart, and key
namespaces (two namespaces on one etcd never see each other's keys)."""
from __future__ import annotations

import asyncio

import pytest

from deploy.local.etcd import EtcdProcess
from deploy.local.stack import EtcdTarget
from services.common import errors
from services.common.etcd import (Etcd, Mirror, cmp_absent, cmp_mod_revision, op_delete, op_delete_prefix, op_get,
                                  op_get_prefix, op_put)
from services.common.etcd_concurrency import Election, Session


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


async def test_get_prefix_pages_in_key_order_with_its_limit(etcd_endpoint, etcd_prefix):
    """Pages come in key order whatever the write order, and the limit holds
    (etcd reads only the page: no sort asked, which would make it read the whole range)."""
    etcd = await Etcd.connect(etcd_endpoint)
    keys = [f"p/{i:03d}" for i in range(50)]
    for key in reversed(keys):
        await etcd.put(etcd_prefix + key, b"")
    await etcd.put(etcd_prefix + "p/025", b"rewritten")  # a newer revision does not move it
    pages, start = [], None
    while True:
        kvs, _, more = await etcd.get_prefix(etcd_prefix + "p/", start=start, limit=7, keys_only=True)
        assert len(kvs) == 7 or not more
        pages.append([kv.key[len(etcd_prefix):] for kv in kvs])
        if not more:
            break
        start = kvs[-1].key + "\0"
    assert [k for page in pages for k in page] == keys and len(pages) == 8
    _, resp = await etcd.txn([], [op_get_prefix(etcd_prefix + "p/")])
    assert [kv.key.decode()[-5:] for kv in resp.responses[0].response_range.kvs] == keys
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


# --- namespaces --------------------------------------------------------------------------

async def _namespaced(endpoint: str, root: str) -> tuple[Etcd, Etcd, Etcd]:
    """Clients in namespaces ROOT/a and ROOT/b, and one in the whole keyspace."""
    return (await Etcd.connect(endpoint, namespace=root + "a"), await Etcd.connect(endpoint, namespace=root + "b"),
            await Etcd.connect(endpoint))


async def test_namespaces_keep_keys_apart_in_reads_writes_and_prefix_ranges(etcd_endpoint, etcd_prefix):
    a, b, raw = await _namespaced(etcd_endpoint, etcd_prefix)
    for key in ("/cloudml/x/1", "/cloudml/x/2", "/cloudml/y"):
        await a.put(key, b"a" + key.encode())
    await b.put("/cloudml/x/1", b"b")
    # Each sees its own keys, without the namespace; the same key is two keys.
    assert (await a.get("/cloudml/x/1")).value == b"a/cloudml/x/1"
    assert (await b.get("/cloudml/x/1")).value == b"b"
    assert await b.get("/cloudml/y") is None
    kvs, _, _ = await a.get_prefix("/cloudml/x/")
    assert [kv.key for kv in kvs] == ["/cloudml/x/1", "/cloudml/x/2"]
    kvs, _, more = await a.get_prefix("/cloudml/", start="/cloudml/x/2", limit=1)
    assert [kv.key for kv in kvs] == ["/cloudml/x/2"] and more
    assert [kv.key for kv in (await b.get_prefix(""))[0]] == ["/cloudml/x/1"]  # the whole namespace, no further
    assert (await a.count_prefix("/cloudml/"), await b.count_prefix("/cloudml/")) == (3, 1)
    # Underneath, the keys carry their namespace.
    assert [kv.key for kv in (await raw.get_prefix(etcd_prefix))[0]] == [
        etcd_prefix + "a/cloudml/x/1", etcd_prefix + "a/cloudml/x/2", etcd_prefix + "a/cloudml/y",
        etcd_prefix + "b/cloudml/x/1"]
    # Deletes stay inside the namespace too.
    assert await b.delete_prefix("/cloudml/") == 1
    assert await a.count_prefix("/cloudml/") == 3
    assert await a.delete("/cloudml/y") and not await b.delete("/cloudml/y")
    assert await a.delete_prefix("") == 2
    assert await raw.count_prefix(etcd_prefix) == 0
    for etcd in (a, b, raw):
        await etcd.close()


async def test_namespaced_transactions_compare_and_answer_inside_the_namespace(etcd_endpoint, etcd_prefix):
    a, b, raw = await _namespaced(etcd_endpoint, etcd_prefix)
    assert await a.create("/k", b"1") and await b.create("/k", b"2")  # absent in each namespace
    assert not await a.create("/k", b"again")
    kv = await a.get("/k")
    ok, resp = await b.txn([cmp_mod_revision("/k", kv.mod_revision)], [op_put("/k", b"no")], [op_get("/k")])
    assert not ok and [(x.key, x.value) for x in resp.responses[0].response_range.kvs] == [(b"/k", b"2")]
    await a.put("/p/1", b"x")
    await a.put("/p/2", b"y")
    ok, resp = await a.txn([cmp_absent("/q")], [op_get_prefix("/p/"), op_delete("/k"), op_delete_prefix("/p/")])
    assert ok and [x.key for x in resp.responses[0].response_range.kvs] == [b"/p/1", b"/p/2"]
    assert resp.responses[2].response_delete_range.deleted == 2
    assert await a.get("/k") is None and (await b.get("/k")).value == b"2"
    assert await a.update("/k", lambda cur: b"new") == b"new"
    assert (await raw.get(etcd_prefix + "a/k")).value == b"new"
    await b.delete("/k")
    await a.delete("/k")
    for etcd in (a, b, raw):
        await etcd.close()


async def test_namespaced_watches_see_only_their_namespace(etcd_endpoint, etcd_prefix):
    a, b, raw = await _namespaced(etcd_endpoint, etcd_prefix)
    await a.put("/cloudml/m/old", b"0")
    mirrors = [Mirror(etcd, "/cloudml/", decode=lambda kv: kv.value).start() for etcd in (a, b)]
    for mirror in mirrors:
        await mirror.wait_synced(5)
    await b.put("/cloudml/m/1", b"b1")
    await a.put("/cloudml/m/1", b"a1")
    await raw.put(etcd_prefix + "c/cloudml/m/1", b"elsewhere")  # a third namespace
    await a.delete("/cloudml/m/old")
    await _eventually(lambda: mirrors[0].items == {"/cloudml/m/1": b"a1"})
    await _eventually(lambda: mirrors[1].items == {"/cloudml/m/1": b"b1"})
    await asyncio.sleep(0.2)
    assert mirrors[0].items == {"/cloudml/m/1": b"a1"} and mirrors[1].items == {"/cloudml/m/1": b"b1"}
    for mirror in mirrors:
        await mirror.stop()
    await raw.delete_prefix(etcd_prefix)
    for etcd in (a, b, raw):
        await etcd.close()


async def test_namespaced_sessions_and_elections_are_independent(etcd_endpoint, etcd_prefix):
    a, b, raw = await _namespaced(etcd_endpoint, etcd_prefix)
    sa, sb = await Session(a, ttl=2).start(), await Session(b, ttl=2).start()
    await sa.keep("/cloudml/registry/x", b"a")
    assert (await raw.get(etcd_prefix + "a/cloudml/registry/x")).lease == sa.lease_id
    assert await b.get("/cloudml/registry/x") is None
    # The same election prefix in two namespaces: two leaders, each alone in its own.
    ea, eb = Election(sa, "/cloudml/svc/election", b"one"), Election(sb, "/cloudml/svc/election", b"two")
    await asyncio.wait_for(asyncio.gather(ea.campaign(), eb.campaign()), 5)
    assert (await ea.leader(), await eb.leader()) == ("one", "two")
    assert ea.key == f"/cloudml/svc/election/{sa.lease_id:016x}"
    await sa.close()
    await sb.close()
    assert await raw.count_prefix(etcd_prefix) == 0
    for etcd in (a, b, raw):
        await etcd.close()


def test_namespaced_stacks_on_one_etcd_work_end_to_end_and_apart(etcd_server, tmp_path):
    """Two platform slices (auth + gateway, the same admin key) on one etcd:
    each finds its own services and keeps its own tenants."""
    import grpc

    from cloudml.auth.v1 import auth_service_pb2 as auth_pb
    from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
    from deploy.local.stack import AuthGatewayStack, Stack

    a = AuthGatewayStack(str(tmp_path / "a"), etcd_server.endpoint)
    b = Stack(str(tmp_path / "b"), etcd_server.endpoint)
    try:
        a.start()
        b.start()
        assert a.etcd.namespace != b.etcd.namespace and a.admin == b.admin
        a.tenant_token("only-in-a")  # through A's auth
        with grpc.insecure_channel(a.gateway.address) as channel:  # A's gateway found A's auth
            stub = auth_grpc.AuthServiceStub(channel)
            md = (("authorization", f"Bearer {a.issue_token()}"),)
            assert stub.GetTenant(auth_pb.GetTenantRequest(name="only-in-a"), metadata=md, timeout=10).tenant.name
        with grpc.insecure_channel(b.auth.address) as channel:
            stub = auth_grpc.AuthServiceStub(channel)
            md = (("authorization", f"Bearer {b.issue_token()}"),)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetTenant(auth_pb.GetTenantRequest(name="only-in-a"), metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        registry = {name: list(s.etcd.get_prefix("/cloudml/registry/")) for name, s in (("a", a), ("b", b))}
        assert sorted(k.split("/")[3] for k in registry["a"]) == ["auth", "gateway"]
        assert [k.split("/")[3] for k in registry["b"]] == ["auth"]
        everything = EtcdTarget(etcd_server.endpoint).get_prefix(a.etcd.namespace + "/")
        assert everything and all(k.startswith(a.etcd.namespace + "/cloudml/") for k in everything)
    finally:
        a.stop()
        b.stop()
    assert not EtcdTarget(etcd_server.endpoint).get_prefix(a.etcd.namespace + "/")  # a stack leaves nothing behind


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
