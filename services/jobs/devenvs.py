"""Dev environments: a tenant's JupyterLab servers as managed replicas.

Owned by the jobs service for the reasons TensorBoards are
(`services.jobs.tensorboards`): a notebook server is a replica of its tenant
placed through the same `Runtime` (capacity, the tenant's own unprivileged
user, adoption after a restart by the leader) and holding the tenant's quota
through the same reservations. The pieces TensorBoards built are reused:
the socket directory, the readiness probe, the replica stop, the page
resolution for the gateway.

Layout

    /cloudml/jobs/devenvs/<tenant>/<name>        JSON `Env` (below), compare-and-swap writes
    DIR/devenvs/<tenant>/<name>.<uid>/           root-owned, the tenant's group (0750)
        config.json                              the env's access key (root's, 0640): CLOUDML_CONFIG
        server.log                               the replica's output
        home/                                    HOME of the server and its kernels (the tenant's)
    DIR/storage/<tenant>/                        the working directory (notebooks live here)

Quota: `jobs/devenv/<name>/<uid>` holds `dev_environments: 1` from create
to delete; `.../run` holds cpu/memory/gpus while it runs (reserved by
create and start, in the API call, so an over-quota answer is immediate and
nothing is left behind; released by the leader when the server is stopped).

Credentials: create makes an access key *of the tenant* (never the
platform's) through the auth service and writes it to config.json; delete
revokes it. The secret is on disk only, never in etcd. The server's Jupyter
token is an HMAC of the env's uid under a key in `DIR/secrets/` (so nothing
stores it); only the gateway sends it (`ResolvePage.authorization`).

Runtimes: on `local` the replica is a process of the tenant's user on a
Unix socket (below). On `kubernetes` it is a Pod of the platform's image
(or the env's `image`), on TCP at the Pod's IP, its keys in a Secret of its
own: services.jobs.devenv_kube says how and why. Records and settings:
services.jobs.devenv_records.

The leader (`lead`) each pass: STARTING -> runtime capacity, start
`services.jobs.devenv_replica`, RUNNING once its socket answers (a Pod:
once it is Ready, at `http://POD_IP:PORT`; a RUNNING env whose Pod is not
Ready goes back to STARTING); RUNNING
whose server ended -> restarted (STARTING); idle (no page request through
the gateway and no kernel activity for `idle_seconds`) -> STOPPING;
STOPPING -> stop, release capacity and the run quota -> STOPPED; DELETING
-> the same, then revoke the key, release the count, remove the record.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import time
from datetime import datetime

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import dev_environments_pb2 as pb
from services.common import errors, validation
from services.common.etcd import Etcd, cmp_absent, op_put
from services.common.runtime.base import (
    Amount, CapacityBusy, ReplicaPhase, ReplicaRequest, Runtime, Unschedulable)
from services.common.sockets import pinned_address, socket_root, tenant_socket_dir
from services.common.tokens import Principal
from services.jobs.devenv_kube import pod_request, read_config, server_json
from services.jobs.devenv_records import RUNTIME_PREFIX, DevEnvSettings, Env, S, quota_error, socket_name
from services.jobs.logs import timestamp
from services.jobs.tensorboards import PROJECT_ROOT, TensorBoards, stop_replica

log = logging.getLogger(__name__)

PREFIX = "/cloudml/jobs/devenvs/"
ACCESS_WRITE_SECONDS = 30.0
RESERVE_SECONDS = 60.0
LOG_FILE = "server.log"
ORPHAN_SWEEP_PASSES = 30


class DevEnvironments:
    def __init__(self, etcd: Etcd, quota, runtime: Runtime, settings: DevEnvSettings, clock=time.time,
                 prefix: str = PREFIX):
        self.etcd = etcd
        self.quota = quota
        self.runtime = runtime
        self.settings = settings
        self.clock = clock
        self.prefix = prefix
        self.tenancy = getattr(runtime, "tenancy", None)
        #: replicas are Pods (kubernetes): TCP on the Pod's IP while Ready (services.jobs.devenv_kube)
        self.pods = bool(getattr(runtime, "reports_readiness", False))
        self._accessed: dict[str, float] = {}
        self._starting: dict[str, float] = {}
        self._token_key: bytes | None = None

    def _key(self, tenant: str, name: str) -> str:
        return f"{self.prefix}{tenant}/{name}"

    # --- the API ----------------------------------------------------------------------------

    @staticmethod
    def _tenant(caller: Principal, tenant: str, name: str = "") -> str:
        tenant = tenant or caller.tenant
        validation.check_name(tenant, "tenant")
        if not caller.may_access(tenant):
            raise errors.NotFound(f"dev environment {name!r} not found" if name else f"tenant {tenant!r} not found")
        return tenant

    async def _get(self, tenant: str, name: str) -> Env | None:
        kv = await self.etcd.get(self._key(tenant, name))
        return Env.decode(kv.value) if kv else None

    async def _load(self, caller: Principal, tenant: str, name: str) -> Env:
        validation.check_name(name, "name")
        tenant = self._tenant(caller, tenant, name)
        env = await self._get(tenant, name)
        if env is None:
            raise errors.NotFound(f"dev environment {name!r} not found in tenant {tenant!r}")
        return env

    async def _all(self, tenant: str = "") -> list[Env]:
        kvs, _, _ = await self.etcd.get_prefix(self.prefix + (f"{tenant}/" if tenant else ""))
        return [Env.decode(kv.value) for kv in kvs]

    def _amount(self, resources) -> Amount:
        validation.check_resources(resources, "resources")
        for field in ("train_jobs", "model_replicas", "studies", "dev_environments", "tensorboards"):
            if getattr(resources, field):
                raise errors.InvalidArgument(f"resources.{field} must be 0 (only cpu_millis, memory_bytes, gpus apply)")
        return Amount(cpu_millis=resources.cpu_millis or self.settings.cpu_millis,
                      memory_bytes=resources.memory_bytes or self.settings.memory_bytes, gpus=resources.gpus)

    async def create(self, caller: Principal, tenant: str, name: str, resources, image: str) -> pb.DevEnvironment:
        validation.check_name(name, "name")
        tenant = self._tenant(caller, tenant)
        amount = self._amount(resources)
        if self.runtime.name not in ("local", "kubernetes"):
            raise errors.FailedPrecondition(f"the {self.runtime.name} runtime cannot run dev environments")
        if image and self.pods:
            if len(image) > 512 or not image.isprintable() or any(c.isspace() for c in image):
                raise errors.InvalidArgument(f"image {image[:80]!r} is not an image reference")
        elif image:
            raise errors.InvalidArgument(
                "the local runtime runs dev environments in the platform's own Python environment "
                "(SDK, TensorFlow, JupyterLab) and cannot run an image: drop --image")
        try:
            self.runtime.check_fits_ever([amount])
        except Unschedulable as err:
            raise errors.ResourceExhausted(f"a dev environment of that size cannot fit the runtime: {err}") from None
        if await self._get(tenant, name) is not None:
            raise errors.AlreadyExists(f"dev environment {name!r} already exists in tenant {tenant!r}")
        now = self.clock()
        env = Env(tenant=tenant, name=name, uid=secrets.token_hex(4), cpu_millis=amount.cpu_millis,
                  memory_bytes=amount.memory_bytes, gpus=amount.gpus, image=image, created=now, last_activity=now,
                  message="reserving quota", reserved=False)
        key = self._key(tenant, name)
        ok, _ = await self.etcd.txn([cmp_absent(key)], [op_put(key, env.encode())])
        if not ok:
            raise errors.AlreadyExists(f"dev environment {name!r} already exists in tenant {tenant!r}")
        undo: list = [lambda: self.etcd.delete(key)]
        try:
            try:
                await self.quota.reserve(tenant, env.owner_id, resources_pb2.Resources(dev_environments=1))
            except (errors.QuotaBusy, errors.ResourceExhausted):  # the count is full: no waiting helps
                raise errors.ResourceExhausted(f"tenant {tenant!r} has all the dev environments its quota allows "
                                               "(`cloudml quota get`): delete one first") from None
            undo.append(lambda: self.quota.release(tenant, env.owner_id))
            await self._reserve_run(env)
            undo.append(lambda: self.quota.release(tenant, env.run_owner_id))
            key_id, secret = await self.quota.create_access_key(tenant, f"dev environment {name} ({env.uid})")
            undo.append(lambda: self.quota.revoke_access_key(tenant, key_id))
            await asyncio.to_thread(self._write_config, env, key_id, secret)
        except BaseException:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    await step()
            raise
        stored = await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, "starting", reserved=True,
                                 access_key_id=key_id)
        return self.message(stored or env)

    async def _reserve_run(self, env: Env) -> None:
        try:
            await self.quota.reserve(env.tenant, env.run_owner_id, resources_pb2.Resources(
                cpu_millis=env.cpu_millis, memory_bytes=env.memory_bytes, gpus=env.gpus))
        except errors.CloudMLError as err:
            raise quota_error(env.tenant, f"a running dev environment ({env.cpu_millis}m CPU, "
                               f"{env.memory_bytes >> 20} MiB, {env.gpus} GPUs)", err) from None

    async def get(self, caller: Principal, tenant: str, name: str) -> pb.DevEnvironment:
        return self.message(await self._load(caller, tenant, name))

    async def list(self, caller: Principal, tenant: str) -> list[pb.DevEnvironment]:
        tenant = self._tenant(caller, tenant)
        return [self.message(e) for e in sorted(await self._all(tenant), key=lambda e: e.name)]

    async def stop(self, caller: Principal, tenant: str, name: str) -> pb.DevEnvironment:
        env = await self._load(caller, tenant, name)
        if env.state in (S.DEV_ENVIRONMENT_STATE_STARTING, S.DEV_ENVIRONMENT_STATE_RUNNING):
            env = await self._set(env, S.DEV_ENVIRONMENT_STATE_STOPPING, "stopping (asked)") or env
        elif env.state == S.DEV_ENVIRONMENT_STATE_DELETING:
            raise errors.FailedPrecondition(f"dev environment {name!r} is being deleted")
        return self.message(env)

    async def start(self, caller: Principal, tenant: str, name: str) -> pb.DevEnvironment:
        env = await self._load(caller, tenant, name)
        if env.state in (S.DEV_ENVIRONMENT_STATE_STARTING, S.DEV_ENVIRONMENT_STATE_RUNNING):
            return self.message(env)
        if env.state != S.DEV_ENVIRONMENT_STATE_STOPPED and env.state != S.DEV_ENVIRONMENT_STATE_FAILED:
            raise errors.FailedPrecondition(
                f"dev environment {name!r} is {S.Name(env.state)[len('DEV_ENVIRONMENT_STATE_'):].lower()}: "
                "start it once it is STOPPED")
        await self._reserve_run(env)
        now = self.clock()
        stored = await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, "starting", last_activity=now,
                                 only_from=(S.DEV_ENVIRONMENT_STATE_STOPPED, S.DEV_ENVIRONMENT_STATE_FAILED))
        if stored is None or stored.state != S.DEV_ENVIRONMENT_STATE_STARTING or stored.uid != env.uid:
            await self.quota.release(env.tenant, env.run_owner_id)
            raise errors.Conflict(f"dev environment {name!r} changed meanwhile: try again")
        return self.message(stored)

    async def delete(self, caller: Principal, tenant: str, name: str) -> None:
        env = await self._load(caller, tenant, name)
        await self._set(env, S.DEV_ENVIRONMENT_STATE_DELETING, "deleting")

    async def resolve(self, caller: Principal, tenant: str, name: str) -> tuple[str, str]:
        """(address, Authorization header for the server) of a RUNNING env
        (NOT_FOUND otherwise); marks it used."""
        env = await self._load(caller, tenant, name)
        if env.state != S.DEV_ENVIRONMENT_STATE_RUNNING or not env.address:
            raise errors.NotFound(f"dev environment {name!r} is not running")
        now = self.clock()
        if now - max(env.last_activity, self._accessed.get(env.replica_id, 0.0)) >= ACCESS_WRITE_SECONDS:
            self._accessed[env.replica_id] = now
            await self._touch(env, now)
        # The platform's own link to its socket (services.common.sockets.pin_socket), as for TensorBoards.
        address = await pinned_address(env.address, socket_root(self.settings.data_dir), env.tenant, self.tenancy)
        if address is None:
            raise errors.Unavailable(f"dev environment {name!r} cannot be reached: its socket is not its tenant's")
        return address, f"token {self.jupyter_token(env)}"

    async def _touch(self, env: Env, when: float) -> None:
        def touch(kv):
            if kv is None:
                return None
            current = Env.decode(kv.value)
            if current.uid != env.uid or current.last_activity >= when:
                return kv.value
            current.last_activity = when
            return current.encode()

        with contextlib.suppress(errors.CloudMLError):
            await self.etcd.update(self._key(env.tenant, env.name), touch)

    def message(self, env: Env) -> pb.DevEnvironment:
        out = pb.DevEnvironment(
            tenant=env.tenant, name=env.name, uid=env.uid, state=env.state, path=env.path, image=env.image,
            working_dir="file://" + self._storage(env.tenant), access_key_id=env.access_key_id,
            resources=resources_pb2.Resources(cpu_millis=env.cpu_millis, memory_bytes=env.memory_bytes,
                                              gpus=env.gpus),
            create_time=timestamp(env.created), last_activity_time=timestamp(env.last_activity),
            idle_stop_seconds=int(self.settings.idle_seconds), message=env.message)
        if env.state in (S.DEV_ENVIRONMENT_STATE_STARTING, S.DEV_ENVIRONMENT_STATE_RUNNING):
            out.idle_stop_time.CopyFrom(timestamp(env.last_activity + self.settings.idle_seconds))
        return out

    async def _set(self, env: Env, state: int, message: str, only_from=None, **changes) -> Env | None:
        """Compare-and-swap of one env's state (never out of DELETING, never
        onto another uid; with `only_from`, only from those states)."""
        result: list[Env | None] = [None]

        def change(kv):
            if kv is None:
                return None
            current = Env.decode(kv.value)
            result[0] = current
            if current.uid != env.uid:
                return kv.value
            if current.state == S.DEV_ENVIRONMENT_STATE_DELETING and state != S.DEV_ENVIRONMENT_STATE_DELETING:
                return kv.value
            if only_from is not None and current.state not in only_from:
                return kv.value
            current.state, current.message = state, message
            for name, value in changes.items():
                setattr(current, name, value)
            return current.encode()

        await self.etcd.update(self._key(env.tenant, env.name), change)
        return result[0]

    # --- files and secrets ----------------------------------------------------------------------

    def _storage(self, tenant: str) -> str:
        return os.path.join(self.settings.data_dir, "storage", tenant)

    def _env_dir(self, env: Env) -> str:
        return os.path.join(self.settings.data_dir, "devenvs", env.tenant, f"{env.name}.{env.uid}")

    def _gate(self, path: str, tenant: str, mode: int) -> None:
        if self.tenancy is not None and self.tenancy.enabled:
            self.tenancy.gate(path, tenant, mode)
        else:
            os.makedirs(path, mode=0o700, exist_ok=True)

    def _write_config(self, env: Env, key_id: str, secret: str) -> None:
        """DIR/devenvs/<tenant>/<name>.<uid>/config.json: root's, readable by the tenant's group. Blocking."""
        base = os.path.join(self.settings.data_dir, "devenvs")
        os.makedirs(base, mode=0o711, exist_ok=True)
        self._gate(os.path.join(base, env.tenant), env.tenant, 0o710)
        self._gate(self._env_dir(env), env.tenant, 0o750)
        data = {"endpoint": self.settings.endpoint, "rest_endpoint": self.settings.rest_endpoint,
                "access_key": key_id, "secret_key": secret}
        path = os.path.join(self._env_dir(env), "config.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            account = self.tenancy.account(env.tenant) if self.tenancy is not None and self.tenancy.enabled else None
            if account is not None:
                os.fchown(f.fileno(), 0, account.gid)
                os.fchmod(f.fileno(), 0o640)
            json.dump({k: v for k, v in data.items() if v}, f)

    def jupyter_token(self, env: Env) -> str:
        if self._token_key is None:
            self._token_key = self._load_token_key()
        return hmac.new(self._token_key, f"{env.tenant}/{env.name}/{env.uid}".encode(), hashlib.sha256).hexdigest()

    def _load_token_key(self) -> bytes:
        directory = os.path.join(self.settings.data_dir, "secrets")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, "devenv-token.key")
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        with open(path, "rb") as f:
            key = f.read()
        if len(key) != 32:
            raise errors.Unavailable(f"{path} is not a 32-byte key")
        return key

    def _prepare(self, env: Env) -> tuple[str, str, str]:
        """(home, socket path, working dir), created for the tenant. Blocking."""
        storage = os.path.join(self.settings.data_dir, "storage")
        os.makedirs(storage, exist_ok=True)
        own = self._storage(env.tenant)
        if self.tenancy is not None and self.tenancy.enabled:
            os.chmod(storage, 0o711)
            self.tenancy.own_dir(own, env.tenant)
        else:
            os.makedirs(own, mode=0o700, exist_ok=True)
        sockets = tenant_socket_dir(socket_root(self.settings.data_dir), env.tenant, self.tenancy)
        return os.path.join(self._env_dir(env), "home"), os.path.join(sockets, socket_name(env)), own

    # --- the leader ----------------------------------------------------------------------------

    async def lead(self) -> None:
        """Reconciles until cancelled (this process stopped leading)."""
        adopted = [s for s in await self.runtime.adopt() if s.replica_id.startswith(RUNTIME_PREFIX)]
        log.info("dev environments: leading; %d replica(s) adopted", len(adopted))
        rounds = 0
        while True:
            try:
                await self.reconcile(sweep=rounds % ORPHAN_SWEEP_PASSES == 0)
            except errors.CloudMLError as err:
                log.info("dev environment pass interrupted: %s", err.message)
            except Exception:  # noqa: BLE001 - keep reconciling whatever happens
                log.exception("dev environment pass failed")
            rounds += 1
            # While a server starts, passes come every 0.1 s: it is RUNNING as soon as it answers.
            await asyncio.sleep(min(0.1, self.settings.pass_seconds) if self._starting else self.settings.pass_seconds)

    async def reconcile(self, sweep: bool = True) -> None:
        envs = await self._all()
        if sweep:
            running = {e.replica_id for e in envs if e.state in (
                S.DEV_ENVIRONMENT_STATE_STARTING, S.DEV_ENVIRONMENT_STATE_RUNNING, S.DEV_ENVIRONMENT_STATE_STOPPING)}
            for status in await self.runtime.adopt():
                if status.replica_id.startswith(RUNTIME_PREFIX) and status.replica_id not in running:
                    log.warning("stopping dev environment replica %s of no running record", status.replica_id)
                    await self._stop_replica(status.replica_id)
        for env in envs:
            try:
                await self._reconcile_one(env)
            except errors.CloudMLError as err:
                log.info("dev environment %s/%s: %s", env.tenant, env.name, err.message)

    async def _reconcile_one(self, env: Env) -> None:
        now = self.clock()
        if env.state == S.DEV_ENVIRONMENT_STATE_DELETING:
            await self._stop_replica(env.replica_id)
            await self.quota.release(env.tenant, env.run_owner_id)
            if env.access_key_id:
                with contextlib.suppress(errors.NotFound):
                    await self.quota.revoke_access_key(env.tenant, env.access_key_id)
            await self.quota.release(env.tenant, env.owner_id)
            await asyncio.to_thread(shutil.rmtree, self._env_dir(env), True)
            await self.etcd.delete(self._key(env.tenant, env.name))
            log.info("dev environment %s/%s deleted", env.tenant, env.name)
            return
        if not env.reserved:
            if now - env.created > RESERVE_SECONDS:
                await self._set(env, S.DEV_ENVIRONMENT_STATE_DELETING, "its creation did not finish")
            return
        if env.state == S.DEV_ENVIRONMENT_STATE_STOPPING:
            await self._stop_replica(env.replica_id)
            await self.quota.release(env.tenant, env.run_owner_id)
            self._starting.pop(env.replica_id, None)
            await self._set(env, S.DEV_ENVIRONMENT_STATE_STOPPED, env.message.replace("stopping", "stopped", 1),
                            address="")
            return
        if env.state == S.DEV_ENVIRONMENT_STATE_RUNNING and now - env.last_activity >= self.settings.idle_seconds:
            seen = await self._kernel_activity(env)
            if seen is not None and now - seen < self.settings.idle_seconds:
                await self._touch(env, seen)
                return
            await self._set(env, S.DEV_ENVIRONMENT_STATE_STOPPING,
                            f"stopping: idle for {_duration(self.settings.idle_seconds)} "
                            "(no page request or kernel activity)")
            return
        if env.state not in (S.DEV_ENVIRONMENT_STATE_STARTING, S.DEV_ENVIRONMENT_STATE_RUNNING):
            return
        status = await self.runtime.status(env.replica_id)
        if env.state == S.DEV_ENVIRONMENT_STATE_STARTING:
            if status.phase != ReplicaPhase.RUNNING:
                if env.replica_id in self._starting and status.ended:
                    await self._fail(env, status)
                    return
                await self._start(env)
                return
            if self.pods:
                await self._pod_started(env, status, now)
            elif await TensorBoards._answers(env.address):
                self._starting.pop(env.replica_id, None)
                await self._set(env, S.DEV_ENVIRONMENT_STATE_RUNNING, "running")
            elif now - self._starting.setdefault(env.replica_id, now) > self.settings.start_timeout:
                await self._stop_replica(env.replica_id)
                await self._failed(env, f"its server did not answer within {self.settings.start_timeout:g} s")
        elif self.pods and status.phase == ReplicaPhase.RUNNING and not status.ready:
            await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, f"its Pod is not ready: {status.message}",
                            address="", only_from=(S.DEV_ENVIRONMENT_STATE_RUNNING,))
        elif status.phase != ReplicaPhase.RUNNING:
            # A server that ended while running (killed, over its memory, the
            # machine restarted) comes back: its files are in the tenant's storage.
            detail = ": ".join(filter(None, (status.reason, status.message))) or "ended"
            await self._stop_replica(env.replica_id)
            await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, f"restarting: its server {detail}")

    async def _pod_started(self, env: Env, status, now: float) -> None:
        """STARTING on a Pod: RUNNING at http://POD_IP:PORT once it is Ready;
        the start timeout counts from when it left Pending (an image pull,
        the cluster's scheduler can take longer)."""
        if status.ready and status.address:
            self._starting.pop(env.replica_id, None)
            await self._set(env, S.DEV_ENVIRONMENT_STATE_RUNNING, "running", address=f"http://{status.address}",
                            only_from=(S.DEV_ENVIRONMENT_STATE_STARTING,))
        elif status.message.startswith("Pending"):
            self._starting[env.replica_id] = now
            if env.message != status.message:
                await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, status.message,
                                only_from=(S.DEV_ENVIRONMENT_STATE_STARTING,))
        elif now - self._starting.setdefault(env.replica_id, now) > self.settings.start_timeout:
            await self._stop_replica(env.replica_id)
            await self._failed(env, f"its Pod was not ready within {self.settings.start_timeout:g} s "
                               f"({status.message})")

    async def _fail(self, env: Env, status) -> None:
        detail = status.message or status.reason or "ended"
        tail = await asyncio.to_thread(self._log_tail, env)
        await self._stop_replica(env.replica_id)
        await self._failed(env, f"its server {detail}" + (f": {tail}" if tail else ""))

    async def _failed(self, env: Env, message: str) -> None:
        self._starting.pop(env.replica_id, None)
        await self.quota.release(env.tenant, env.run_owner_id)
        await self._set(env, S.DEV_ENVIRONMENT_STATE_FAILED, message, address="")

    def _log_tail(self, env: Env) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self._env_dir(env), LOG_FILE), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 300))
            lines = f.read().decode(errors="replace").strip().splitlines()
            return lines[-1][:300] if lines else ""
        return ""

    async def _start(self, env: Env) -> None:
        amount = Amount(cpu_millis=env.cpu_millis, memory_bytes=env.memory_bytes, gpus=env.gpus)
        try:
            self.runtime.reserve(env.replica_id, [amount])
        except Unschedulable as err:
            await self._failed(env, f"cannot fit the runtime: {err}")
            return
        except CapacityBusy as err:
            await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, f"waiting for capacity: {err}")
            return
        if self.pods:
            await self._start_pod(env)
            return
        home, sock, workdir = await asyncio.to_thread(self._prepare, env)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        stored = await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, "starting its server",
                                 address=f"unix:{sock}", started=self.clock(),
                                 only_from=(S.DEV_ENVIRONMENT_STATE_STARTING,))
        if stored is None or stored.uid != env.uid or stored.state != S.DEV_ENVIRONMENT_STATE_STARTING:
            self.runtime.release(env.replica_id)
            return
        python = self.settings.python or "python3"
        argv = [python, "-m", "services.jobs.devenv_replica", "--socket", sock, "--base-url", env.path,
                "--root-dir", workdir]
        request = ReplicaRequest(
            replica_id=env.replica_id, group=env.replica_id, argv=argv,
            env={"PYTHONPATH": PROJECT_ROOT, "PYTHONUNBUFFERED": "1", "HOME": home, "TMPDIR": home,
                 "PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
                 "CLOUDML_CONFIG": os.path.join(self._env_dir(env), "config.json"),
                 "CLOUDML_TENANT": env.tenant, "TF_CPP_MIN_LOG_LEVEL": "2",
                 "CLOUDML_JUPYTER_TOKEN": self.jupyter_token(env)},
            workdir=home, log_path=os.path.join(self._env_dir(env), LOG_FILE), resources=amount,
            tenant=env.tenant)
        self._starting[env.replica_id] = self.clock()
        status = await self.runtime.start(request)
        log.info("dev environment %s/%s: replica %s started (pid %s) on %s", env.tenant, env.name,
                 env.replica_id, status.pid, sock)

    async def _start_pod(self, env: Env) -> None:
        """Starts the env's Pod (services.jobs.devenv_kube); capacity is reserved."""
        try:
            await asyncio.to_thread(os.makedirs, self._storage(env.tenant), 0o700, True)
            config = await asyncio.to_thread(read_config, os.path.join(self._env_dir(env), "config.json"))
        except (OSError, ValueError) as err:
            self.runtime.release(env.replica_id)
            await self._failed(env, f"cannot read its configuration: {err}")
            return
        stored = await self._set(env, S.DEV_ENVIRONMENT_STATE_STARTING, "starting its Pod", address="",
                                 started=self.clock(), only_from=(S.DEV_ENVIRONMENT_STATE_STARTING,))
        if stored is None or stored.uid != env.uid or stored.state != S.DEV_ENVIRONMENT_STATE_STARTING:
            self.runtime.release(env.replica_id)
            return
        request = pod_request(stored, self.settings, self.jupyter_token(env), config,
                              os.path.join(self._env_dir(env), LOG_FILE))
        self._starting[env.replica_id] = self.clock()
        try:
            await self.runtime.start(request)
        except ValueError as err:  # the API server refused it (e.g. an invalid image name)
            await self._stop_replica(env.replica_id)
            await self._failed(env, str(err))
            return
        log.info("dev environment %s/%s: Pod of replica %s created", env.tenant, env.name, env.replica_id)

    async def _kernel_activity(self, env: Env) -> float | None:
        """The server's own last activity (API requests, kernel messages,
        terminals) as epoch seconds, or now while a kernel is busy (a long
        silent cell sends nothing); None if it cannot tell."""
        status = await self._server_json(env, "api/status")
        kernels = await self._server_json(env, "api/kernels")
        if isinstance(kernels, list) and any(k.get("execution_state") == "busy" for k in kernels
                                             if isinstance(k, dict)):
            return self.clock()
        try:
            return datetime.fromisoformat(status["last_activity"].replace("Z", "+00:00")).timestamp()
        except (KeyError, AttributeError, TypeError, ValueError):
            return None

    async def _server_json(self, env: Env, path: str):
        """GET <page>/<path> on the server with its token, decoded; None on any failure."""
        return await server_json(env.address, env.path + path, f"token {self.jupyter_token(env)}")

    async def _stop_replica(self, replica_id: str) -> None:
        await stop_replica(self.runtime, replica_id, self.settings.stop_grace)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
