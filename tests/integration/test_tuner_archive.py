"""Finished studies move from etcd to the archive with their trials and keep
reading back (services/tuner/archiver.py), on the session's etcd and auth
service with real jobs and tuner processes, a retention of 3 s."""
from __future__ import annotations

import os

import grpc
import pytest

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.tuner.store import study_key
from tests.integration.auth_helpers import wait_until
from tests.integration.conftest import ADMIN_ACCESS_KEY
from tests.integration.jobs_helpers import expect_error
from tests.integration.tuner_stack import TunerStack, build_trainers, double, template

Code = grpc.StatusCode
RETENTION = 3.0


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    return build_trainers(str(tmp_path_factory.mktemp("tuner-arc-packages")), str(tmp_path_factory.mktemp("src")))


@pytest.fixture(scope="module")
def stack(etcd_server, auth_service, tmp_path_factory):
    stack = TunerStack(str(tmp_path_factory.mktemp("tuner-archive")), etcd_server.endpoint, ADMIN_ACCESS_KEY,
                       auth_service.admin_secret, envs_dir=str(tmp_path_factory.mktemp("tuner-arc-envs")))
    stack.harness.service_flags["tuner"] += ["--retention-seconds", str(RETENTION), "--archive-seconds", "0.2"]
    stack.start()
    yield stack
    stack.stop()


def study_spec(packages, max_trials: int = 2, sleep: float = 0.0) -> pb.StudySpec:
    return pb.StudySpec(
        trial_template=template(packages["plain"], "plain_trainer.task", ["--steps", "1", "--sleep", str(sleep)]),
        goal=pb.GOAL_MINIMIZE, metric="objective", algorithm=pb.ALGORITHM_RANDOM, max_trials=max_trials,
        parameters=[double("x1", -5.0, 10.0), double("x2", 0.0, 15.0)])


def test_finished_study_is_archived_with_its_trials_and_reads_back(stack, auth_service, built):
    member, other = auth_service.new_tenant("hparc"), auth_service.new_tenant("hparc-other")
    client, intruder = stack.client(member.token, member.tenant), stack.client(other.token, other.tenant)
    packages = client.packages(built)
    spec = study_spec(packages)
    client.create("done", spec)
    done = client.wait("done", timeout=180)
    assert done.state == pb.STUDY_STATE_SUCCEEDED
    trials = client.trials("done")
    pointer = os.path.join(stack.data_dir, "archive", "studies", member.tenant, "names", "done.json")
    wait_until(lambda: os.path.exists(pointer) and not stack.harness.etcd.get_prefix(study_key(member.tenant, "done")),
               RETENTION + 60, what="the study archived")
    assert not [k for k in stack.harness.etcd.get_prefix("/cloudml/tuner/") if f"/{member.tenant}/done" in k]

    assert client.get("done") == done
    assert client.trials("done") == trials and len(trials) == 2
    assert client.call("GetTrial", pb.GetTrialRequest(study="done", number=2)).trial == trials[1]
    first = client.call("ListTrials", pb.ListTrialsRequest(study="done", page_size=1))
    rest = client.call("ListTrials", pb.ListTrialsRequest(study="done", page_token=first.next_page_token))
    assert list(first.trials) + list(rest.trials) == trials and not rest.next_page_token
    assert client.cancel("done").state == pb.STUDY_STATE_SUCCEEDED
    expect_error(Code.FAILED_PRECONDITION, client.call, "SuggestTrials",
                 pb.SuggestTrialsRequest(study="done", count=1, client_id="me"))
    assert not client.call("ShouldStopTrial", pb.ShouldStopTrialRequest(study="done", number=1)).should_stop

    # Listed in name order with live studies, paged across the two.
    client.create("b-live", study_spec(packages, max_trials=1, sleep=30))
    client.create("z-live", study_spec(packages, max_trials=1, sleep=30))
    names, token = [], ""
    while True:
        page = client.call("ListStudies", pb.ListStudiesRequest(page_size=1, page_token=token))
        names += [s.name for s in page.studies]
        token = page.next_page_token
        if not token:
            break
    assert names == ["b-live", "done", "z-live"]
    succeeded = client.call("ListStudies", pb.ListStudiesRequest(states=[pb.STUDY_STATE_SUCCEEDED])).studies
    assert [s.name for s in succeeded] == ["done"]
    client.cancel("b-live")
    client.cancel("z-live")

    # Another tenant sees nothing of it.
    for method, request in (("GetStudy", pb.GetStudyRequest(tenant=member.tenant, name="done")),
                            ("ListTrials", pb.ListTrialsRequest(tenant=member.tenant, study="done")),
                            ("GetTrial", pb.GetTrialRequest(tenant=member.tenant, study="done", number=1)),
                            ("CancelStudy", pb.CancelStudyRequest(tenant=member.tenant, name="done")),
                            ("DeleteStudy", pb.DeleteStudyRequest(tenant=member.tenant, name="done")),
                            ("GetStudy", pb.GetStudyRequest(name="done"))):
        expect_error(Code.NOT_FOUND, intruder.call, method, request)
    assert [s.name for s in intruder.call("ListStudies", pb.ListStudiesRequest()).studies] == []

    # Its name stays taken until it is deleted.
    bigger = study_spec(packages, max_trials=3)
    expect_error(Code.ALREADY_EXISTS, client.create, "done", bigger)
    assert not client.create("done", spec).created
    client.call("DeleteStudy", pb.DeleteStudyRequest(name="done"))
    expect_error(Code.NOT_FOUND, client.get, "done")
    assert not os.path.exists(pointer)
    assert client.create("done", bigger).created
    client.cancel("done")
