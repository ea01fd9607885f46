"""The job state machine and restart policies, with plain values."""
import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs import policy, records
from services.jobs.policy import Exit, should_restart, verdict
from services.jobs.tfconfig import Replica, expand

MASTER, CHIEF, PS, WORKER, EVALUATOR = (pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_CHIEF, pb.REPLICA_TYPE_PS,
                                        pb.REPLICA_TYPE_WORKER, pb.REPLICA_TYPE_EVALUATOR)
NEVER, ON_FAILURE, EXIT_CODE = pb.RESTART_POLICY_NEVER, pb.RESTART_POLICY_ON_FAILURE, pb.RESTART_POLICY_EXIT_CODE
S = pb.JobState


def ok(t, i=0):
    return Exit(Replica(t, i), 0, "Completed")


def failed(t, i=0, code=1, reason="Error"):
    return Exit(Replica(t, i), code, reason)


# --- the state machine ---------------------------------------------------------------------

@pytest.mark.parametrize("old,new", [
    (S.JOB_STATE_QUEUED, S.JOB_STATE_PREPARING), (S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED),
    (S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING), (S.JOB_STATE_PREPARING, S.JOB_STATE_FAILED),
    (S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED), (S.JOB_STATE_RUNNING, S.JOB_STATE_RESTARTING),
    (S.JOB_STATE_RESTARTING, S.JOB_STATE_RUNNING), (S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING),
    (S.JOB_STATE_CANCELLING, S.JOB_STATE_CANCELLED), (S.JOB_STATE_QUEUED, S.JOB_STATE_QUEUED),
])
def test_allowed_transitions(old, new):
    assert policy.transition_allowed(old, new)


@pytest.mark.parametrize("old,new", [
    (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING), (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_RUNNING),
    (S.JOB_STATE_FAILED, S.JOB_STATE_RESTARTING), (S.JOB_STATE_CANCELLED, S.JOB_STATE_QUEUED),
    (S.JOB_STATE_CANCELLING, S.JOB_STATE_SUCCEEDED), (S.JOB_STATE_QUEUED, S.JOB_STATE_FAILED),
])
def test_forbidden_transitions(old, new):
    assert not policy.transition_allowed(old, new)


def test_final_states_have_no_way_out():
    for state in policy.FINAL:
        assert policy.TRANSITIONS[state] == frozenset()


def test_add_event_records_state_reason_and_end_time():
    job = pb.TrainJob(name="j", state=S.JOB_STATE_RUNNING, attempts=2)
    records.add_event(job, S.JOB_STATE_FAILED, "ReplicaFailed", "ReplicaFailed worker-1 exit 3", now=100.0)
    assert (job.state, job.reason, job.message) == (S.JOB_STATE_FAILED, "ReplicaFailed",
                                                    "ReplicaFailed worker-1 exit 3")
    assert job.events[-1].attempt == 2 and job.events[-1].time.seconds == 100
    assert job.end_time.seconds == 100
    with pytest.raises(ValueError):
        records.add_event(job, S.JOB_STATE_RUNNING, "Started")


def test_event_list_is_capped_keeping_the_first():
    job = pb.TrainJob(name="j", state=S.JOB_STATE_QUEUED)
    records.add_event(job, S.JOB_STATE_QUEUED, "Submitted", now=1)
    for i in range(records.MAX_EVENTS + 50):
        records.add_event(job, S.JOB_STATE_QUEUED, f"E{i}", now=2 + i)
    assert len(job.events) == records.MAX_EVENTS
    assert job.events[0].reason == "Submitted"
    assert job.events[-1].reason == f"E{records.MAX_EVENTS + 49}"


# --- outcomes ------------------------------------------------------------------------------

def test_job_succeeds_when_the_master_succeeds():
    replicas = expand({MASTER: 1})
    assert verdict(replicas, []).outcome == "running"
    assert verdict(replicas, [ok(MASTER)]).outcome == "succeeded"


def test_chief_success_ends_a_ps_job_while_workers_and_ps_still_run():
    replicas = expand({CHIEF: 1, PS: 2, WORKER: 2})
    assert verdict(replicas, [ok(WORKER, 1)]).outcome == "running"
    assert verdict(replicas, [ok(WORKER, 1), ok(CHIEF)]).outcome == "succeeded"


