"""Kubernetes objects of the `kubernetes` runtime, as plain functions: names,
resource quantities, the Pod and Service bodies, and a replica's status
read from its Pod (see services.common.runtime.kubernetes)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from services.common.runtime.base import Amount, ReplicaPhase, ReplicaRequest, ReplicaStatus

DEFAULT_IMAGE = "cloudml/trainer:latest"
#: Where a Pod's package cache volume is mounted (services.jobs.pod_entrypoint).
PACKAGE_CACHE_MOUNT = "/var/cache/cloudml/packages"
PORT = 2222
CONTAINER = "replica"
GPU = "nvidia.com/gpu"
PREFIX = "cloudml.io/"
MANAGED = {"app.kubernetes.io/managed-by": "cloudml"}
SELECTOR = "app.kubernetes.io/managed-by=cloudml"
REQUEST_TIMEOUT = 15.0
WATCH_SECONDS = 240
#: Pod-level reasons of a Failed Pod that are the node's doing, not the replica's.
NODE_REASONS = frozenset({"Evicted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated"})
#: Waiting reasons that never resolve by themselves.
IMAGE_ERRORS = frozenset({"InvalidImageName", "ErrImageNeverPull"})
_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60,
          "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18, "m": 1e-3}
_QUANTITY = re.compile(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?")


def quantity(text: str | None) -> float:
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3", "4") as a number."""
    match = _QUANTITY.fullmatch((text or "0").strip())
    if not match:
        raise ValueError(f"not a resource quantity: {text!r}")
    return float(match[1]) * _UNITS.get(match[2], 1)


def object_name(text: str, limit: int = 40) -> str:
    """A DNS label from any text: readable head plus a hash of the whole."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    head = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit - 9].rstrip("-")
    return f"{head}-{digest}" if head else f"g-{digest}"


def label(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._")
    return value


def amount_of(resources: dict[str, Any] | None) -> Amount:
    resources = resources or {}
    return Amount(int(round(quantity(resources.get("cpu")) * 1000)), int(quantity(resources.get("memory"))),
                  int(quantity(resources.get(GPU))))


def resources(a: Amount) -> dict[str, str]:
    out = {}
    if a.cpu_millis:
        out["cpu"] = f"{a.cpu_millis}m"
    if a.memory_bytes:
        out["memory"] = str(a.memory_bytes)
    if a.gpus:
        out[GPU] = str(a.gpus)
    return out


def _ts(value) -> float:
    return value.timestamp() if value is not None else 0.0


def pod_status(pod, stopping: bool = False) -> ReplicaStatus:
    """The replica's status from its Pod (a V1Pod)."""
    meta, status = pod.metadata, pod.status
    ann = meta.annotations or {}
    out = ReplicaStatus(ann.get(PREFIX + "replica-id", meta.name), ann.get(PREFIX + "group", ""),
                        ReplicaPhase.RUNNING, started_at=_ts(status and status.start_time))
    phase = (status and status.phase) or "Pending"
    container = next((c for c in (status and status.container_statuses) or () if c.name == CONTAINER), None)
    terminated = container.state.terminated if container and container.state else None
    waiting = container.state.waiting if container and container.state else None
    if terminated is not None:
        out.exit_code, out.finished_at = terminated.exit_code, _ts(terminated.finished_at)
    if phase == "Succeeded":
        out.phase, out.reason, out.exit_code = ReplicaPhase.SUCCEEDED, "Completed", 0
        out.message = "exited with code 0"
    elif phase == "Failed":
        out.phase = ReplicaPhase.FAILED
        if status.reason in NODE_REASONS:
            out.reason = "Evicted" if status.reason == "Evicted" else "Lost"
            out.message = f"{status.reason}: {status.message or ''}".strip(": ")
        elif terminated is not None and terminated.reason == "OOMKilled":
            out.reason, out.message = "OOMKilled", "memory limit exceeded (the kernel killed it)"
        else:
            out.reason = "Killed" if stopping else "Error"
            out.message = (f"exited with code {out.exit_code}" if out.exit_code is not None
                           else status.message or "failed")
        if out.exit_code is None and out.reason in ("Evicted", "Lost"):
            out.exit_code = 137
    elif waiting is not None and waiting.reason in IMAGE_ERRORS:
        out.phase, out.reason = ReplicaPhase.FAILED, "Error"
        out.message = f"{waiting.reason}: {waiting.message or ''}".strip(": ")
    elif phase == "Pending":
        cond = next((c for c in (status and status.conditions) or () if c.type == "PodScheduled"), None)
        detail = f"{cond.reason}: {cond.message}" if cond is not None and cond.status == "False" else (
            waiting.reason if waiting is not None else "not yet running")
        out.message = f"Pending: {detail}"
    else:
        out.message = f"{phase} on {pod.spec.node_name} ({status.pod_ip or 'no IP yet'})"
        port = ann.get(PREFIX + "serving-port")
        if port and phase == "Running":
            out.ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
            out.address = f"{status.pod_ip}:{int(port)}" if status.pod_ip else ""
            if not out.ready:
                out.message += ", not ready"
    return out


