"""A key namespace on one etcd, as etcd's own `clientv3/namespace` package
keeps one: every key a client sends gets the namespace in front, every key
etcd returns has it taken off. Services that share an etcd under different
namespaces never see each other's keys (ranges, prefixes, watches, leases'
keys, elections), and their code never knows: `Etcd(namespace=...)` applies
this on the wire, and with no namespace nothing here runs.

Only `services.common.etcd` uses this module.
"""
from __future__ import annotations

from typing import Any

import grpc
from aetcd import rpc


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class Namespace:
    """Rewrites requests and responses for the key namespace `prefix`."""

    def __init__(self, prefix: str):
        if not prefix:
            raise ValueError("an etcd namespace is a non-empty key prefix")
        self.prefix = prefix.encode()
        self._end = prefix_end(self.prefix)

    # --- requests -------------------------------------------------------------------------

    def key(self, key: bytes) -> bytes:
        return self.prefix + key

    def range_end(self, range_end: bytes) -> bytes:
        """`range_end` of a request inside the namespace: "\\0" (every key from
        `key` on) stops at the namespace's end; empty stays empty (one key)."""
        if range_end == b"\0":
            return self._end
        return self.prefix + range_end if range_end else b""

    def compare(self, compare: Any) -> Any:
        out = rpc.Compare()
        out.CopyFrom(compare)
        out.key = self.key(compare.key)
        if compare.range_end:
            out.range_end = self.range_end(compare.range_end)
        return out

    def op(self, op: Any) -> Any:
        """A copy of a transaction operation with its keys in the namespace."""
        out = rpc.RequestOp()
        out.CopyFrom(op)
        kind = op.WhichOneof("request")
        if kind == "request_txn":
            txn = out.request_txn
            compares = [self.compare(c) for c in op.request_txn.compare]
            success = [self.op(o) for o in op.request_txn.success]
            failure = [self.op(o) for o in op.request_txn.failure]
            del txn.compare[:], txn.success[:], txn.failure[:]
            txn.compare.extend(compares)
            txn.success.extend(success)
            txn.failure.extend(failure)
        elif kind is not None:
            request = getattr(out, kind)
            request.key = self.key(request.key)
            if kind != "request_put" and request.range_end:
                request.range_end = self.range_end(request.range_end)
        return out

    # --- responses (taken off in place) ---------------------------------------------------------

    def strip_kvs(self, kvs) -> None:
        n = len(self.prefix)
        for kv in kvs:
            if kv.key.startswith(self.prefix):
                kv.key = kv.key[n:]

    def strip_txn(self, resp: Any) -> None:
        for response in resp.responses:
            kind = response.WhichOneof("response")
            if kind == "response_range":
                self.strip_kvs(response.response_range.kvs)
            elif kind == "response_put" and response.response_put.HasField("prev_kv"):
                self.strip_kvs([response.response_put.prev_kv])
            elif kind == "response_delete_range":
                self.strip_kvs(response.response_delete_range.prev_kvs)
            elif kind == "response_txn":
                self.strip_txn(response.response_txn)

    def strip_watch(self, resp: Any) -> None:
        for event in resp.events:
            self.strip_kvs([event.kv])
            if event.HasField("prev_kv"):
                self.strip_kvs([event.prev_kv])


class NamespacedWatch:
    """A watch call whose responses come back with the namespace taken off
    (the same `read()` / `cancel()` as the raw call)."""

    def __init__(self, call: Any, namespace: Namespace):
        self._call = call
        self._namespace = namespace

    async def read(self) -> Any:
        resp = await self._call.read()
        if resp is not grpc.aio.EOF:
            self._namespace.strip_watch(resp)
        return resp

    def cancel(self) -> bool:
        return self._call.cancel()