def test_worker_zero_decides_without_master_or_chief():
    replicas = expand({PS: 1, WORKER: 3})
    assert verdict(replicas, [ok(WORKER, 2), ok(PS)]).outcome == "running"
    assert verdict(replicas, [ok(WORKER, 0)]).outcome == "succeeded"


def test_first_failure_fails_the_attempt():
    replicas = expand({CHIEF: 1, WORKER: 2})
    result = verdict(replicas, [failed(WORKER, 1, 3), ok(CHIEF)])
    assert result.outcome == "failed" and result.exit.replica == Replica(WORKER, 1)
    assert policy.failure_message(result.exit) == "ReplicaFailed worker-1 exit 3"


def test_oom_killed_counts_as_failure_even_with_code_137():
    replicas = expand({MASTER: 1})
    oom = failed(MASTER, code=137, reason="OOMKilled")
    assert verdict(replicas, [oom]).outcome == "failed"
    assert policy.failure_reason(oom) == "OOMKilled"
    assert policy.failure_message(oom, "100M") == "OOMKilled master-0 exit 137 (memory limit 100M)"


def test_a_replica_that_never_ran_fails_with_the_runtimes_message():
    never = Exit(Replica(MASTER, 0), None, "Error", 'InvalidImageName: couldn\'t parse image reference "A B"')
    assert policy.failure_message(never) == \
        'ReplicaFailed master-0: InvalidImageName: couldn\'t parse image reference "A B"'
    # An exit code says enough (the runtime's message would repeat it).
    assert policy.failure_message(Exit(Replica(MASTER, 0), 3, "Error", "exited with code 3")) == \
        "ReplicaFailed master-0 exit 3"


def test_lost_replica_is_a_failure():
    lost = Exit(Replica(MASTER, 0), None, "Lost")
    assert verdict(expand({MASTER: 1}), [lost]).outcome == "failed"
    assert policy.failure_reason(lost) == "ReplicaLost"


# --- restart policies ----------------------------------------------------------------------

@pytest.mark.parametrize("policy_value", [NEVER, pb.RESTART_POLICY_UNSPECIFIED])
def test_never_does_not_restart(policy_value):
    assert not should_restart(policy_value, 5, 1, failed(MASTER, code=137, reason="OOMKilled"))


def test_on_failure_restarts_up_to_max_retries():
    failure = failed(MASTER, code=1)
    assert should_restart(ON_FAILURE, 2, 1, failure)
    assert should_restart(ON_FAILURE, 2, 2, failure)
    assert not should_restart(ON_FAILURE, 2, 3, failure)  # 1 + 2 attempts done
    assert not should_restart(ON_FAILURE, 0, 1, failure)


def test_exit_code_retries_only_signals_oom_and_lost():
    assert not should_restart(EXIT_CODE, 3, 1, failed(MASTER, code=1))
    assert not should_restart(EXIT_CODE, 3, 1, failed(MASTER, code=127))
    assert should_restart(EXIT_CODE, 3, 1, failed(MASTER, code=128))
    assert should_restart(EXIT_CODE, 3, 1, failed(MASTER, code=143))
    assert should_restart(EXIT_CODE, 3, 1, failed(MASTER, code=137, reason="OOMKilled"))
    assert should_restart(EXIT_CODE, 3, 1, Exit(Replica(MASTER, 0), None, "Lost"))
    assert should_restart(EXIT_CODE, 3, 1, Exit(Replica(MASTER, 0), 0, "Evicted"))
    assert not should_restart(EXIT_CODE, 3, 4, failed(MASTER, code=143))


def test_deadline():
    assert not policy.deadline_passed(100.0, 0, 1e9)
    assert not policy.deadline_passed(100.0, 10, 109.9)
    assert policy.deadline_passed(100.0, 10, 110.0)


def test_an_evicted_replica_failed_and_says_so():
    evicted = Exit(Replica(MASTER, 0), 137, "Evicted")
    assert not evicted.succeeded and not Exit(Replica(MASTER, 0), 0, "Evicted").succeeded
    assert policy.failure_reason(evicted) == "ReplicaEvicted"
    assert policy.failure_message(evicted) == "ReplicaEvicted master-0 exit 137"
