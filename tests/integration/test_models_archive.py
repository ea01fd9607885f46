"""Model versions that ended (END: they failed to load) move from etcd to the
archive with their exports and keep reading back (services/models/archiver.py),
on the session's etcd with the real auth, models and gateway processes, a
retention of 3 s.

Versions that need no replica are written straight into etcd through the
store's own `ModelStore.create_version` (as END, with the ended/ key the store
writes for them; `clock` says when they ended), their exports through
`ModelStore.create_export`. One version fails for real (a garbage
saved_model.pb), so the path the reconciler takes is covered too.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
import urllib.request

import grpc
import pytest

from cloudml.common.v1 import resources_pb2
from cloudml.models.v1 import models_service_pb2 as pb
from services.models.export_records import E, ExportRecord
from services.models.store import ModelStore
from tests.integration.models_stack import END, REPLICA, expect_code, file_uri, open_stack, wait_for

RETENTION = 3.0
FLAGS = ("--retention-seconds", str(RETENTION), "--archive-seconds", "0.2", "--metrics-listen", "127.0.0.1:0")
NOT_FOUND = grpc.StatusCode.NOT_FOUND
LONG_AGO, NOW, LATER = -3600.0, 0.0, 3600.0  # when seeded versions ended, relative to now


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server):
    # No half_plus_two: nothing here has to load.
    with open_stack(str(tmp_path_factory.mktemp("models-archive")), etcd_server.endpoint, "",
                    models_flags=FLAGS) as stack:
        yield stack


@pytest.fixture(scope="module")
def team(stack):
    return stack.new_tenant()


# --- helpers ---------------------------------------------------------------------------

def with_store(stack, clock_offset: float = 0.0):
    """Runs `fn(store)` on a ModelStore of the stack's namespace whose clock is offset."""
    def call(fn):
        async def go():
            async with stack.etcd.client() as etcd:
                return await fn(ModelStore(etcd, clock=lambda: time.time() + clock_offset))

        return asyncio.run(go())

    return call


def create_model(stack, who, name: str) -> pb.Model:
    return stack.call(who, "CreateModel", pb.CreateModelRequest(name=name)).model


def ended_version(stack, tenant: str, model: str, number: int) -> pb.ModelVersion:
    """A version as the service records one that failed to load (its SavedModel directory exists)."""
    path = stack.storage(tenant, "models", model, str(number))
    if not os.path.exists(path):
        shutil.copytree(stack.broken_model, path)
    version = pb.ModelVersion(
        model=model, tenant=tenant, version=number, model_uri=file_uri(path), description=f"v{number}",
        resources=resources_pb2.Resources(**REPLICA), min_replicas=1, max_replicas=1, batching=pb.BatchingConfig(),
        state=END, status=pb.ErrorStatus(code=3, message=f"seeded: v{number} failed to load"), desired_replicas=1)
    version.create_time.FromNanoseconds(time.time_ns() - 7200 * 10**9 + number)
    return version


def seed(stack, tenant: str, model: str, numbers, ended: float) -> dict[int, pb.ModelVersion]:
    """END versions written through the store, as having ended `ended` seconds from now."""
    versions = {n: ended_version(stack, tenant, model, n) for n in numbers}

    async def write(store: ModelStore):
        for version in versions.values():
            _, model_revision = await store.get_model(tenant, model)
            highest, counter_revision = await store.get_counter(tenant, model)
            assert await store.create_version(version, model_revision, highest, counter_revision)

    with_store(stack, ended)(write)
    return versions


def seed_export(stack, tenant: str, model: str, number: int, ident: str, state: int) -> ExportRecord:
    """An export record of the version (SUCCEEDED: with its artifact on disk, where the driver keeps them)."""
    now = time.time()
    record = ExportRecord(tenant=tenant, model=model, version=number, id=ident, optimization="none",
                          signature="", state=state, created=now, updated=now, finished=now,
                          message="" if state == E.EXPORT_STATE_SUCCEEDED else "seeded: refused")
    if state == E.EXPORT_STATE_SUCCEEDED:
        directory = os.path.join(stack.data_dir, "models", "artifacts", tenant, model, str(number), ident)
        os.makedirs(directory)
        data = f"tflite of {model} v{number}".encode()
        with open(os.path.join(directory, "model.tflite"), "wb") as f:
            f.write(data)
        record.artifact_path = os.path.join(directory, "model.tflite")
        record.size_bytes, record.sha256 = len(data), hashlib.sha256(data).hexdigest()

    async def write(store: ModelStore):
        assert await store.create_export(record)

    with_store(stack)(write)
    return record


def pointer(stack, tenant: str, model: str, number: int) -> str:
    return os.path.join(stack.data_dir, "archive", "versions", tenant, model, "names", f"{number:019d}.json")


