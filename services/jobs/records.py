"""Helpers over a job record (`TrainJob`): events, replicas, names of what it
holds. Plain functions, shared by the core (API side) and the scheduler."""
from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common.runtime.base import Amount
from services.jobs import policy
from services.jobs.tfconfig import Replica, expand

# Events kept per job: the first (Submitted) and the latest MAX_EVENTS - 1.
MAX_EVENTS = 200


def ts(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def add_event(job: pb.TrainJob, state: int, reason: str, message: str = "", *, now: float | None = None,
              attempt: int | None = None) -> None:
    """Moves the job to `state` (checked against the state machine) and
    records the event; sets end_time on a final state."""
    if not policy.transition_allowed(job.state, state):
        raise ValueError(f"job {job.name}: {policy.state_name(job.state)} -> {policy.state_name(state)} "
                         f"is not a transition of the state machine")
    now = time.time() if now is None else now
    job.state = state
    job.reason = reason
    job.message = message
    job.events.append(pb.JobEvent(time=ts(now), state=state, reason=reason, message=message,
                                  attempt=job.attempts if attempt is None else attempt))
    if len(job.events) > MAX_EVENTS:
        del job.events[1:len(job.events) - MAX_EVENTS + 1]
    if policy.is_final(state) and not job.HasField("end_time"):
        job.end_time.CopyFrom(ts(now))


def replicas_of(spec: pb.TrainJobSpec) -> list[Replica]:
    return expand({rs.type: rs.replica_count for rs in spec.replica_specs})


def resources_of(spec: pb.TrainJobSpec) -> dict[Replica, Amount]:
    per_type = {rs.type: Amount(rs.resources.cpu_millis, rs.resources.memory_bytes, rs.resources.gpus)
                for rs in spec.replica_specs}
    return {r: per_type[r.type] for r in replicas_of(spec)}


def total_of(spec: pb.TrainJobSpec) -> resources_pb2.Resources:
    """What the job reserves against its tenant's quota: every replica's
    resources plus one train job."""
    total = Amount()
    for amount in resources_of(spec).values():
        total = total + amount
    return resources_pb2.Resources(cpu_millis=total.cpu_millis, memory_bytes=total.memory_bytes, gpus=total.gpus,
                                   train_jobs=1)


def pending_replicas(spec: pb.TrainJobSpec) -> list[pb.ReplicaStatus]:
    return [pb.ReplicaStatus(replica=pb.ReplicaId(type=r.type, index=r.index), state=pb.REPLICA_STATE_PENDING)
            for r in replicas_of(spec)]


def replica_status(job: pb.TrainJob, replica: Replica) -> pb.ReplicaStatus | None:
    for status in job.replicas:
        if status.replica.type == replica.type and status.replica.index == replica.index:
            return status
    return None


# --- names of what a job holds --------------------------------------------------------


def group_of(job: pb.TrainJob) -> str:
    """The runtime group (capacity reservation) of a job."""
    return f"jobs.{job.tenant}.{job.name}.{job.uid}"


def replica_id(job: pb.TrainJob, attempt: int, replica: Replica) -> str:
    return f"{group_of(job)}.a{attempt}.{replica.name}"


def owner_id(job: pb.TrainJob) -> str:
    """The quota reservation's owner (tenant is the reservation's own field)."""
    return f"jobs/{job.name}/{job.uid}"


def parse_owner_id(owner: str) -> tuple[str, str] | None:
    """(name, uid) of an owner id this service made, else None."""
    parts = owner.split("/")
    if len(parts) == 3 and parts[0] == "jobs":
        return parts[1], parts[2]
    return None


def format_memory(value: int) -> str:
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    for unit, size in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)
