"""The `kubernetes` runtime: replicas are Pods, on the official `kubernetes` client.

Objects
-------
A group (a job, a model version) gets one headless Service, `svc`
(`object_name(group)`): it gives every replica a stable DNS name, and every
Pod of the group names it as its owner (ownerReferences), so deleting it
lets the cluster's garbage collector remove whatever is left. A replica is
one Pod, `<svc>-<role>-<index>-<hash>`, restartPolicy Never (the calling
service's own restart policy decides), with hostname `<svc>-<role>-<index>`
and subdomain `svc`: `addresses()` gives `<svc>-<role>-<index>.<svc>.<ns>.svc:2222`.
Labels: managed-by cloudml, tenant, group (`svc`), replica (the Pod name),
role, index; the full replica id, group and log path are annotations (label
values are limited to 63 characters). Resources: requests = limits for CPU
and memory; GPUs as whole `nvidia.com/gpu`. The container runs
`request.argv` in `request.image` (else the platform's default image), with
`request.env` (plus CUDA_VISIBLE_DEVICES="" when it has no GPU: the device
plugin names the GPUs it hands out), its working directory an emptyDir, no
service-account token (tenant code must not act on the cluster), no
privilege escalation, as uid 1000 (runAsNonRoot; `run_as_user=None` leaves
the image's user). `forget()` deletes the Pod, and the Service once its
group has no Pod left: the runtime does not rely on the garbage collector.

State
-----
Two daemon threads keep a cache of the cluster: the platform's Pods in the
namespace and the Nodes (list, then watch from the list's resourceVersion;
on 410 Gone or any error, list again after a short back-off). The event loop
never blocks on the API server: reads come from the cache, writes run in
the runtime's own thread pool with a request timeout. A Pod's phase maps to the
replica's: Pending and Running are RUNNING (`message` says "Pending: ..."
with the scheduler's reason), Succeeded, Failed with the container's exit
code and reason ("OOMKilled" for an OOM kill, "Evicted" when the kubelet
evicted it), and a Pod that disappeared without ending is UNKNOWN/"Lost"
(FAILED/"Killed" when `stop()` deleted it).

Capacity comes from the cluster: `total()` is the Ready, schedulable Nodes'
allocatable; what is held is, per group, the larger of its reservation and
its live Pods' requests. A group that can never fit (more than all Nodes,
or a replica bigger than every single Node) is Unschedulable; one that fits
later is CapacityBusy. Other workloads on the Nodes are not subtracted
(the cluster's scheduler still has the last word: such a Pod stays Pending,
its message says why). Until the first list succeeded nothing is known:
`reserve()` raises CapacityBusy naming the API server, and
`check_fits_ever()` lets the request through (reserve decides later).
Reservations live in this process; `adopt()` restores them from the Pods.

Secrets: a request's `secret_env` goes into a Secret of the replica's own
(`services.common.runtime.kube_secrets`), never into the Pod's spec.

Logs are best-effort: while a Pod runs, a thread of the process that acts
on replicas (the one that called adopt() or start(): the service's leader;
never a standby sharing its data volume) follows `pods/log` into
`request.log_path` (the API server proxies it to the Node's kubelet), so the
platform's copy outlives the Pod. A follower that fails (no kubelet, a node
restart) retries a few times while the Pod runs; when the log file already
has lines (a follower before a restart of the service), it asks only for
those since the file's last write (whole seconds: a line may be doubled). Tested
against the real API server with envtest's stand-in kubelet endpoint, which
serves a whole log at once (not a live follow of a running container).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
from typing import Any

from services.common.runtime.base import (
    Amount,
    CapacityBusy,
    ReplicaPhase,
    ReplicaRequest,
    ReplicaStatus,
    Runtime,
    Unschedulable,
)
from services.common.runtime.kube_logs import PodLogs
from services.common.runtime.kube_secrets import PodSecrets
from services.common.runtime.kube_objects import (
    DEFAULT_IMAGE,
    PORT,
    PREFIX,
    REQUEST_TIMEOUT,
    PodVolumes,
    holds as _holds,
    newer as _newer,
    replica_id_of as _rid,
    SELECTOR,
    WATCH_SECONDS,
    amount_of,
    api_error,
    api_message,
    describe,
    names,
    network_policy_body,
    object_name,
    pod_body,
    pod_status,
    service_body,
    short,
)

log = logging.getLogger(__name__)

class KubernetesRuntime(PodLogs, PodSecrets, Runtime):
    name = "kubernetes"

    #: Replicas install their trainer package themselves (services.jobs.pod_entrypoint).
    installs_packages = True
    reports_readiness = True

    def __init__(self, api_client, namespace: str, *, image: str = DEFAULT_IMAGE,
                 run_as_user: int | None = 1000, server: str = "", volumes: PodVolumes = PodVolumes()):
        from kubernetes import client  # noqa: PLC0415 - only the runtime in use is loaded

        self.namespace = namespace
        self.volumes = volumes
        self.image = image
        self.run_as_user = run_as_user
        self.server = server or api_client.configuration.host
        self._api = api_client
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self._lock = threading.Lock()
        self._pods: dict[str, Any] = {}          # pod name -> V1Pod (the platform's, in the namespace)
        self._by_replica: dict[str, str] = {}    # replica id -> pod name (of `_pods`)
        self._holds: dict[str, tuple] = {}       # pod name -> (resourceVersion, (group, Amount) or None)
        self._nodes: dict[str, Any] = {}
        self._ended: dict[str, ReplicaStatus] = {}  # replica id -> status of a Pod gone meanwhile
        self._stopping: set[str] = set()
        self._secrets: set[str] = set()  # replica ids with a Secret of their own (kube_secrets)
        self._reserved: dict[str, Amount] = {}
        self._synced = {"pods": threading.Event(), "nodes": threading.Event()}
        self._error = ""
        self._closed = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._replica_events: dict[str, asyncio.Event] = {}  # replica id -> set when its Pod changes (wait())
        self._group_locks: dict[str, asyncio.Lock] = {}
        self._services: dict[str, str] = {}  # group -> uid of the Service this runtime made or found
        self._logs: dict[str, threading.Thread] = {}
        self._calls = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, api_client.configuration.connection_pool_maxsize or 8), thread_name_prefix="k8s-call")
        # Logs are followed only by the process that acts on replicas (it called
        # adopt() or start(): the leader), so two replicas of a service sharing
        # one data volume never both append the same lines.
        self._acting = False
        for kind in ("pods", "nodes"):
            threading.Thread(target=self._watch_loop, args=(kind,), name=f"k8s-watch-{kind}", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._calls.shutdown(wait=False)

    async def _call(self, fn, *args, **kwargs):
        """A blocking API call on the runtime's own threads (as many as the
        client's connection pool: the event loop's default executor has
        only cpu count + 4, which capped how many Pods a burst of jobs
        could create at once)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._calls, functools.partial(fn, *args, **kwargs))

    # ------------------------------------------------------------------ the cache
    def _list_and_watch(self, kind: str) -> None:
        from kubernetes import watch  # noqa: PLC0415

        if kind == "pods":
            lister, kwargs = self.core.list_namespaced_pod, {"namespace": self.namespace, "label_selector": SELECTOR}
            cache = self._pods
        else:
            lister, kwargs, cache = self.core.list_node, {}, self._nodes
        listed = lister(**kwargs, _request_timeout=REQUEST_TIMEOUT)
        version = listed.metadata.resource_version
        with self._lock:
            # Gone since the last list; not a Pod that start() made after this list was taken.
            gone = [cache[n] for n in set(cache) - {o.metadata.name for o in listed.items}
                    if not _newer(cache[n].metadata.resource_version, version)]
            cache.clear()
            cache.update((o.metadata.name, o) for o in listed.items)
            if kind == "pods":
                self._by_replica = {rid: o.metadata.name for o in listed.items if (rid := _rid(o))}
            for obj in gone:
                self._forgotten(kind, obj)
        self._synced[kind].set()
        self._error = ""
        self._notify()
        while not self._closed.is_set():
            stream = watch.Watch().stream(lister, **kwargs, resource_version=version, timeout_seconds=WATCH_SECONDS,
                                          allow_watch_bookmarks=True, _request_timeout=WATCH_SECONDS + 30)
            for event in stream:
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise _Gone()
                if event["type"] == "BOOKMARK":  # the client leaves its object a dict
                    version = ((event.get("raw_object") or {}).get("metadata") or {}).get("resourceVersion") or version
                    continue
                version = obj.metadata.resource_version or version
                rid = _rid(obj) if kind == "pods" else ""
                with self._lock:
                    if event["type"] == "DELETED":
                        cache.pop(obj.metadata.name, None)
                        if rid and self._by_replica.get(rid) == obj.metadata.name:
                            del self._by_replica[rid]
                        self._forgotten(kind, obj)
                    else:
                        cache[obj.metadata.name] = obj
                        if rid:
                            self._by_replica[rid] = obj.metadata.name
                if kind == "pods" and event["type"] != "DELETED":
                    self._follow_log(obj)
                self._notify(rid or None)

    def _forgotten(self, kind: str, obj) -> None:
        """A Pod left the cluster (under the lock): remember how it ended."""
        if kind != "pods":
            return
        rid = (obj.metadata.annotations or {}).get(PREFIX + "replica-id")
        if not rid:
            return
        st = pod_status(obj, rid in self._stopping)
        if not st.ended:
            if rid in self._stopping:
                st.phase, st.reason, st.exit_code = ReplicaPhase.FAILED, "Killed", 137
                st.message = "stopped on request"
            else:
                st.phase, st.reason = ReplicaPhase.UNKNOWN, "Lost"
                st.message = f"its Pod {obj.metadata.name} was deleted before it ended"
            st.finished_at = time.time()
        self._ended[rid] = st

    def _watch_loop(self, kind: str) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        delay = 0.2
        while not self._closed.is_set():
            try:
                self._list_and_watch(kind)
                delay = 0.2
            except _Gone:
                delay = 0.0  # 410 Gone: list again at once
            except ApiException as err:
                if err.status == 410:
                    delay = 0.0
                else:
                    self._failed(kind, api_message(err))
            except Exception as err:  # noqa: BLE001 - unreachable, timeouts: retried
                self._failed(kind, f"{type(err).__name__}: {err}")
            if delay:
                self._closed.wait(delay)
                delay = min(delay * 2, 5.0)

    def _failed(self, kind: str, error: str) -> None:
        message = f"cannot {'list' if not self._synced[kind].is_set() else 'watch'} {kind} on the Kubernetes " \
                  f"API server {self.server}: {error}"
        if message != self._error and not self._closed.is_set():
            log.warning("%s (retrying)", message)
        self._error = message

    def _notify(self, replica_id: str | None = None) -> None:
        """From a watch thread: wakes wait() of `replica_id` (None: of every
        replica, after a list), and whoever waits for any change."""
        loop, changed = self._loop, self._changed
        if loop is not None and changed is not None:
            with contextlib.suppress(RuntimeError):  # the loop was closed
                loop.call_soon_threadsafe(self._wake, replica_id)

    def _wake(self, replica_id: str | None) -> None:
        self._changed.set()
        if replica_id is None:
            for event in self._replica_events.values():
                event.set()
        elif replica_id in self._replica_events:
            self._replica_events[replica_id].set()

    def _bind_loop(self) -> asyncio.Event:
        if self._changed is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
        return self._changed

    @property
    def synced(self) -> bool:
        return all(e.is_set() for e in self._synced.values())

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Waits until Pods and Nodes are listed; ConnectionError (naming the
        API server and the last error) after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.synced:
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectionError(self._error or f"the Kubernetes API server {self.server} did not answer "
                                      f"in {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def _replica_pods(self) -> dict[str, Any]:
        with self._lock:
            return {rid: self._pods[name] for rid, name in self._by_replica.items() if name in self._pods}

    def _pod_of(self, replica_id: str):
        """The replica's Pod in the cache, or None (one lookup, not a scan)."""
        with self._lock:
            name = self._by_replica.get(replica_id)
            return self._pods.get(name) if name else None

    # ------------------------------------------------------------------ capacity
    def total(self) -> Amount:
        total = Amount()
        for a in self._node_amounts():
            total = total + a
        return total

    def _node_amounts(self) -> list[Amount]:
        with self._lock:
            nodes = list(self._nodes.values())
        out = []
        for node in nodes:
            ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or ()))
            if ready and not (node.spec and node.spec.unschedulable):
                out.append(amount_of(node.status.allocatable))
        return out

    def _held(self) -> Amount:
        by_group: dict[str, Amount] = {}
        with self._lock:
            for name, pod in self._pods.items():
                # What a Pod holds, parsed once per version of it (reserve() runs for
                # every admitted job: parsing every Pod's quantities each time was
                # quadratic in a burst of jobs).
                memo = self._holds.get(name)
                if memo is None or memo[0] != pod.metadata.resource_version:
                    memo = self._holds[name] = (pod.metadata.resource_version, _holds(pod))
                if memo[1] is not None:
                    group, amount = memo[1]
                    by_group[group] = by_group.get(group, Amount()) + amount
            if len(self._holds) > 2 * len(self._pods) + 64:
                self._holds = {n: m for n, m in self._holds.items() if n in self._pods}
            reserved = dict(self._reserved)
        held = Amount()
        for group in set(by_group) | set(reserved):
            pods, mine = by_group.get(group, Amount()), reserved.get(group, Amount())
            held = held + Amount(max(pods.cpu_millis, mine.cpu_millis), max(pods.memory_bytes, mine.memory_bytes),
                                 max(pods.gpus, mine.gpus))
        return held

    def free(self) -> Amount:
        return self.total() - self._held()

    def check_fits_ever(self, replicas: list[Amount], image: str = "") -> None:
        if not self._synced["nodes"].is_set():
            return  # nothing known yet: reserve() decides
        need = Amount()
        for r in replicas:
            if min(r.cpu_millis, r.memory_bytes, r.gpus) < 0:
                raise ValueError(f"negative resources: {r}")
            need = need + r
        total, nodes = self.total(), self._node_amounts()
        over = short(need, total, "the cluster's Nodes have in all")
        if not over:
            for r in replicas:
                if not any(r.fits_in(n) for n in nodes):
                    over.append(f"a replica needs {describe(r)} and no single Node has that much allocatable")
                    break
        if over:
            raise Unschedulable("; ".join(over))

    def reserve(self, group: str, replicas: list[Amount]) -> None:
        if not self.synced:
            raise CapacityBusy(self._error or f"the cluster's capacity is not known yet (API server {self.server})")
        self.check_fits_ever(replicas)
        need = Amount()
        for r in replicas:
            need = need + r
        with self._lock:
            if group in self._reserved:
                self._reserved[group] = need  # idempotent; after adopt() the Pods' sum stood in
                return
        free = self.free()
        if not need.fits_in(free):
            raise CapacityBusy("; ".join(short(need, free, "free")) + " on the kubernetes runtime")
        with self._lock:
            self._reserved[group] = need

    def release(self, group: str) -> None:
        with self._lock:
            self._reserved.pop(group, None)

    # ------------------------------------------------------------------ names
    async def addresses(self, group: str, replicas: list[tuple[str, int]],
                        tenant: str = "") -> dict[tuple[str, int], str]:
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"replicas named twice in {replicas}")
        out = {}
        for role, index in replicas:
            svc, host, _ = names(group, role, index)
            out[(role, index)] = f"{host}.{svc}.{self.namespace}.svc:{PORT}"
        return out

    # ------------------------------------------------------------------ replicas
    async def _ensure_service(self, group: str, tenant: str) -> tuple[str, str]:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        if group in self._services:
            return object_name(group), self._services[group]
        svc, body = object_name(group), service_body(group, tenant)
        try:
            made = await self._call(self.core.create_namespaced_service, self.namespace, body,
                                           _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status != 409:
                raise api_error(f"cannot create the Service of group {group}", err) from None
            made = await self._call(self.core.read_namespaced_service, svc, self.namespace,
                                           _request_timeout=REQUEST_TIMEOUT)
        try:  # only the group's own Pods reach its TF port (kube_objects.network_policy_body)
            await self._call(self.networking.create_namespaced_network_policy, self.namespace,
                             network_policy_body(group, tenant, made.metadata.uid), _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status != 409:
                raise api_error(f"cannot create the NetworkPolicy of group {group}", err) from None
        self._services[group] = made.metadata.uid
        return svc, made.metadata.uid

    def _group_lock(self, group: str) -> asyncio.Lock:
        return self._group_locks.setdefault(group, asyncio.Lock())

    async def start(self, request: ReplicaRequest) -> ReplicaStatus:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        self._bind_loop()
        self._acting = True
        with self._lock:
            reserved = request.group in self._reserved
        if not reserved:
            raise ValueError(f"group {request.group!r} has no reservation on the kubernetes runtime; "
                             "reserve() it before start()")
        current = await self.status(request.replica_id)
        if current.phase == ReplicaPhase.RUNNING:
            return current  # idempotent
        svc, host, pod = names(request.group, request.role, request.index, request.replica_id)
        async with self._group_lock(request.group):
            _, svc_uid = await self._ensure_service(request.group, request.tenant)
            body = pod_body(request, self.namespace, self.image, self.run_as_user, svc, svc_uid, host, pod,
                            self.volumes)
            if request.secret_env:
                await self._make_secret(request, svc, svc_uid)
            try:
                made = await self._call(self.core.create_namespaced_pod, self.namespace, body,
                                               _request_timeout=REQUEST_TIMEOUT)
            except ApiException as err:
                if err.status == 409:  # started before (e.g. by a previous instance)
                    made = await self._call(self.core.read_namespaced_pod, pod, self.namespace,
                                                   _request_timeout=REQUEST_TIMEOUT)
                else:
                    await self._forget_secret(request.replica_id)
                    await self._delete_service_if_empty(request.group)
                    raise api_error(f"the Kubernetes API server refused the Pod of {request.replica_id}",
                                     err) from None
        with self._lock:
            self._pods.setdefault(pod, made)
            self._by_replica.setdefault(request.replica_id, pod)
            self._ended.pop(request.replica_id, None)
            self._stopping.discard(request.replica_id)
        return pod_status(made)

    async def status(self, replica_id: str) -> ReplicaStatus:
        pod = self._pod_of(replica_id)
        if pod is not None:
            return pod_status(pod, replica_id in self._stopping)
        with self._lock:
            ended = self._ended.get(replica_id)
        return ended or ReplicaStatus(replica_id, "", ReplicaPhase.UNKNOWN, message="no record")

    async def wait(self, replica_id: str, timeout: float | None = None) -> ReplicaStatus:
        self._bind_loop()
        changed = self._replica_events.setdefault(replica_id, asyncio.Event())  # only its own Pod's events
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed.clear()
            st = await self.status(replica_id)
            if st.ended:
                return st
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return st
            try:  # a Pod event wakes it; the timeout covers a missed one
                await asyncio.wait_for(changed.wait(), 1.0 if left is None else min(1.0, left))
            except asyncio.TimeoutError:
                pass

    async def _delete_pod(self, name: str, grace: int) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        try:
            await self._call(self.core.delete_namespaced_pod, name, self.namespace,
                                    grace_period_seconds=grace, _request_timeout=REQUEST_TIMEOUT,
                                    _preload_content=False)
        except ApiException as err:
            if err.status != 404:
                raise api_error(f"cannot delete Pod {name}", err) from None

    async def stop(self, replica_id: str, grace_seconds: float = 10.0) -> ReplicaStatus:
        st = await self.status(replica_id)
        pod = self._pod_of(replica_id)
        if st.ended or pod is None:
            return st
        self._stopping.add(replica_id)
        grace = max(0, math.ceil(grace_seconds))
        await self._delete_pod(pod.metadata.name, grace)
        st = await self.wait(replica_id, grace + 5.0)
        if not st.ended:  # no kubelet confirmed it: remove the object ourselves
            await self._delete_pod(pod.metadata.name, 0)
            st = await self.wait(replica_id, 5.0)
        if not st.ended:
            st = ReplicaStatus(replica_id, st.group, ReplicaPhase.FAILED, 137, "Killed",
                               finished_at=time.time(), message="stopped on request")
            with self._lock:
                self._ended[replica_id] = st
        return st

    async def adopt(self) -> list[ReplicaStatus]:
        self._bind_loop()
        self._acting = True
        await self.wait_synced()
        pods = self._replica_pods()
        sums: dict[str, Amount] = {}
        for pod in pods.values():
            group = (pod.metadata.annotations or {}).get(PREFIX + "group", "")
            limits = pod.spec.containers[0].resources.limits if pod.spec.containers[0].resources else None
            sums[group] = sums.get(group, Amount()) + amount_of(limits)
        with self._lock:
            for group, amount in sums.items():
                self._reserved.setdefault(group, amount)
            for pod in pods.values():
                self._remember_secret(pod)
            ended = [s for rid, s in self._ended.items() if rid not in pods]
        for pod in pods.values():
            self._follow_log(pod)
        return [pod_status(p, rid in self._stopping) for rid, p in sorted(pods.items())] + ended

    async def forget(self, replica_id: str) -> None:
        st = await self.status(replica_id)
        if st.phase == ReplicaPhase.RUNNING:
            raise RuntimeError(f"replica {replica_id} is still running; stop() it first")
        pod = self._pod_of(replica_id)
        group = st.group
        if pod is not None:
            await self._delete_pod(pod.metadata.name, 0)
        await self._forget_secret(replica_id)
        with self._lock:
            self._ended.pop(replica_id, None)
            self._stopping.discard(replica_id)
            if pod is not None:
                self._pods.pop(pod.metadata.name, None)
                self._logs.pop(pod.metadata.name, None)
                if self._by_replica.get(replica_id) == pod.metadata.name:
                    del self._by_replica[replica_id]
        self._replica_events.pop(replica_id, None)
        if group:
            async with self._group_lock(group):
                await self._delete_service_if_empty(group)

    async def _delete_service_if_empty(self, group: str) -> None:
        """Deletes the group's Service once no Pod of the group is left (asked
        of the API server, not the cache, which may lag)."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        svc = object_name(group)
        left = await self._call(self.core.list_namespaced_pod, self.namespace,
                                       label_selector=f"{SELECTOR},{PREFIX}group={svc}",
                                       _request_timeout=REQUEST_TIMEOUT)
        if left.items:
            return
        self._services.pop(group, None)
        # Its NetworkPolicy is the Service's (ownerReferences) but deleted here
        # too: a cluster's garbage collector may be slow, or not run at all.
        for kind, delete in (("Service", self.core.delete_namespaced_service),
                             ("NetworkPolicy", self.networking.delete_namespaced_network_policy)):
            try:
                # (1.20 answers a Status the client cannot read as a Service: not parsed)
                await self._call(delete, svc, self.namespace, _request_timeout=REQUEST_TIMEOUT,
                                 _preload_content=False)
            except ApiException as err:
                if err.status != 404:
                    raise api_error(f"cannot delete the {kind} of group {group}", err) from None


class _Gone(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