def etcd_keys(stack, tenant: str, model: str) -> list[str]:
    """Every key of the model's versions (records, exports, ended/, replicas, endpoints) in etcd."""
    return [k for k in stack.etcd.get_prefix("/cloudml/models/")
            if re.search(rf"/(versions|exports|replicas|endpoints)/{tenant}/{model}/|/ended/\d+/{tenant}/{model}/", k)]


def in_etcd(stack, tenant: str, model: str, number: int) -> bool:
    return bool(stack.etcd.get_prefix(f"/cloudml/models/versions/{tenant}/{model}/{number:019d}"))


def wait_archived(stack, tenant: str, model: str, numbers, timeout: float = RETENTION + 30) -> None:
    wait_for(lambda: all(os.path.exists(pointer(stack, tenant, model, n)) and not in_etcd(stack, tenant, model, n)
                         for n in numbers), timeout, f"{model} v{list(numbers)} archived")


def list_all(stack, who, model: str, size: int, tenant: str = "") -> list[pb.ModelVersion]:
    found, token = [], ""
    for _ in range(100):
        page = stack.call(who, "ListVersions", pb.ListVersionsRequest(tenant=tenant, model=model, page_size=size,
                                                                      page_token=token))
        found += page.model_versions
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("ListVersions never ended")


def download(stack, who, **request) -> tuple[pb.DownloadManifest, bytes]:
    parts = list(stack.stub.DownloadVersion(pb.DownloadVersionRequest(**request), metadata=who.md, timeout=10))
    return parts[0].manifest, b"".join(p.chunk.data for p in parts[1:])


# --- tests -----------------------------------------------------------------------------

def test_version_that_failed_is_archived_and_reads_back(stack, team):
    shutil.copytree(stack.broken_model, stack.storage(team.name, "models", "broken", "1"))
    create_model(stack, team, "broken")
    stack.call(team, "CreateVersion", pb.CreateVersionRequest(model="broken", model_version=pb.ModelVersion(
        version=1, model_uri=file_uri(stack.storage(team.name, "models", "broken", "1")), resources=REPLICA)))
    failed = stack.wait_version(team, "broken", 1, lambda v: v.state == END, "broken v1 END")
    assert failed.status.code and failed.status.message

    # Moved once its replica is gone and the retention has passed (the reconciler
    # wrote its ended/ key when it moved it to END: nothing else finds it).
    wait_archived(stack, team.name, "broken", [1], timeout=RETENTION + 60)
    assert etcd_keys(stack, team.name, "broken") == []
    archived = stack.version(team, "broken", 1)
    assert (archived.state, archived.status, archived.model_uri, archived.create_time) == \
        (END, failed.status, failed.model_uri, failed.create_time)
    assert not archived.replicas
    # Gone from the route, and the leader forgot it: its replicas' working directories went with it.
    route_key = f"/cloudml/models/routes/{team.name}/broken"
    wait_for(lambda: not pb.ModelRoute.FromString(stack.etcd.get_prefix(route_key)[route_key]).versions, 10,
             "the route without v1")
    replicas_dir = os.path.join(stack.data_dir, "models", "replicas")
    assert not [d for d in os.listdir(replicas_dir) if d.startswith(f"models.{team.name}.broken.1.")]
    # Its SavedModel stays downloadable (read only).
    manifest, _ = download(stack, team, model="broken", version=1, manifest_only=True)
    assert "saved_model.pb" in [f.path for f in manifest.files]


def test_archived_version_reads_back_byte_for_byte(stack, team):
    create_model(stack, team, "same")
    seeded = seed(stack, team.name, "same", [1], LONG_AGO)[1]
    wait_archived(stack, team.name, "same", [1])
    assert stack.version(team, "same", 1) == seeded
    with open(pointer(stack, team.name, "same", 1)) as f:
        where = json.load(f)
    part = os.path.join(stack.data_dir, "archive", "versions", team.name, "same", where["day"], where["part"] + ".jsonl")
    assert json.loads(open(part, "rb").read()[where["offset"]:where["offset"] + where["length"]])["name"] == \
        f"{1:019d}"


def test_list_versions_pages_across_live_and_archived(stack, team):
    create_model(stack, team, "mixed")
    versions = {**seed(stack, team.name, "mixed", [1, 3, 5, 7], LONG_AGO),
                **seed(stack, team.name, "mixed", [2, 4, 6], LATER)}
    wait_archived(stack, team.name, "mixed", [1, 3, 5, 7])
    assert all(in_etcd(stack, team.name, "mixed", n) for n in (2, 4, 6))
    expected = [versions[n] for n in range(1, 8)]
    for size in (1, 2, 3, 100):
        assert list_all(stack, team, "mixed", size) == expected, size
    for n in range(1, 8):
        assert stack.version(team, "mixed", n) == versions[n]
    # A token names a version number: it stays good while versions move.
    first = stack.call(team, "ListVersions", pb.ListVersionsRequest(model="mixed", page_size=2))
    assert [v.version for v in first.model_versions] == [1, 2]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stack.call, team, "ListVersions",
                pb.ListVersionsRequest(model="mixed", page_token="bm90LWEtbnVtYmVy"))


