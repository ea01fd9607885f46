"""Replica naming and TF_CONFIG, as Kubeflow's TFJob builds it.

    {"cluster": {"chief": ["127.0.0.1:41001"], "ps": ["127.0.0.1:41002"],
                 "worker": ["127.0.0.1:41003", "127.0.0.1:41004"]},
     "task": {"type": "worker", "index": 1},
     "environment": "cloud"}

Choices (the same as TFJob's `genClusterSpec` / `genTFConfigJSONStr`):

- Roles are the lower-case replica types, each list in index order.
- MASTER is written "master" and CHIEF "chief": the platform does not rename
  one into the other. TF1 Estimators accept either; TF2's distribution
  strategies (MultiWorkerMirroredStrategy, ParameterServerStrategy) know only
  "chief", so TF2 trainers should ask for a CHIEF.
- The evaluator is not part of the training cluster (TensorFlow's RunConfig
  and TFJob both leave it out): "evaluator" never appears in `cluster`, and
  the evaluator gets no port. Its own TF_CONFIG still carries the training
  cluster and its task {type: evaluator, index: 0}.
- "environment": "cloud" is kept for TF <= 1.3 compatibility, as TFJob does.

Pure functions of plain values; unit-tested without any process.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

from cloudml.jobs.v1 import jobs_service_pb2 as pb

# In "type then index" order: the order of the enum.
ROLES: dict[int, str] = {
    pb.REPLICA_TYPE_MASTER: "master",
    pb.REPLICA_TYPE_CHIEF: "chief",
    pb.REPLICA_TYPE_PS: "ps",
    pb.REPLICA_TYPE_WORKER: "worker",
    pb.REPLICA_TYPE_EVALUATOR: "evaluator",
}
TYPES: dict[str, int] = {role: t for t, role in ROLES.items()}
ORDER = tuple(ROLES)
# At most one replica of these types.
SINGLETONS = frozenset({pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_CHIEF, pb.REPLICA_TYPE_EVALUATOR})
# Types that are not in TF_CONFIG's cluster (and listen on no port).
NOT_IN_CLUSTER = frozenset({pb.REPLICA_TYPE_EVALUATOR})

_NAME_RE = re.compile(r"(master|chief|ps|worker|evaluator)-(\d{1,4})")


@dataclass(frozen=True, order=True)
class Replica:
    """One replica of a job: `type` is a ReplicaType number."""

    type: int
    index: int

    @property
    def role(self) -> str:
        return ROLES[self.type]

    @property
    def name(self) -> str:
        """"worker-1", as the CLI, the logs and the metric series call it."""
        return f"{self.role}-{self.index}"

    @property
    def in_cluster(self) -> bool:
        return self.type not in NOT_IN_CLUSTER

    @classmethod
    def parse(cls, name: str) -> "Replica":
        match = _NAME_RE.fullmatch(name or "")
        if not match:
            raise ValueError(f"not a replica name: {name!r} (expected e.g. worker-1)")
        return cls(TYPES[match[1]], int(match[2]))


def expand(counts: dict[int, int]) -> list[Replica]:
    """Every replica of a job from {type: replica_count}, in type then index order."""
    return [Replica(t, i) for t in ORDER for i in range(counts.get(t, 0))]


def coordinator(replicas: list[Replica]) -> Replica:
    """The replica whose success is the job's: the master, else the chief,
    else worker 0 (TFJob's default success policy)."""
    present = {r.type for r in replicas}
    for t in (pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_CHIEF):
        if t in present:
            return Replica(t, 0)
    return Replica(pb.REPLICA_TYPE_WORKER, 0)


def cluster_spec(addresses: dict[Replica, str]) -> dict[str, list[str]]:
    """{"role": [host:port by index]} for the replicas in the training cluster."""
    cluster: dict[str, list[str]] = {}
    for replica in sorted(addresses):
        if replica.in_cluster:
            cluster.setdefault(replica.role, []).append(addresses[replica])
    for role, hosts in cluster.items():
        indexes = sorted(r.index for r in addresses if r.role == role)
        if indexes != list(range(len(hosts))):
            raise ValueError(f"replicas of {role} are not numbered 0..{len(hosts) - 1}: {indexes}")
    return cluster


def tf_config(cluster: dict[str, list[str]], replica: Replica, trial: str = "") -> str:
    """The TF_CONFIG value (compact JSON) of one replica. For a tuning trial,
    `task.trial` carries the trial number (as Cloud ML Engine's does)."""
    task = {"type": replica.role, "index": replica.index}
    if trial:
        task["trial"] = trial
    return json.dumps({"cluster": cluster, "task": task, "environment": "cloud"},
                      separators=(",", ":"), sort_keys=False)


def members(replicas: list[Replica]) -> list[tuple[str, int]]:
    """(role, index) of each replica in the training cluster, in replica order:
    what the runtime is asked addresses for (the evaluator listens on none)."""
    return [(r.role, r.index) for r in replicas if r.in_cluster]


def assign_addresses(replicas: list[Replica], addresses: Mapping[tuple[str, int], str]) -> dict[Replica, str]:
    """host:port of each replica in the cluster, from the runtime's addresses
    by (role, index); the evaluator gets none."""
    missing = [f"{role}-{index}" for role, index in members(replicas) if (role, index) not in addresses]
    if missing:
        raise ValueError(f"no address for {', '.join(missing)}")
    return {r: addresses[(r.role, r.index)] for r in replicas if r.in_cluster}
