"""The models service's domain logic: models, versions, labels, traffic
splits and replica bounds. No gRPC here: methods take plain values and the
caller's `Principal`, return protobuf messages, and raise typed errors.

What the API writes is the desired state (the spec of each version, its
replica bounds, deletion marks); the reconciler (`reconciler.py`, on the
leader) drives replicas toward it and writes back the observed state. Both
change records by compare-and-swap, and whoever changes a record republishes
the model's route (`ModelStore.publish_route`).

Tenancy: an empty `tenant` means the caller's own; a member naming another
tenant gets NOT_FOUND exactly as for a missing model; the admin tenant may
act on every tenant.

Model URIs: see `check_model_uri` and services.common.confine. Local paths
must hold a SavedModel when the version is created and lie inside the
version's tenant's own storage tree (`<storage>/<tenant>/`), where
`UploadModel` stores what the CLI uploads, whoever the caller is (the admin
too: a platform API key is not a licence to read the machine's files).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import time
from typing import AsyncIterator

from cloudml.common.v1 import resources_pb2
from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors, validation
from services.common.confine import Confiner, Location, open_beneath, refuse_http_directory
from services.common.uploads import Stored, Uploads
from services.common.etcd import Etcd, PrefixWatcher
from services.common.runtime.base import Runtime, Unschedulable
from services.common.tokens import Principal
from services.models import rules, store
from services.models.archiver import ArchivedVersion, VersionArchive
from services.models.rules import (DESCRIPTION_MAX, MAX_VERSION, SAVED_MODEL_FILES, UPDATABLE, Defaults, S,
                                   decode_page_token, encode_page_token, is_file_at, replica_amount,
                                   replica_resources, spec_of, ts)
from services.models.store import ModelStore
from services.models.core_exports import ExportsAPI
from services.models.downloads import TreeReader
from services.common.quota import QuotaClient

log = logging.getLogger(__name__)

class ModelsCore(ExportsAPI):
    def __init__(self, etcd: Etcd, auth: QuotaClient, runtime: Runtime | None, *, storage_root: str | None,
                 defaults: Defaults = Defaults(), clock=time.time, confiner: Confiner | None = None,
                 uploads: Uploads | None = None, store: ModelStore | None = None,
                 archive: VersionArchive | None = None):
        self.etcd = etcd
        #: ended versions moved out of etcd (archiver.py); None: nothing is archived
        self.archive = archive
        self.store = store or ModelStore(etcd)
        self.keys = self.store.keys
        self.auth = auth
        self.runtime = runtime
        self.storage_root = os.path.abspath(storage_root) if storage_root else None
        # Without a storage root no local path is anyone's: a root nobody has.
        self.confiner = confiner or Confiner(self.storage_root or "/nonexistent/cloudml-storage")
        self.uploads = uploads or (Uploads(self.storage_root) if self.storage_root else None)
        self.defaults = defaults
        self.clock = clock
        self.trees = TreeReader()

    # --- tenancy -------------------------------------------------------------------

    async def _tenant(self, caller: Principal, tenant: str, what: str = "model", *, check_exists: bool = False) -> str:
        tenant = tenant or caller.tenant
        validation.check_name(tenant, "tenant")
        if not caller.may_access(tenant):
            # Exactly as for a missing one: a member cannot probe other tenants.
            raise errors.NotFound(f"{what} not found in tenant {tenant!r}")
        if check_exists and tenant != caller.tenant and not await self.auth.tenant_exists(tenant):
            raise errors.NotFound(f"tenant {tenant!r} not found")
        return tenant

    async def _model(self, tenant: str, name: str) -> tuple[pb.Model, int]:
        validation.check_model_name(name, "model")
        found = await self.store.get_model(tenant, name)
        if found is None:
            raise errors.NotFound(f"model {name!r} not found in tenant {tenant!r}")
        return found

    async def _snapshot(self, tenant: str, name: str) -> store.ModelSnapshot:
        validation.check_model_name(name, "model")
        snap = await self.store.snapshot(tenant, name)
        if snap.model is None:
            raise errors.NotFound(f"model {name!r} not found in tenant {tenant!r}")
        return snap

    @staticmethod
    def _version_of(snap: store.ModelSnapshot, number: int) -> pb.ModelVersion:
        for version in snap.versions:
            if version.version == number:
                return version
        raise errors.NotFound(f"version {number} of model {snap.model.name!r} not found")

    async def _publish(self, tenant: str, name: str) -> None:
        try:
            await self.store.publish_route(tenant, name)
        except errors.CloudMLError as err:
            # The reconciler republishes stale routes; the change itself is made.
            log.warning("route of %s/%s not published now (%s); the reconciler will", tenant, name, err.message)

    # --- models ----------------------------------------------------------------------

    async def create_model(self, caller: Principal, tenant: str, name: str, description: str,
                           public: bool) -> pb.Model:
        tenant = await self._tenant(caller, tenant, check_exists=True)
        validation.check_model_name(name, "name")
        if len(description) > DESCRIPTION_MAX:
            raise errors.InvalidArgument(f"description is longer than {DESCRIPTION_MAX} characters")
        now = ts(self.clock())
        model = pb.Model(name=name, tenant=tenant, description=description, public=public,
                         create_time=now, update_time=now)
        # A model being deleted still has its record, so the name stays taken
        # until its replicas are gone; its counter goes with it.
        if not await self.store.create_model(model):
            raise errors.AlreadyExists(f"model {name!r} already exists in tenant {tenant!r}")
        await self._publish(tenant, name)
        return model

    async def get_model(self, caller: Principal, tenant: str, name: str) -> pb.Model:
        tenant = await self._tenant(caller, tenant)
        model, _ = await self._model(tenant, name)
        return model

    async def list_models(self, caller: Principal, tenant: str, page_size: int,
                          page_token: str) -> tuple[list[pb.Model], str]:
        tenant = await self._tenant(caller, tenant)
        size = validation.check_page_size(page_size)
        after = ""
        if page_token:
            after = decode_page_token(page_token)
            try:
                validation.check_model_name(after)
            except errors.InvalidArgument:
                raise errors.InvalidArgument("page_token is not one this service issued") from None
        models, more = await self.store.list_models(tenant, after, size)
        token = encode_page_token(models[-1].name) if more and models else ""
        return models, token

    async def update_model(self, caller: Principal, tenant: str, name: str, changes: pb.Model,
                           paths: list[str]) -> pb.Model:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(name, "name")
        if not paths:
            raise errors.InvalidArgument("update_mask is empty; name at least one of " + ", ".join(UPDATABLE))
        for path in paths:
            if path not in UPDATABLE:
                raise errors.InvalidArgument(
                    f"update_mask path {path!r} cannot be updated; use " + ", ".join(UPDATABLE)
                    + " (labels change through SetLabel and DeleteLabel)"
                )
        if "description" in paths and len(changes.description) > DESCRIPTION_MAX:
            raise errors.InvalidArgument(f"description is longer than {DESCRIPTION_MAX} characters")
        if "default_version" in paths and changes.default_version < 0:
            raise errors.InvalidArgument("default_version must not be negative")
        if "traffic_split" in paths:
            rules.check_split_shape(changes.traffic_split)
        for _ in range(20):
            snap = await self._snapshot(tenant, name)
            model = snap.model
            if model.HasField("delete_time"):
                raise errors.FailedPrecondition(f"model {name!r} is being deleted")
            live = {v.version: v for v in snap.versions if not v.HasField("delete_time")}
            named: set[int] = set()
            if "default_version" in paths and changes.default_version:
                named.add(changes.default_version)
            if "traffic_split" in paths:
                named.update(t.version for t in changes.traffic_split)
            for number in sorted(named):
                if number not in live:
                    state = "is being deleted" if number in snap.version_revisions else "does not exist"
                    raise errors.FailedPrecondition(f"version {number} of model {name!r} {state}")
            if "description" in paths:
                model.description = changes.description
            if "public" in paths:
                model.public = changes.public
            if "default_version" in paths:
                model.default_version = changes.default_version
            if "traffic_split" in paths:
                del model.traffic_split[:]
                model.traffic_split.extend(changes.traffic_split)
            model.update_time.CopyFrom(ts(self.clock()))
            # The versions named must still be as read (not marked deleted since).
            named_revisions = {n: snap.version_revisions[n] for n in named}
            if await self.store.put_model_if(model, snap.model_revision, named_revisions):
                await self._publish(tenant, name)
                return model
            await asyncio.sleep(0.005)
        raise errors.Conflict(f"model {name!r} changed too often while being updated; retry")

    async def delete_model(self, caller: Principal, tenant: str, name: str) -> pb.Model:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(name, "name")
        marked: list[pb.Model] = []
        now = self.clock()

        def change(kv):
            if kv is None:
                raise errors.NotFound(f"model {name!r} not found in tenant {tenant!r}")
            model = pb.Model.FromString(kv.value)
            if not model.HasField("delete_time"):
                model.delete_time.CopyFrom(ts(now))
                model.update_time.CopyFrom(ts(now))
            marked[:] = [model]
            return model.SerializeToString()

        await self.store.update_model(tenant, name, change)
        # The route goes at once; then every version shows UNLOADING (the
        # reconciler drains versions of a deleted model whether marked or not).
        await self._publish(tenant, name)
        versions, _ = await self.store.list_versions(tenant, name, 0)
        for version in versions:
            await self._mark_version_deleted(tenant, name, version.version, now)
        if self.archive is not None:
            # Archived versions go at once (nothing serves them); an archiver
            # racing this takes its pointer back (the model is marked).
            await self.archive.remove_all(tenant, name)
        return marked[0]

    async def _mark_version_deleted(self, tenant: str, model: str, number: int,
                                    now: float) -> pb.ModelVersion | None:
        result: list[pb.ModelVersion] = []

        def change(kv):
            if kv is None:
                return None
            version = pb.ModelVersion.FromString(kv.value)
            if not version.HasField("delete_time"):
                version.delete_time.CopyFrom(ts(now))
                version.state = S.MODEL_VERSION_STATE_UNLOADING
            result[:] = [version]
            return version.SerializeToString()

        await self.store.update_version(tenant, model, number, change)
        return result[0] if result else None

    # --- versions --------------------------------------------------------------------

    def _normalize(self, given: pb.ModelVersion, tenant: str, caller: Principal) -> pb.ModelVersion:
        if given.version < 0:
            raise errors.InvalidArgument(f"model_version.version must not be negative (got {given.version})")
        if len(given.description) > DESCRIPTION_MAX:
            raise errors.InvalidArgument(f"model_version.description is longer than {DESCRIPTION_MAX} characters")
        self.check_model_uri(given.model_uri, tenant, caller)
        r = given.resources
        for field in ("cpu_millis", "memory_bytes", "gpus"):
            value = getattr(r, field)
            if value < 0:
                raise errors.InvalidArgument(f"model_version.resources.{field} must not be negative (got {value})")
            if value > validation.RESOURCE_BOUNDS[field]:
                raise errors.InvalidArgument(
                    f"model_version.resources.{field} = {value} is beyond the allowed maximum "
                    f"{validation.RESOURCE_BOUNDS[field]}"
                )
        resources = resources_pb2.Resources(
            cpu_millis=r.cpu_millis or self.defaults.cpu_millis,
            memory_bytes=r.memory_bytes or self.defaults.memory_bytes,
            gpus=r.gpus or self.defaults.gpus,
        )
        min_replicas = given.min_replicas or 1
        max_replicas = given.max_replicas or max(min_replicas, 1)
        rules.check_replica_bounds(min_replicas, max_replicas, "model_version.")
        batching = rules.check_batching(given.batching)
        return pb.ModelVersion(
            version=given.version, model_uri=given.model_uri, description=given.description, resources=resources,
            min_replicas=min_replicas, max_replicas=max_replicas, batching=batching,
        )

    def check_model_uri(self, uri: str, tenant: str, caller: Principal | None = None) -> Location:
        """`uri` checked for the version's tenant (services.common.confine:
        local paths inside the tenant's own storage, whoever the caller is;
        remote schemes only when allowed); a local one must hold a SavedModel,
        reached without following any symlink."""
        field = "model_version.model_uri"
        if not uri:
            raise errors.InvalidArgument(f"{field} is required (a SavedModel directory by fsspec URI)")
        if "://" not in uri and not uri.startswith("/"):
            raise errors.InvalidArgument(
                f"{field} {uri!r}: a local path must be absolute (the CLI uploads local directories for you)")
        refuse_http_directory(uri, field)
        where = self.confiner.check(tenant, uri, field)
        if where.local:
            try:
                fd = open_beneath(where.root, where.relative, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                raise errors.InvalidArgument(f"{field} {uri!r}: no such directory") from None
            except OSError as err:
                if err.errno == errno.ENOTDIR:
                    raise errors.InvalidArgument(f"{field} {uri!r}: no such directory") from None
                raise errors.PermissionDenied(
                    f"{field} {uri!r} cannot be reached without following a symlink ({err.strerror})") from None
            try:
                if not any(is_file_at(fd, name) for name in SAVED_MODEL_FILES):
                    raise errors.InvalidArgument(f"{field} {uri!r} is not a SavedModel directory (no saved_model.pb)")
            finally:
                os.close(fd)
        return where

    async def _check_fits_ever(self, tenant: str, version: pb.ModelVersion) -> None:
        want = replica_resources(version)
        limits = await self.auth.limits(tenant)
        labels = {"cpu_millis": "cpu (millicores)", "memory_bytes": "memory (bytes)", "gpus": "gpus",
                  "model_replicas": "model replicas"}
        for field, label in labels.items():
            if getattr(want, field) > getattr(limits, field):
                raise errors.ResourceExhausted(
                    f"one replica can never fit tenant {tenant!r}'s quota: {label} requested "
                    f"{getattr(want, field)} > limit {getattr(limits, field)}"
                )
        if self.runtime is not None:
            try:
                self.runtime.check_fits_ever([replica_amount(version)])
            except Unschedulable as err:
                raise errors.ResourceExhausted(f"one replica can never fit the runtime: {err}") from None

    async def create_version(self, caller: Principal, tenant: str, model: str,
                             given: pb.ModelVersion) -> tuple[pb.ModelVersion, bool]:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(model, "model")
        spec = await asyncio.to_thread(self._normalize, given, tenant, caller)
        checked = False
        for _ in range(20):
            snap = await self._snapshot(tenant, model)
            if snap.model.HasField("delete_time"):
                raise errors.FailedPrecondition(f"model {model!r} is being deleted")
            highest, counter_revision = await self.store.get_counter(tenant, model)
            number = spec.version
            if number:
                existing = next((v for v in snap.versions if v.version == number), None)
                if existing is not None:
                    if existing.HasField("delete_time"):
                        raise errors.FailedPrecondition(
                            f"version {number} of model {model!r} is being deleted; create it again once it is gone"
                        )
                    if spec_of(existing) == spec_of(spec):
                        return existing, False
                    raise errors.AlreadyExists(f"version {number} of model {model!r} exists with a different spec")
                archived = await self._archived(snap.model, number)
                if archived is not None:
                    # Read after the counter: an archiver moving it since then
                    # moved the counter too, so the create below fails and retries.
                    if spec_of(archived.version) == spec_of(spec):
                        return archived.version, False
                    raise errors.AlreadyExists(f"version {number} of model {model!r} exists (archived) "
                                               "with a different spec")
            else:
                number = max([highest] + [v.version for v in snap.versions]) + 1
                if number > MAX_VERSION:
                    raise errors.FailedPrecondition(f"model {model!r} has used every version number")
            if not checked:
                await self._check_fits_ever(tenant, spec)
                checked = True
            version = pb.ModelVersion()
            version.CopyFrom(spec)
            version.model, version.tenant, version.version = model, tenant, number
            version.state = S.MODEL_VERSION_STATE_START
            version.desired_replicas = version.min_replicas
            version.create_time.CopyFrom(ts(self.clock()))
            if await self.store.create_version(version, snap.model_revision, highest, counter_revision):
                await self._publish(tenant, model)
                return version, True
            await asyncio.sleep(0.005)
        raise errors.Conflict(f"model {model!r} changed too often while creating a version; retry")

    async def get_version(self, caller: Principal, tenant: str, model: str, number: int) -> pb.ModelVersion:
        return await self._stored_version(await self._tenant(caller, tenant), model, number)

    async def _stored_version(self, tenant: str, model: str, number: int) -> pb.ModelVersion:
        version, _ = await self._find_version(tenant, model, number)
        return version

    async def _find_version(self, tenant: str, model: str, number: int
                            ) -> tuple[pb.ModelVersion, ArchivedVersion | None]:
        """A version from etcd, else from the archive (then also returned whole, with its exports)."""
        validation.check_model_name(model, "model")
        if number <= 0:
            raise errors.InvalidArgument(f"version must be >= 1 (got {number})")
        version = await self.store.get_version(tenant, model, number)
        if version is not None:
            return version, None
        record, _ = await self._model(tenant, model)  # NOT_FOUND for the model first
        archived = await self._archived(record, number)
        if archived is None:
            raise errors.NotFound(f"version {number} of model {model!r} not found")
        return archived.version, archived

    async def _archived(self, model: pb.Model, number: int) -> ArchivedVersion | None:
        return await self.archive.get(model, number) if self.archive is not None else None

    async def list_versions(self, caller: Principal, tenant: str, model: str, page_size: int,
                            page_token: str) -> tuple[list[pb.ModelVersion], str]:
        tenant = await self._tenant(caller, tenant)
        record, _ = await self._model(tenant, model)
        size = validation.check_page_size(page_size)
        after = 0
        if page_token:
            token = decode_page_token(page_token)
            if not token.isdigit():
                raise errors.InvalidArgument("page_token is not one this service issued")
            after = int(token)
        # The token is a version number, so it stays good while versions move to the archive.
        versions, more = await self.store.list_versions(tenant, model, after, size)
        if self.archive is not None:
            archived, more_archived = await self.archive.page(record, after, size)
            merged = {v.version: v for v in archived}
            merged.update((v.version, v) for v in versions)  # live and archived at once (a move cut short): live
            versions = [merged[n] for n in sorted(merged)]
            more = more or more_archived or len(versions) > size
            versions = versions[:size]
        token = encode_page_token(str(versions[-1].version)) if more and versions else ""
        return versions, token

    async def delete_version(self, caller: Principal, tenant: str, model: str, number: int) -> pb.ModelVersion:
        tenant = await self._tenant(caller, tenant)
        for _ in range(20):
            snap = await self._snapshot(tenant, model)
            if number not in snap.version_revisions and self.archive is not None:
                archived = await self.archive.remove(snap.model, number)
                if archived is not None:
                    # Nothing serves it and nothing names it (else it had not
                    # been archived): it is gone at once.
                    version = archived.version
                    version.delete_time.CopyFrom(ts(self.clock()))
                    version.state = S.MODEL_VERSION_STATE_UNLOADING
                    return version
            version = self._version_of(snap, number)
            if version.HasField("delete_time"):
                return version
            m = snap.model
            refs = [f"label {label!r}" for label, v in sorted(m.labels.items()) if v == number]
            if m.default_version == number:
                refs.append("default_version")
            if any(t.version == number for t in m.traffic_split):
                refs.append("the traffic split")
            if refs:
                raise errors.FailedPrecondition(
                    f"version {number} of model {model!r} is still named by {', '.join(refs)}; move them first"
                )
            version.delete_time.CopyFrom(ts(self.clock()))
            version.state = S.MODEL_VERSION_STATE_UNLOADING
            if await self.store.put_version_if(version, snap.model_revision, snap.version_revisions[number]):
                await self._publish(tenant, model)
                return version
            await asyncio.sleep(0.005)
        raise errors.Conflict(f"model {model!r} changed too often while deleting a version; retry")

    # --- labels and scaling ------------------------------------------------------------

    async def set_label(self, caller: Principal, tenant: str, model: str, label: str, number: int,
                        allow_unavailable: bool) -> pb.Model:
        tenant = await self._tenant(caller, tenant)
        rules.check_label(label)
        if number <= 0:
            raise errors.InvalidArgument(f"version must be >= 1 (got {number})")
        for _ in range(20):
            snap = await self._snapshot(tenant, model)
            m = snap.model
            if m.HasField("delete_time"):
                raise errors.FailedPrecondition(f"model {model!r} is being deleted")
            version = next((v for v in snap.versions if v.version == number), None)
            if version is None:
                raise errors.FailedPrecondition(f"version {number} of model {model!r} does not exist")
            if version.HasField("delete_time"):
                raise errors.FailedPrecondition(f"version {number} of model {model!r} is being deleted")
            if version.state != S.MODEL_VERSION_STATE_AVAILABLE and not allow_unavailable:
                raise errors.FailedPrecondition(
                    f"version {number} of model {model!r} is {S.Name(version.state)[len('MODEL_VERSION_STATE_'):]}, "
                    "not AVAILABLE; a label can only point at an available version (or set allow_unavailable)"
                )
            if m.labels.get(label) == number:
                return m
            m.labels[label] = number
            m.update_time.CopyFrom(ts(self.clock()))
            if await self.store.put_model_if(m, snap.model_revision, {number: snap.version_revisions[number]}):
                await self._publish(tenant, model)
                return m
            await asyncio.sleep(0.005)
        raise errors.Conflict(f"model {model!r} changed too often while setting a label; retry")

    async def delete_label(self, caller: Principal, tenant: str, model: str, label: str) -> pb.Model:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(model, "model")
        result: list[pb.Model] = []
        changed = [False]

        def change(kv):
            if kv is None:
                raise errors.NotFound(f"model {model!r} not found in tenant {tenant!r}")
            m = pb.Model.FromString(kv.value)
            result[:] = [m]
            if label not in m.labels:
                changed[0] = False
                return kv.value
            del m.labels[label]
            m.update_time.CopyFrom(ts(self.clock()))
            changed[0] = True
            return m.SerializeToString()

        await self.store.update_model(tenant, model, change)
        if changed[0]:
            await self._publish(tenant, model)
        return result[0]

    async def scale_version(self, caller: Principal, tenant: str, model: str, number: int, min_replicas: int,
                            max_replicas: int) -> pb.ModelVersion:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(model, "model")
        rules.check_replica_bounds(min_replicas, max_replicas)
        if number <= 0:
            raise errors.InvalidArgument(f"version must be >= 1 (got {number})")
        result: list[pb.ModelVersion] = []

        def change(kv):
            if kv is None:
                raise errors.NotFound(f"version {number} of model {model!r} not found")
            version = pb.ModelVersion.FromString(kv.value)
            if version.HasField("delete_time"):
                raise errors.FailedPrecondition(f"version {number} of model {model!r} is being deleted")
            version.min_replicas, version.max_replicas = min_replicas, max_replicas
            version.desired_replicas = min(max(version.desired_replicas, min_replicas), max_replicas)
            result[:] = [version]
            return version.SerializeToString()

        try:
            await self.store.update_version(tenant, model, number, change)
        except errors.NotFound:
            await self._model(tenant, model)
            raise
        return result[0]

    # --- watching -----------------------------------------------------------------------

    async def watch_model(self, caller: Principal, tenant: str, name: str) -> AsyncIterator[
            tuple[pb.Model, list[pb.ModelVersion]]]:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(name, "name")
        changed = asyncio.Event()
        model_key = self.keys.model(tenant, name)

        def on_reset(items, revision):
            changed.set()

        def on_model_event(event):
            if event.kv.key == model_key:
                changed.set()

        watchers = [
            PrefixWatcher(self.etcd, model_key, on_reset, on_model_event),
            PrefixWatcher(self.etcd, self.keys.versions_of(tenant, name), on_reset, lambda event: changed.set()),
        ]
        tasks = [asyncio.create_task(w.run()) for w in watchers]
        try:
            for watcher in watchers:
                await asyncio.wait_for(watcher.synced.wait(), 10)
            last = None
            while True:
                changed.clear()
                snap = await self.store.snapshot(tenant, name)
                if snap.model is None:
                    raise errors.NotFound(f"model {name!r} not found in tenant {tenant!r}")
                current = (snap.model.SerializeToString(deterministic=True),
                           tuple(v.SerializeToString(deterministic=True) for v in snap.versions))
                if current != last:
                    last = current
                    yield snap.model, snap.versions
                await changed.wait()
        except asyncio.TimeoutError:
            raise errors.Unavailable("etcd did not answer the watch; retry") from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- uploads ------------------------------------------------------------------------

    async def upload_location(self, caller: Principal, tenant: str, model: str, number: int) -> str:
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(model, "model")
        if number < 0:
            raise errors.InvalidArgument(f"version must not be negative (got {number})")
        if not self.storage_root:
            raise errors.FailedPrecondition("this platform has no storage configured; pass a model URI")
        leaf = str(number) if number else os.path.join("uploads", secrets.token_hex(8))
        return "file://" + os.path.join(self.storage_root, tenant, "models", model, leaf) + "/"

    async def upload_model(self, caller: Principal, tenant: str, model: str, chunks) -> Stored:
        """Stores a SavedModel directory streamed by the caller in the
        tenant's storage (services.common.uploads) and returns where."""
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(model, "model")
        if self.uploads is None:
            raise errors.FailedPrecondition("this platform has no storage configured; pass a model URI")
        return await self.uploads.receive_tree(tenant, ("models", model), chunks, required=SAVED_MODEL_FILES)