def test_version_a_label_names_stays_in_etcd_until_the_label_moves(stack, team):
    create_model(stack, team, "named")
    seed(stack, team.name, "named", [1], NOW)
    stack.call(team, "SetLabel", pb.SetLabelRequest(model="named", label="keep", version=1, allow_unavailable=True))
    time.sleep(RETENTION + 2)
    assert in_etcd(stack, team.name, "named", 1) and not os.path.exists(pointer(stack, team.name, "named", 1))
    stack.call(team, "DeleteLabel", pb.DeleteLabelRequest(model="named", label="keep"))
    wait_archived(stack, team.name, "named", [1])


def test_archived_version_numbers_stay_taken(stack, team):
    create_model(stack, team, "taken")
    seeded = seed(stack, team.name, "taken", [1, 2], LONG_AGO)
    wait_archived(stack, team.name, "taken", [1, 2])
    # An explicit number: the archived version answers, as a live one would.
    spec = pb.ModelVersion()
    spec.CopyFrom(seeded[2])
    for field in ("model", "tenant", "state", "status", "desired_replicas", "create_time"):
        spec.ClearField(field)
    again = stack.call(team, "CreateVersion", pb.CreateVersionRequest(model="taken", model_version=spec))
    assert not again.created and again.model_version == seeded[2]
    spec.description = "another spec"
    expect_code(grpc.StatusCode.ALREADY_EXISTS, stack.call, team, "CreateVersion",
                pb.CreateVersionRequest(model="taken", model_version=spec))
    assert not in_etcd(stack, team.name, "taken", 2)
    # The next number is past the archived ones (no live version is left to count from).
    spec.version = 0
    created = stack.call(team, "CreateVersion", pb.CreateVersionRequest(model="taken", model_version=spec))
    assert created.created and created.model_version.version == 3
    stack.call(team, "DeleteVersion", pb.DeleteVersionRequest(model="taken", version=3))


def test_delete_archived_version_then_the_model(stack, team):
    create_model(stack, team, "gone")
    seed(stack, team.name, "gone", [1, 2, 3], NOW)
    artifact = seed_export(stack, team.name, "gone", 2, "tflite", E.EXPORT_STATE_SUCCEEDED).artifact_path
    wait_archived(stack, team.name, "gone", [1, 2, 3])
    assert os.path.exists(artifact)

    deleted = stack.call(team, "DeleteVersion", pb.DeleteVersionRequest(model="gone", version=2)).model_version
    assert deleted.version == 2 and deleted.HasField("delete_time")
    expect_code(NOT_FOUND, stack.version, team, "gone", 2)
    expect_code(NOT_FOUND, stack.call, team, "GetExport", pb.GetExportRequest(model="gone", version=2, id="tflite"))
    assert not os.path.exists(pointer(stack, team.name, "gone", 2))
    assert not os.path.exists(os.path.dirname(artifact))
    assert [v.version for v in list_all(stack, team, "gone", 100)] == [1, 3]
    expect_code(NOT_FOUND, stack.call, team, "DeleteVersion", pb.DeleteVersionRequest(model="gone", version=2))

    # A model with archived versions only goes at once, and they with it.
    stack.call(team, "DeleteModel", pb.DeleteModelRequest(name="gone"))
    assert not any(os.path.exists(pointer(stack, team.name, "gone", n)) for n in (1, 3))
    wait_for(lambda: not stack.etcd.get_prefix(f"/cloudml/models/models/{team.name}/gone"), 20, "the model gone")
    expect_code(NOT_FOUND, stack.call, team, "GetModel", pb.GetModelRequest(name="gone"))
    # A new model of that name has none of them.
    create_model(stack, team, "gone")
    assert list_all(stack, team, "gone", 100) == []
    expect_code(NOT_FOUND, stack.version, team, "gone", 1)


