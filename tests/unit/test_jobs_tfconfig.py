"""TF_CONFIG as Kubeflow's TFJob builds it, from plain values."""
import json

import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs.tfconfig import Replica, assign_addresses, cluster_spec, coordinator, expand, members, tf_config

MASTER, CHIEF, PS, WORKER, EVALUATOR = (pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_CHIEF, pb.REPLICA_TYPE_PS,
                                        pb.REPLICA_TYPE_WORKER, pb.REPLICA_TYPE_EVALUATOR)


def _loopback(replicas, ports):
    """What the local runtime's addresses() gives: a loopback port per cluster member."""
    return assign_addresses(replicas, {key: f"127.0.0.1:{port}" for key, port in zip(members(replicas), ports)})


def test_expand_orders_by_type_then_index():
    replicas = expand({WORKER: 2, PS: 1, CHIEF: 1, EVALUATOR: 1})
    assert [r.name for r in replicas] == ["chief-0", "ps-0", "worker-0", "worker-1", "evaluator-0"]


def test_replica_names_round_trip():
    assert Replica.parse("worker-12") == Replica(WORKER, 12)
    assert Replica(PS, 0).name == "ps-0"
    for bad in ("worker", "boss-0", "worker-x", "", "worker--1"):
        with pytest.raises(ValueError):
            Replica.parse(bad)


def test_tf_config_for_ps_strategy_matches_tfjob():
    replicas = expand({CHIEF: 1, PS: 1, WORKER: 2})
    addresses = _loopback(replicas, [5001, 5002, 5003, 5004])
    cluster = cluster_spec(addresses)
    config = json.loads(tf_config(cluster, Replica(WORKER, 1)))
    assert config == {
        "cluster": {"chief": ["127.0.0.1:5001"], "ps": ["127.0.0.1:5002"],
                    "worker": ["127.0.0.1:5003", "127.0.0.1:5004"]},
        "task": {"type": "worker", "index": 1},
        "environment": "cloud",
    }


def test_master_is_written_master_not_renamed():
    replicas = expand({MASTER: 1, WORKER: 1})
    cluster = cluster_spec(_loopback(replicas, [1, 2]))
    assert set(cluster) == {"master", "worker"}
    assert json.loads(tf_config(cluster, Replica(MASTER, 0)))["task"] == {"type": "master", "index": 0}


def test_evaluator_is_not_in_the_cluster_but_has_its_task():
    replicas = expand({CHIEF: 1, WORKER: 1, EVALUATOR: 1})
    addresses = _loopback(replicas, [7001, 7002])
    assert Replica(EVALUATOR, 0) not in addresses
    cluster = cluster_spec(addresses)
    assert "evaluator" not in cluster
    config = json.loads(tf_config(cluster, Replica(EVALUATOR, 0)))
    assert config["task"] == {"type": "evaluator", "index": 0}
    assert config["cluster"] == {"chief": ["127.0.0.1:7001"], "worker": ["127.0.0.1:7002"]}


def test_single_master_job_has_a_one_member_cluster():
    cluster = cluster_spec(_loopback(expand({MASTER: 1}), [9000]))
    assert cluster == {"master": ["127.0.0.1:9000"]}


def test_too_few_ports_is_an_error():
    with pytest.raises(ValueError):
        _loopback(expand({WORKER: 3}), [1, 2])


def test_coordinator_is_master_then_chief_then_worker_zero():
    assert coordinator(expand({MASTER: 1, WORKER: 2})) == Replica(MASTER, 0)
    assert coordinator(expand({CHIEF: 1, PS: 1, WORKER: 2})) == Replica(CHIEF, 0)
    assert coordinator(expand({PS: 2, WORKER: 3})) == Replica(WORKER, 0)



def test_trial_number_goes_into_task():
    import json

    from cloudml.jobs.v1 import jobs_service_pb2 as pb
    from services.jobs.tfconfig import Replica, tf_config
    replica = Replica(pb.REPLICA_TYPE_MASTER, 0)
    config = json.loads(tf_config({"master": ["127.0.0.1:1"]}, replica, trial="3"))
    assert config["task"] == {"type": "master", "index": 0, "trial": "3"}
    assert "trial" not in json.loads(tf_config({"master": ["127.0.0.1:1"]}, replica))["task"]
