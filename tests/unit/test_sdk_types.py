"""The SDK's typed results and argument handling, without a platform (what
reaches the wire is covered by tests/integration/test_sdk_examples.py)."""
from __future__ import annotations

import numpy as np
import pytest

import cloudml
from cloudml import errors
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.sdk import models as sdk_models
from cloudml.sdk.types import Job, Metrics, ModelVersion, Study, Trial
from cloudml.tuner.v1 import tuner_service_pb2 as tuner_pb


@pytest.fixture
def client(monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDML_CONFIG", str(tmp_path / "none.json"))
    with cloudml.Client("127.0.0.1:1", "AKUNIT", "secret") as c:  # nothing is sent by these tests
        yield c


def test_job_wrapper_names_states_and_replicas():
    proto = jobs_pb.TrainJob(name="j", tenant="t", state=jobs_pb.JOB_STATE_FAILED, reason="ReplicaFailed",
                             message="master-0 exit 1: No module named x")
    proto.replicas.add(replica=jobs_pb.ReplicaId(type=jobs_pb.REPLICA_TYPE_WORKER, index=1),
                       state=jobs_pb.REPLICA_STATE_FAILED)
    job = Job(proto, created=True)
    assert (job.name, job.state, job.done, job.succeeded) == ("j", "FAILED", True, False)
    assert job.replicas == {"worker-1": "FAILED"} and job.create_time is None
    assert job.to_dict()["state"] == "JOB_STATE_FAILED" and "Job(name='j', state='FAILED'" in repr(job)


def test_metrics_series_by_name_and_replica():
    resp = jobs_pb.GetJobMetricsResponse()
    for index in (0, 1):
        series = resp.series.add(name="loss", replica=jobs_pb.ReplicaId(type=jobs_pb.REPLICA_TYPE_WORKER,
                                                                         index=index))
        series.points.add(step=1, value=0.5 + index)
        series.points.add(step=2, value=0.25 + index)
    metrics = Metrics(resp)
    assert metrics.names == ["loss"] and len(metrics.series("loss")) == 2
    (w1,) = metrics.series("loss", replica="worker-1")
    assert w1.steps == [1, 2] and w1.values == [1.5, 1.25] and w1.points[0].step == 1


def test_study_and_trial_wrappers():
    best = tuner_pb.Trial(number=2, state=tuner_pb.TRIAL_STATE_SUCCEEDED, objective_value=0.5, job_name="s-2")
    best.params["lr"].double_value = 0.1
    best.params["opt"].string_value = "sgd"
    study = Study(tuner_pb.Study(name="s", state=tuner_pb.STUDY_STATE_RUNNING, best_trial=best,
                                 spec=tuner_pb.StudySpec(metric="loss", goal=tuner_pb.GOAL_MINIMIZE, max_trials=4),
                                 trial_counts=tuner_pb.TrialCounts(succeeded=2, running=1, pending=1)))
    assert study.counts == {"pending": 1, "running": 1, "succeeded": 2, "failed": 0, "early_stopped": 0,
                            "cancelled": 0}
    assert not study.done and study.goal == "MINIMIZE" and study.metric == "loss"
    assert study.best_trial == Trial(best) and study.best_trial.params == {"lr": 0.1, "opt": "sgd"}
    assert Trial(tuner_pb.Trial(number=3)).objective is None


def test_model_version_counts_ready_replicas():
    proto = models_pb.ModelVersion(model="m", version=2, state=models_pb.MODEL_VERSION_STATE_LOADING,
                                   desired_replicas=2)
    proto.replicas.add(state=models_pb.MODEL_VERSION_STATE_AVAILABLE)
    proto.replicas.add(state=models_pb.MODEL_VERSION_STATE_LOADING)
    version = ModelVersion(proto)
    assert (version.state, version.ready_replicas, version.desired_replicas) == ("LOADING", 1, 2)


def test_predict_answers_become_arrays():
    one = sdk_models._from_json({"predictions": [[1.0], [2.0]]})
    assert isinstance(one, np.ndarray) and one.shape == (2, 1)
    rows = sdk_models._from_json({"predictions": [{"keys": [1], "y": [3.0]}, {"keys": [2], "y": [5.0]}]})
    assert rows["keys"].tolist() == [[1], [2]] and rows["y"].tolist() == [[3.0], [5.0]]
    columns = sdk_models._from_json({"outputs": {"y": [[3.0]]}})
    assert columns["y"].tolist() == [[3.0]]
    assert sdk_models._to_json({"X": np.array([[1.0]], dtype=np.float32), "k": [np.int64(3)]}) == {
        "X": [[1.0]], "k": [3]}


def test_predict_takes_exactly_one_kind_of_data(client):
    with pytest.raises(errors.SpecError, match="one of instances, inputs or data"):
        client.models.predict("m")
    with pytest.raises(errors.SpecError, match="one of instances, inputs or data"):
        client.models.predict("m", [[1.0]], inputs={"x": [[1.0]]})


def test_bad_job_and_version_arguments_fail_before_anything_is_sent(client):
    with pytest.raises(errors.SpecError, match="invalid memory"):
        client.jobs.submit("j", module="m", package="s3://b/p.tar.gz", memory="lots")
    with pytest.raises(errors.SpecError, match="a job needs a name"):
        client.jobs.submit(module="m", package="s3://b/p.tar.gz")
    with pytest.raises(errors.SpecError, match="unknown job state"):
        list(client.jobs.list(states=["SLEEPING"]))
    with pytest.raises(errors.SpecError, match="either replicas or min_replicas"):
        client.models.version_spec("s3://b/m", replicas=2, min_replicas=1)
    spec = client.models.version_spec("s3://b/m", version="v3", max_replicas=4, cpu="500m", memory="1Gi",
                                      batching={"max_batch_size": 8})
    assert (spec.version, spec.min_replicas, spec.max_replicas, spec.resources.cpu_millis) == (3, 1, 4, 500)
    assert spec.batching.enabled and spec.batching.max_batch_size == 8
    with pytest.raises(errors.SpecError, match="a study needs a `hyperparameters` object"):
        client.studies.submit({"job_name": "s", "module_name": "m", "trainer_uri": "s3://b/p.tar.gz"})