def names(group: str, role: str, index: int, replica_id: str = "") -> tuple[str, str, str]:
    """(Service, hostname, Pod name) of a replica: the Pod name adds a hash of
    the replica id, so two attempts of a group never share one."""
    svc = object_name(group)
    host = f"{svc}-{label(role or 'replica').lower()[:9]}-{int(index)}"
    pod = f"{host}-{hashlib.sha256(replica_id.encode()).hexdigest()[:5]}" if replica_id else host
    return svc, host, pod


def service_body(group: str, tenant: str) -> dict:
    """The group's headless Service: stable DNS names for its Pods, and their owner."""
    svc = object_name(group)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "labels": {**MANAGED, PREFIX + "group": svc, PREFIX + "tenant": label(tenant)},
                         "annotations": {PREFIX + "group": group}},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {PREFIX + "group": svc},
                     "ports": [{"name": "tf", "port": PORT, "targetPort": PORT}]}}


def network_policy_body(group: str, tenant: str, service_uid: str) -> dict:
    """Who may reach the group's Pods on the TF port: the group's own Pods
    only (TensorFlow's distributed runtime authenticates no one and runs any
    graph it is sent as the Pod). deploy/kubernetes/base/network.yaml denies
    every other ingress to replicas but the gateway's and the jobs service's;
    NetworkPolicies add up, so this one, made with the group's Service and
    owned by it, is the only way in to port PORT."""
    svc = object_name(group)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": svc, "labels": {**MANAGED, PREFIX + "group": svc, PREFIX + "tenant": label(tenant)},
                         "annotations": {PREFIX + "group": group},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc,
                                              "uid": service_uid}]},
            "spec": {"podSelector": {"matchLabels": {PREFIX + "group": svc}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {PREFIX + "group": svc}}}],
                                  "ports": [{"protocol": "TCP", "port": PORT}]}]}}


@dataclass(frozen=True)
class PodVolumes:
    """Volumes of the platform that replicas' Pods mount, each Pod only its
    own tenant's directory of them (`subPath`: the tenant's name):

    - `storage_claim`: the PersistentVolumeClaim of the platform's storage,
      mounted at `<storage_root>/<tenant>`, the path the platform's services
      see it at, so the tenant's `file://` URIs (packages, output paths,
      SavedModels) mean the same in the Pod;
    - `package_cache_claim`: trainer environments by package hash
      (services.jobs.pod_entrypoint), mounted at PACKAGE_CACHE_MOUNT.
    """

    storage_claim: str = ""
    storage_root: str = ""
    package_cache_claim: str = ""

    def of(self, tenant: str) -> tuple[list[dict], list[dict], dict[str, str]]:
        """(volumes, volumeMounts, env) of a Pod of `tenant`."""
        volumes, mounts, env = [], [], {}
        if not tenant:
            return volumes, mounts, env
        if self.storage_claim and self.storage_root:
            volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": self.storage_claim}})
            mounts.append({"name": "storage", "mountPath": f"{self.storage_root.rstrip('/')}/{tenant}",
                           "subPath": tenant})
        if self.package_cache_claim:
            volumes.append({"name": "packages", "persistentVolumeClaim": {"claimName": self.package_cache_claim}})
            mounts.append({"name": "packages", "mountPath": PACKAGE_CACHE_MOUNT, "subPath": tenant})
            env["CLOUDML_PACKAGE_CACHE"] = PACKAGE_CACHE_MOUNT
        return volumes, mounts, env