def test_exports_of_an_archived_version_stay_readable(stack, team):
    create_model(stack, team, "exp")
    seed(stack, team.name, "exp", [1], NOW)
    good = seed_export(stack, team.name, "exp", 1, "tflite", E.EXPORT_STATE_SUCCEEDED)
    seed_export(stack, team.name, "exp", 1, "tflite-float16", E.EXPORT_STATE_FAILED)
    listed = stack.call(team, "ListExports", pb.ListExportsRequest(model="exp", version=1)).exports
    got = stack.call(team, "GetExport", pb.GetExportRequest(model="exp", version=1, id="tflite")).export
    assert [e.id for e in listed] == ["tflite", "tflite-float16"]
    wait_archived(stack, team.name, "exp", [1])
    assert etcd_keys(stack, team.name, "exp") == []

    assert stack.call(team, "ListExports", pb.ListExportsRequest(model="exp", version=1)).exports == listed
    assert stack.call(team, "GetExport", pb.GetExportRequest(model="exp", version=1, id="tflite")).export == got
    expect_code(NOT_FOUND, stack.call, team, "GetExport", pb.GetExportRequest(model="exp", version=1, id="nope"))
    time.sleep(1)  # the export driver's passes: it must not take the artifact with the records
    manifest, data = download(stack, team, model="exp", version=1, artifact="tflite")
    assert data == open(good.artifact_path, "rb").read() and manifest.files[0].sha256 == good.sha256
    # Asking again answers the export there is; nothing new starts on an archived version.
    again = stack.call(team, "ExportVersion", pb.ExportVersionRequest(model="exp", version=1,
                                                                       format=pb.EXPORT_FORMAT_TFLITE))
    assert not again.created and again.export == got
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stack.call, team, "ExportVersion", pb.ExportVersionRequest(
        model="exp", version=1, format=pb.EXPORT_FORMAT_TFLITE,
        options=pb.ExportOptions(optimization=pb.EXPORT_OPTIMIZATION_DYNAMIC_RANGE)))


def test_other_tenants_cannot_reach_archived_versions(stack, team):
    create_model(stack, team, "secret")
    seeded = seed(stack, team.name, "secret", [1], NOW)[1]
    seed_export(stack, team.name, "secret", 1, "tflite", E.EXPORT_STATE_SUCCEEDED)
    wait_archived(stack, team.name, "secret", [1])
    other = stack.new_tenant()
    t = team.name
    for method, request in (
            ("GetVersion", pb.GetVersionRequest(tenant=t, model="secret", version=1)),
            ("ListVersions", pb.ListVersionsRequest(tenant=t, model="secret")),
            ("DeleteVersion", pb.DeleteVersionRequest(tenant=t, model="secret", version=1)),
            ("GetExport", pb.GetExportRequest(tenant=t, model="secret", version=1, id="tflite")),
            ("ListExports", pb.ListExportsRequest(tenant=t, model="secret", version=1)),
            ("ExportVersion", pb.ExportVersionRequest(tenant=t, model="secret", version=1,
                                                      format=pb.EXPORT_FORMAT_TFLITE)),
            ("DeleteModel", pb.DeleteModelRequest(tenant=t, name="secret"))):
        expect_code(NOT_FOUND, stack.call, other, method, request)
    expect_code(NOT_FOUND, download, stack, other, tenant=t, model="secret", version=1, artifact="tflite")
    # Its own model of the same name shows none of them.
    create_model(stack, other, "secret")
    assert list_all(stack, other, "secret", 100) == []
    expect_code(NOT_FOUND, stack.version, other, "secret", 1)
    expect_code(NOT_FOUND, stack.call, other, "GetExport", pb.GetExportRequest(model="secret", version=1, id="tflite"))
    # Nothing of it moved; the admin reads it.
    assert os.path.exists(pointer(stack, t, "secret", 1))
    assert stack.version(stack.auth.admin, "secret", 1, tenant=t) == seeded


def scrape(stack, name: str) -> float | None:
    """One sample of the models process's metrics page (None: not there yet)."""
    ports = json.load(open(stack.models.port_file))
    text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_restarted_models_service_loads_no_archived_version(stack, team):
    create_model(stack, team, "restart")
    seeded = {**seed(stack, team.name, "restart", [1, 2], LONG_AGO), **seed(stack, team.name, "restart", [3], LATER)}
    wait_archived(stack, team.name, "restart", [1, 2])
    assert scrape(stack, "cloudml_models_versions_archived_total") >= 2
    stack.models.kill()
    stack.start_models()

    def ends_in_etcd() -> int:
        records = stack.etcd.get_prefix("/cloudml/models/versions/")
        return sum(1 for raw in records.values() if pb.ModelVersion.FromString(raw).state == END)

    # The new leader mirrors the END versions etcd holds (v3 here), none of the archived ones.
    gauge = 'cloudml_models_versions{state="END"}'
    wait_for(lambda: scrape(stack, gauge) is not None and scrape(stack, gauge) == ends_in_etcd(), 30,
             "the new leader's version count")
    assert ends_in_etcd() >= 1
    assert [stack.version(team, "restart", n) for n in (1, 2, 3)] == [seeded[1], seeded[2], seeded[3]]
    assert not in_etcd(stack, team.name, "restart", 1) and not in_etcd(stack, team.name, "restart", 2)
