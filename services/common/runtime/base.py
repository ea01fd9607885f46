"""The `Runtime` interface: where train-job replicas and model-server replicas run.

One interface, two implementations: `local` (child processes on this machine,
`services.common.runtime.local`) and `kubernetes` (Pods,
`services.common.runtime.kubernetes`). The jobs and
models services place every replica through it and never touch processes or
Pods themselves.

Model
-----
A *replica* is one process (or Pod) identified by a `replica_id` that is
unique on the platform and safe in file names (e.g.
"jobs.team-a.linear.1.worker-0"). Replicas belong to a *group* (a job
attempt, a model version); capacity is reserved per group, all or nothing,
so a distributed job never holds half its replicas (gang scheduling).

Replicas outlive the service that started them: if the jobs service is killed
and restarted, `adopt()` finds its replicas again (still running, or their
exit status if they ended meanwhile). A runtime's own state lives in its
`state_dir` (local) or the cluster (kubernetes), never in etcd.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field


class Unschedulable(Exception):
    """The request can never fit this runtime (more than its total capacity,
    or a feature it lacks, e.g. container images on `local`). The message
    names the resource."""


class CapacityBusy(Exception):
    """The request fits the runtime's total capacity but not what is free
    now; retry after some group is released."""


@dataclass(frozen=True)
class Amount:
    """Resources of one replica (or a sum of them)."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    gpus: int = 0

    def __add__(self, other: "Amount") -> "Amount":
        return Amount(self.cpu_millis + other.cpu_millis, self.memory_bytes + other.memory_bytes,
                      self.gpus + other.gpus)

    def __sub__(self, other: "Amount") -> "Amount":
        return Amount(self.cpu_millis - other.cpu_millis, self.memory_bytes - other.memory_bytes,
                      self.gpus - other.gpus)

    def fits_in(self, other: "Amount") -> bool:
        # A resource not asked for always fits: free capacity can go below zero
        # (a GPU Node leaves while its Pods run), and a CPU-only replica must not
        # wait for GPUs it never uses.
        return all(need <= 0 or need <= free for need, free in (
            (self.cpu_millis, other.cpu_millis), (self.memory_bytes, other.memory_bytes), (self.gpus, other.gpus)))


@dataclass
class ReplicaRequest:
    replica_id: str
    group: str
    argv: list[str]
    # The replica's environment. `local` adds only a minimal base from the
    # service's own (PATH, HOME, LANG, TMPDIR, ...; never its credentials)
    # under these, and CUDA_VISIBLE_DEVICES over them.
    env: dict[str, str]
    workdir: str
    # Combined stdout+stderr of the replica, appended.
    log_path: str
    resources: Amount = field(default_factory=Amount)
    # Container image; the local runtime refuses a non-empty one (Unschedulable).
    image: str = ""
    # The tenant whose code this is. With tenant isolation on (`local` as
    # root), the replica runs as that tenant's own unprivileged user
    # (services.common.tenancy), and a request without a tenant is refused.
    tenant: str = ""
    # The replica's place in its group ("worker", 1), as `addresses()` was
    # asked for it: `kubernetes` names the Pod (and its DNS name) after it.
    # A group of one replica may leave it empty.
    role: str = ""
    index: int = 0
    # A replica that serves on a TCP port (a model server on `kubernetes`):
    # the runtime declares the port and probes readiness on it, and the
    # status then has `ready` and `address`. 0: none (`local` replicas name
    # their own Unix sockets).
    serving_port: int = 0
    # With a serving port: a command whose exit 0 means ready (an exec
    # readiness probe, e.g. a gRPC health check); empty: the port accepting.
    readiness_command: list[str] = field(default_factory=list)
    # Environment variables whose values are secrets (access keys, tokens):
    # `local` adds them to `env`; `kubernetes` puts them in a Secret of the
    # replica's own (named after its Pod, deleted with it) and the Pod refers
    # to it (`secretKeyRef`), so no Pod spec carries them in clear text.
    secret_env: dict[str, str] = field(default_factory=dict)