def pod_body(request: ReplicaRequest, namespace: str, image: str, run_as_user: int | None,
             svc: str, svc_uid: str, host: str, pod: str, volumes: PodVolumes = PodVolumes()) -> dict:
    """The Pod of one replica, owned by its group's Service."""
    extra_volumes, extra_mounts, extra_env = volumes.of(request.tenant)
    env = {**extra_env, **request.env}
    if not request.resources.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if request.resources.memory_bytes:
        env["CLOUDML_MEMORY_LIMIT_BYTES"] = str(int(request.resources.memory_bytes))
    workdir = request.workdir or "/work"
    annotations = {PREFIX + "replica-id": request.replica_id, PREFIX + "group": request.group,
                   PREFIX + "log-path": request.log_path}
    if request.secret_env:
        annotations[PREFIX + "secret"] = secret_name(request.replica_id)
    ports: list[dict[str, Any]] = [{"name": "tf", "containerPort": PORT}]
    probe: dict[str, Any] = {}
    if request.serving_port:
        annotations[PREFIX + "serving-port"] = str(int(request.serving_port))
        ports = [{"name": "serving", "containerPort": int(request.serving_port)}]
        check = ({"exec": {"command": list(request.readiness_command)}} if request.readiness_command
                 else {"tcpSocket": {"port": int(request.serving_port)}})
        probe = {"readinessProbe": {**check, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 1,
                                    "successThreshold": 1}}
    security: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod_security = {"runAsNonRoot": True, "runAsUser": run_as_user} if run_as_user else {}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod, "namespace": namespace,
            "labels": {**MANAGED, PREFIX + "tenant": label(request.tenant), PREFIX + "group": svc,
                       PREFIX + "replica": pod, PREFIX + "role": label(request.role or "replica"),
                       PREFIX + "index": str(int(request.index))},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc, "uid": svc_uid,
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "restartPolicy": "Never", "hostname": host, "subdomain": svc,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "securityContext": pod_security,
            "containers": [{
                "name": CONTAINER, "image": request.image or image, "command": list(request.argv),
                "env": [{"name": k, "value": v} for k, v in env.items()] + [
                    {"name": k, "valueFrom": {"secretKeyRef": {"name": secret_name(request.replica_id),
                                                               "key": secret_key(k)}}}
                    for k in request.secret_env],
                "workingDir": workdir,
                "ports": ports, **probe,
                "resources": {"requests": resources(request.resources),
                              "limits": resources(request.resources)},
                "volumeMounts": [{"name": "work", "mountPath": workdir}, *extra_mounts],
                "securityContext": security,
            }],
            "volumes": [{"name": "work", "emptyDir": {}}, *extra_volumes],
        },
    }


def secret_key(variable: str) -> str:
    """A Secret's data key for an environment variable (keys allow [-._a-zA-Z0-9])."""
    return re.sub(r"[^-._a-zA-Z0-9]", "-", variable)


def secret_name(replica_id: str) -> str:
    """The name of a replica's own Secret (from its id alone: `forget()` knows it
    after the Pod is gone)."""
    return object_name(replica_id, 63)


def secret_body(request: ReplicaRequest, svc: str, svc_uid: str) -> dict:
    """The replica's own Secret (its `secret_env`), owned by its group's
    Service, as the Pod is."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret_name(request.replica_id), "labels": {**MANAGED, PREFIX + "tenant": label(request.tenant),
                                                 PREFIX + "group": svc},
                         "annotations": {PREFIX + "replica-id": request.replica_id},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc, "uid": svc_uid,
                                              "controller": True, "blockOwnerDeletion": True}]},
            "stringData": {secret_key(k): v for k, v in request.secret_env.items()}}


def api_message(err) -> str:
    """The API server's own message of an ApiException (for a 403 it names
    the verb, the resource and the namespace), and its HTTP status."""
    try:
        message = json.loads(err.body or "{}").get("message") or err.reason
    except (ValueError, AttributeError):
        message = err.reason
    return f"{message} (HTTP {err.status})"


def api_error(what: str, err) -> ValueError:
    """A clear error from an ApiException: the API server's own message."""
    return ValueError(f"{what}: {api_message(err)}")


def _fmt(resource: str, value: int) -> str:
    if resource == "cpu":
        return f"{value}m"
    if resource == "memory":
        return f"{value / (1 << 30):.1f} GiB" if value >= 1 << 30 else f"{value / (1 << 20):.0f} MiB"
    return str(value)


def short(need: Amount, have: Amount, what: str) -> list[str]:
    """"cpu: requested 8000m, <what> 4000m" for each resource `need` has more of."""
    return [f"{name}: requested {_fmt(name, want)}, {what} {_fmt(name, avail)}"
            for name, want, avail in (("cpu", need.cpu_millis, have.cpu_millis),
                                      ("memory", need.memory_bytes, have.memory_bytes),
                                      (GPU, need.gpus, have.gpus)) if want > avail]


def describe(a: Amount) -> str:
    return f"cpu {_fmt('cpu', a.cpu_millis)}, memory {_fmt('memory', a.memory_bytes)}, {GPU} {a.gpus}"


def replica_id_of(pod) -> str:
    """The replica id a Pod of the platform carries ("" for none)."""
    return (pod.metadata.annotations or {}).get(PREFIX + "replica-id", "")


def newer(version: str | None, than: str | None) -> bool:
    """Whether resourceVersion `version` is later than `than`. They are
    opaque to clients, but etcd revisions (integers) on every API server
    this talks to; anything else counts as not newer."""
    try:
        return int(version or 0) > int(than or 0)
    except ValueError:
        return False


def holds(pod) -> tuple[str, Amount] | None:
    """(group, resources) a Pod holds; None once it ended."""
    if (pod.status and pod.status.phase) in ("Succeeded", "Failed"):
        return None
    group = (pod.metadata.annotations or {}).get(PREFIX + "group", pod.metadata.name)
    limits = pod.spec.containers[0].resources.limits if pod.spec.containers[0].resources else None
    return group, amount_of(limits)
