"""The job state machine and the rules that drive it, as pure functions.

    QUEUED ──admit──> PREPARING ──start──> RUNNING ──coordinator exits 0──> SUCCEEDED
      │                  │  │                 │ │
      │ cancel           │  └─InstallFailed,  │ └─replica fails, no retry left,
      v                  │    deadline──> FAILED <── deadline
    CANCELLED            │                    ^
      ^                  v cancel             │ retry left (policy)
      └─────────── CANCELLING <── cancel ── RESTARTING ──start──> RUNNING

Admission needs the tenant's quota and the runtime's capacity for every
replica at once. A failed replica restarts the whole job (every replica is
stopped and started again, as a new attempt) when the restart policy allows,
else fails it. A job succeeds when its coordinator succeeds: the MASTER or
CHIEF, else worker 0 (other workers, the evaluator and parameter servers are
then stopped).

`transition_allowed` is the table the scheduler checks every write against;
`verdict` and `should_restart` decide what a replica's exit means.
"""
from __future__ import annotations

from dataclasses import dataclass

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs.tfconfig import Replica, coordinator

QUEUED, PREPARING, RUNNING = pb.JOB_STATE_QUEUED, pb.JOB_STATE_PREPARING, pb.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED
CANCELLING, RESTARTING = pb.JOB_STATE_CANCELLING, pb.JOB_STATE_RESTARTING

FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# States in which the job holds quota and capacity (and the scheduler drives it).
ACTIVE = frozenset({PREPARING, RUNNING, RESTARTING, CANCELLING})

TRANSITIONS: dict[int, frozenset[int]] = {
    QUEUED: frozenset({PREPARING, CANCELLED}),
    PREPARING: frozenset({RUNNING, FAILED, CANCELLING}),
    RUNNING: frozenset({SUCCEEDED, FAILED, RESTARTING, CANCELLING}),
    RESTARTING: frozenset({RUNNING, FAILED, CANCELLING}),
    CANCELLING: frozenset({CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

# Exit codes at or above this mean "killed by a signal" (128 + N).
SIGNAL_EXIT_BASE = 128


def state_name(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


def transition_allowed(old: int, new: int) -> bool:
    """Whether the state machine allows old -> new (staying put is always allowed)."""
    return old == new or new in TRANSITIONS.get(old, frozenset())


def is_final(state: int) -> bool:
    return state in FINAL


@dataclass(frozen=True)
class Exit:
    """How one replica ended, in the runtime's terms."""

    replica: Replica
    exit_code: int | None
    # The runtime's reason: Completed, Error, OOMKilled, Killed, Lost, Evicted
    # (kubernetes: the node evicted its Pod).
    reason: str = ""
    # The runtime's message: says why a replica that never ran (no exit code)
    # ended, e.g. kubernetes' "InvalidImageName: ...".
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.reason not in ("OOMKilled", "Lost", "Evicted")


@dataclass(frozen=True)
class Verdict:
    """What the exits so far mean for the job."""

    # "running", "succeeded" or "failed"
    outcome: str
    # The replica that decided it (the failed one, or the coordinator).
    exit: Exit | None = None


def verdict(replicas: list[Replica], exits: list[Exit]) -> Verdict:
    """The job's outcome from its replicas' exits, in the order they happened.

    The first failed replica fails the attempt (whatever came after); else the
    coordinator's success is the job's; else it is still running. A
    parameter server or evaluator that exits 0 changes nothing.
    """
    for item in exits:
        if not item.succeeded:
            return Verdict("failed", item)
    chief = coordinator(replicas)
    for item in exits:
        if item.replica == chief:
            return Verdict("succeeded", item)
    return Verdict("running")


def should_restart(policy: int, max_retries: int, attempts: int, failure: Exit) -> bool:
    """Whether a failed attempt (the `attempts`-th, 1-based) starts another.

    NEVER (and UNSPECIFIED): never. ON_FAILURE: any failure, OOMKilled and a
    lost replica included. EXIT_CODE: only exits by signal (code >= 128, which
    covers OOMKilled as 137), lost replicas and evicted ones (the machine's
    fault, not the trainer's). Both retry at most max_retries times: 1 + max_retries attempts.
    """
    if attempts >= 1 + max(0, max_retries):
        return False
    if policy == pb.RESTART_POLICY_ON_FAILURE:
        return True
    if policy == pb.RESTART_POLICY_EXIT_CODE:
        if failure.reason in ("OOMKilled", "Lost", "Evicted"):
            return True
        return failure.exit_code is not None and failure.exit_code >= SIGNAL_EXIT_BASE
    return False


def failure_reason(failure: Exit) -> str:
    """The event reason for a failed replica."""
    if failure.reason == "OOMKilled":
        return "OOMKilled"
    if failure.reason == "Lost":
        return "ReplicaLost"
    if failure.reason == "Evicted":
        return "ReplicaEvicted"
    return "ReplicaFailed"


def failure_message(failure: Exit, memory_limit: str = "") -> str:
    """"ReplicaFailed worker-1 exit 3", "OOMKilled master-0 exit 137 (memory limit 100M)"."""
    reason = failure_reason(failure)
    code = "" if failure.exit_code is None else f" exit {failure.exit_code}"
    text = f"{reason} {failure.replica.name}{code}"
    if reason == "OOMKilled" and memory_limit:
        text += f" (memory limit {memory_limit})"
    if reason == "ReplicaLost":
        text += " (the runtime lost its process)"
    elif failure.exit_code is None and failure.message:
        text += f": {failure.message}"
    return text


def deadline_passed(start: float, timeout: float, now: float) -> bool:
    return timeout > 0 and start > 0 and now >= start + timeout