class ReplicaPhase(enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"   # exited 0
    FAILED = "FAILED"         # exited non-zero or killed
    UNKNOWN = "UNKNOWN"       # the runtime lost track (e.g. state removed)


@dataclass
class ReplicaStatus:
    replica_id: str
    group: str
    phase: ReplicaPhase
    # Exit code once ended; for a signal, 128 + signal number (as shells and
    # Kubernetes report it).
    exit_code: int | None = None
    # Why it ended: "Completed", "Error", "OOMKilled", "Killed" (stopped by
    # the runtime on request), "Lost".
    reason: str = ""
    pid: int = 0
    # Whole GPUs handed to it (CUDA_VISIBLE_DEVICES).
    gpu_ids: tuple[int, ...] = ()
    started_at: float = 0.0
    finished_at: float = 0.0
    # Human-readable detail for events, e.g. "exited with code 3",
    # "memory limit exceeded: 312 MiB used, limit 100 MiB", "cannot run x: ...".
    message: str = ""
    # With a serving port on a runtime that reports readiness: whether the
    # replica passes its readiness probe now, and "host:port" to call it at.
    ready: bool = False
    address: str = ""

    @property
    def ended(self) -> bool:
        return self.phase in (ReplicaPhase.SUCCEEDED, ReplicaPhase.FAILED, ReplicaPhase.UNKNOWN)


class Runtime(abc.ABC):
    #: "local" or "kubernetes"; named in Unschedulable messages
    name: str = ""
    #: False: the calling service installs a trainer package before a replica
    #: starts (`local`); True: the replica does, where it runs (`kubernetes`:
    #: services.jobs.pod_entrypoint in the trainer image).
    installs_packages: bool = False
    #: Whether statuses of replicas with a serving port carry `ready` and
    #: `address` (`kubernetes`: the Pod's readiness and IP), so callers route
    #: by them instead of asking the replica itself.
    reports_readiness: bool = False

    @property
    def synced(self) -> bool:
        """Whether the runtime knows its capacity and replicas now (always on
        `local`; on `kubernetes` once the API server was listed). A service
        reports NOT_SERVING until it is."""
        return True

    @abc.abstractmethod
    def total(self) -> Amount:
        """The runtime's whole capacity."""

    @abc.abstractmethod
    def free(self) -> Amount:
        """What is not reserved by any group now."""

    @abc.abstractmethod
    def check_fits_ever(self, replicas: list[Amount], image: str = "") -> None:
        """Raises Unschedulable if these replicas together can never run here."""

    @abc.abstractmethod
    def reserve(self, group: str, replicas: list[Amount]) -> None:
        """Reserves capacity for a whole group at once (idempotent per group).
        Raises Unschedulable (never fits) or CapacityBusy (not now)."""

    @abc.abstractmethod
    def release(self, group: str) -> None:
        """Returns a group's capacity (idempotent). Its replicas must have ended."""

    @abc.abstractmethod
    async def addresses(self, group: str, replicas: list[tuple[str, int]],
                        tenant: str = "") -> dict[tuple[str, int], str]:
        """"host:port" where each (role, index) replica of a group will listen
        (what TF_CONFIG names), before any of them starts: a free loopback port
        each on `local` (its `tenant`'s alone with tenant isolation on), the
        Pod's stable DNS name on `kubernetes` (only the group's own Pods may
        reach it). The replicas are then started with the same role and index."""

    @abc.abstractmethod
    async def start(self, request: ReplicaRequest) -> ReplicaStatus:
        """Starts one replica of a reserved group. The replica's environment
        gets CUDA_VISIBLE_DEVICES (empty without GPUs)."""

    @abc.abstractmethod
    async def status(self, replica_id: str) -> ReplicaStatus:
        """The replica's status now (UNKNOWN if the runtime has no record)."""

    @abc.abstractmethod
    async def wait(self, replica_id: str, timeout: float | None = None) -> ReplicaStatus:
        """Waits until the replica ends (or the timeout passes) and returns its status."""

    @abc.abstractmethod
    async def stop(self, replica_id: str, grace_seconds: float = 10.0) -> ReplicaStatus:
        """SIGTERM, then SIGKILL after the grace period; returns the final
        status (reason "Killed" unless it had already ended)."""

    @abc.abstractmethod
    async def adopt(self) -> list[ReplicaStatus]:
        """After a restart of the calling service: every replica this runtime
        knows (running or ended-but-not-forgotten), with group reservations
        restored from its state."""

    @abc.abstractmethod
    async def forget(self, replica_id: str) -> None:
        """Drops an ended replica's record (its log file stays)."""
