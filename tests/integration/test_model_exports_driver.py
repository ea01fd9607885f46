"""The export driver (`services.models.exports.ExportDriver`) on a real etcd
(a prefix per test) with a stand-in runtime and quota, fast and without
TensorFlow: an export runs as its tenant's replica holding quota and
capacity, SUCCEEDS with the platform's copy of the artifact, FAILS with the
converter's line, is retried when its process dies without an answer and
FAILED after the last attempt, FAILED and stopped past its timeout, waits
in PENDING for quota, goes with its version, and a new leader adopts a
running process instead of starting another."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from cloudml.models.v1 import models_service_pb2 as pb
from services.common.confine import Confiner
from services.common.etcd import Etcd, op_delete
from tests.integration.standins import Clock, Quota
from services.common.runtime.base import ReplicaPhase, ReplicaStatus
from services.models.export_records import E, ExportRecord
from services.models.exports import ExportDriver, ExportSettings
from services.models.store import ModelStore


class Runtime:
    """Replicas as records: `start` records the request, `end` ends one."""

    name = "local"

    def __init__(self):
        self.replicas: dict[str, ReplicaStatus] = {}
        self.requests: dict[str, object] = {}
        self.groups: set[str] = set()
        self.stopped: list[str] = []

    def reserve(self, group, replicas):
        self.groups.add(group)

    def release(self, group):
        self.groups.discard(group)

    async def start(self, request):
        self.requests[request.replica_id] = request
        os.makedirs(request.workdir, exist_ok=True)
        status = ReplicaStatus(request.replica_id, request.group, ReplicaPhase.RUNNING, pid=4321)
        self.replicas[request.replica_id] = status
        return status

    async def status(self, replica_id):
        return self.replicas.get(replica_id) or ReplicaStatus(replica_id, "", ReplicaPhase.UNKNOWN)

    async def wait(self, replica_id, timeout=None):
        while not (await self.status(replica_id)).ended:
            await asyncio.sleep(0.01)
        return await self.status(replica_id)

    async def stop(self, replica_id, grace_seconds=10.0):
        self.stopped.append(replica_id)
        self.end(replica_id, "Killed")
        return self.replicas[replica_id]

    def end(self, replica_id, reason="Completed", code=0):
        self.replicas[replica_id] = ReplicaStatus(replica_id, replica_id, ReplicaPhase.SUCCEEDED if code == 0
                                                  else ReplicaPhase.FAILED, exit_code=code, reason=reason)

    async def adopt(self):
        return list(self.replicas.values())

    async def forget(self, replica_id):
        self.replicas.pop(replica_id, None)

    def running(self) -> list[str]:
        return [r for r, s in self.replicas.items() if not s.ended]


@pytest.fixture
async def env(etcd_endpoint, etcd_prefix, tmp_path):
    etcd = await Etcd.connect(etcd_endpoint)
    storage = tmp_path / "storage"
    model_dir = storage / "acme" / "models" / "m" / "abc"
    model_dir.mkdir(parents=True)
    (model_dir / "saved_model.pb").write_bytes(b"x")
    store = ModelStore(etcd, etcd_prefix)
    runtime, quota, clock = Runtime(), Quota(), Clock()
    version = pb.ModelVersion(tenant="acme", model="m", version=1, model_uri=f"file://{model_dir}/",
                              state=pb.MODEL_VERSION_STATE_AVAILABLE)
    await etcd.put(store.keys.version("acme", "m", 1), version.SerializeToString())
    tasks = []

    def driver(**settings) -> ExportDriver:
        made = ExportDriver(etcd, runtime, quota, ExportSettings(data_dir=str(tmp_path / "data"), tick=0.05,
                                                                 retry_interval=0.05, **settings),
                            confiner=Confiner(str(storage)), store=store, clock=clock)
        tasks.append(asyncio.create_task(made.run()))
        return made

    async def export(optimization="none") -> str:
        record = ExportRecord(tenant="acme", model="m", version=1, id=f"tflite-{optimization}",
                              optimization=optimization, signature="", created=clock(), source=version.model_uri)
        assert await store.create_export(record)
        return store.keys.export("acme", "m", 1, record.id)

    async def record(key: str) -> ExportRecord | None:
        kv = await etcd.get(key)
        return ExportRecord.decode(kv.value) if kv else None

    async def until(predicate, what: str, timeout: float = 10.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            found = await predicate()
            if found:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    yield dict(etcd=etcd, store=store, runtime=runtime, quota=quota, clock=clock, driver=driver, export=export,
               record=record, until=until, data=tmp_path / "data")
    for task in tasks:
        task.cancel()
    done, pending = await asyncio.wait(tasks, timeout=10)
    assert not pending, "a driver loop did not stop when cancelled"
    await etcd.close()


def answer(runtime: Runtime, rid: str, result: dict, artifact: bytes | None = None, code: int = 0) -> None:
    workdir = runtime.requests[rid].workdir
    if artifact is not None:
        with open(os.path.join(workdir, "model.tflite"), "wb") as f:
            f.write(artifact)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)
    runtime.end(rid, "Completed" if code == 0 else "Error", code)


async def started(env, count: int = 1) -> str:
    runtime = env["runtime"]
    await env["until"](lambda: _true(len(runtime.running()) >= 1 and len(runtime.requests) >= count),
                       "an export process")
    return runtime.running()[0]


async def _true(value):
    return value


async def test_export_runs_as_the_tenant_holding_quota_and_succeeds_with_the_platforms_copy(env):
    key = await env["export"]("float16")
    env["driver"]()
    rid = await started(env)
    request = env["runtime"].requests[rid]
    assert request.tenant == "acme" and request.argv[1:3] == ["-m", "services.models.tflite_export"]
    assert request.argv[request.argv.index("--optimization") + 1] == "float16"
    assert env["quota"].held == {("acme", "models/exports/m/1/tflite-float16"): 500}
    assert env["runtime"].groups == {"exports.acme.m.1.tflite-float16"}
    running = await env["record"](key)
    assert running.state == E.EXPORT_STATE_RUNNING and running.holds and running.attempts == 1

    answer(env["runtime"], rid, {"ok": True}, b"flatbuffer")
    done = await env["until"](lambda: _done(env, key), "SUCCEEDED")
    assert done.state == E.EXPORT_STATE_SUCCEEDED and not done.holds
    assert done.sha256 == hashlib.sha256(b"flatbuffer").hexdigest() and done.size_bytes == 10
    assert done.artifact_path.startswith(str(env["data"] / "models" / "artifacts" / "acme" / "m" / "1"))
    with open(done.artifact_path, "rb") as f:
        assert f.read() == b"flatbuffer"
    assert env["quota"].held == {} and env["runtime"].groups == set()
    assert not os.path.exists(request.workdir)  # the tenant's working directory goes


async def _done(env, key):
    found = await env["record"](key)
    return found if found and found.terminal and not found.holds else None


async def test_a_converter_refusal_fails_with_its_line(env):
    key = await env["export"]()
    env["driver"]()
    rid = await started(env)
    answer(env["runtime"], rid, {"error": "TensorFlow Lite conversion failed: unsupported ops: Foo"})
    done = await env["until"](lambda: _done(env, key), "FAILED")
    assert done.state == E.EXPORT_STATE_FAILED and done.message.endswith("unsupported ops: Foo")
    assert env["quota"].held == {}


async def test_a_process_that_dies_without_an_answer_is_retried_then_failed(env):
    key = await env["export"]()
    env["driver"](max_attempts=2)
    rid = await started(env)
    env["runtime"].end(rid, "OOMKilled", 137)
    rid2 = await started(env, 2)
    assert rid2 != rid and (await env["record"](key)).attempts == 2
    env["runtime"].end(rid2, "OOMKilled", 137)
    done = await env["until"](lambda: _done(env, key), "FAILED")
    assert done.state == E.EXPORT_STATE_FAILED and "without an answer 2 times (last: OOMKilled" in done.message
    assert env["quota"].held == {} and env["runtime"].groups == set()


async def test_an_export_past_its_timeout_is_stopped_and_failed(env):
    key = await env["export"]()
    env["driver"](timeout=60)
    rid = await started(env)
    env["clock"].now += 61
    done = await env["until"](lambda: _done(env, key), "FAILED")
    assert "ran longer than 60 s" in done.message and rid in env["runtime"].stopped
    assert env["quota"].held == {}


async def test_pending_while_quota_is_busy(env):
    env["quota"].busy = True
    key = await env["export"]()
    env["driver"]()
    waiting = await env["until"](lambda: _message(env, key), "a waiting message")
    assert waiting.state == E.EXPORT_STATE_PENDING and waiting.message.startswith("waiting for quota")
    assert env["runtime"].requests == {}
    env["quota"].busy = False
    env["clock"].now += 1  # past its retry time
    await started(env)


async def _message(env, key):
    found = await env["record"](key)
    return found if found and found.message else None


async def test_an_export_goes_with_its_version(env):
    key = await env["export"]()
    env["driver"]()
    rid = await started(env)
    await env["etcd"].delete(env["store"].keys.version("acme", "m", 1))
    await env["until"](lambda: _gone(env, key), "the record deleted")
    assert rid in env["runtime"].stopped and env["quota"].held == {} and env["runtime"].groups == set()


async def test_an_archived_versions_export_keeps_its_artifact(env):
    """The archiver deletes a version and its export records in one
    transaction; a pass that sees the version gone before its export (two
    watches) must leave the artifact, which the archived records still name."""
    key = await env["export"]()
    made = env["driver"]()
    answer(env["runtime"], await started(env), {"ok": True}, b"flatbuffer")
    done = await env["until"](lambda: _done(env, key), "SUCCEEDED")
    vkey = env["store"].keys.version("acme", "m", 1)
    await env["etcd"].txn([], [op_delete(vkey), op_delete(key)])
    made.versions.items.pop(vkey, None)
    await made._step(key, done)
    assert os.path.exists(done.artifact_path) and key not in made.exports.items


async def _gone(env, key):
    return await env["etcd"].get(key) is None


async def test_a_new_leader_adopts_the_running_process(env):
    key = await env["export"]()
    env["driver"]()
    rid = await started(env)
    # The first leader stops (its loop cancelled, as on a lost lease); its process runs on.
    for task in asyncio.all_tasks():
        if task.get_coro().__qualname__.startswith("ExportDriver.run"):
            task.cancel()
    await asyncio.sleep(0.1)
    env["driver"]()
    await asyncio.sleep(0.3)
    assert list(env["runtime"].requests) == [rid] and env["runtime"].running() == [rid]
    answer(env["runtime"], rid, {"ok": True}, b"x")
    done = await env["until"](lambda: _done(env, key), "SUCCEEDED")
    assert done.state == E.EXPORT_STATE_SUCCEEDED and done.attempts == 1
