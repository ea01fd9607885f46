"""`cloudml jobs submit` spec building, without a platform: flags, the seed's
JSON spec file, and how the two combine."""
from __future__ import annotations

import json

import pytest

from cloudml.cli.base import UsageError
from cloudml.cli.commands.jobs import build_spec, load_seed_spec, parse_duration, parse_replica
from cloudml.cli.main import build_parser
from cloudml.jobs.v1 import jobs_service_pb2 as pb


@pytest.fixture
def package(tmp_path):
    path = tmp_path / "trainer-1.0.tar.gz"
    path.write_bytes(b"not really a tarball")
    return str(path)


def args_of(*argv):
    return build_parser().parse_args(["jobs", "submit", *argv])


def test_seed_flags_build_a_master_with_per_replica_resources(package):
    name, spec = build_spec(args_of("-n", "linear", "-m", "trainer.task", "-u", package, "-a", "--max_epochs 5000",
                                    "-c", "0.5", "-M", "100M", "-g", "1"))
    assert name == "linear" and spec.module_name == "trainer.task"
    assert spec.trainer_uri == "file://" + package
    assert list(spec.job_args) == ["--max_epochs", "5000"]
    (master,) = spec.replica_specs
    assert master.type == pb.REPLICA_TYPE_MASTER and master.replica_count == 1
    assert (master.resources.cpu_millis, master.resources.memory_bytes, master.resources.gpus) == (500, 100_000_000, 1)


def test_distributed_flags(package):
    _, spec = build_spec(args_of("-n", "d", "-m", "t.task", "-u", package, "--ps", "1", "--workers", "2", "--chief",
                                 "--env", "A=1", "--env", "B=x=y", "--timeout", "10m", "--restart-policy",
                                 "on_failure", "--max-retries", "3"))
    assert [(r.type, r.replica_count) for r in spec.replica_specs] == [
        (pb.REPLICA_TYPE_CHIEF, 1), (pb.REPLICA_TYPE_PS, 1), (pb.REPLICA_TYPE_WORKER, 2)]
    assert dict(spec.env) == {"A": "1", "B": "x=y"}
    assert spec.timeout.seconds == 600
    assert spec.restart_policy == pb.RESTART_POLICY_ON_FAILURE and spec.max_retries == 3


def test_seed_json_spec_and_flag_overrides(tmp_path, package):
    seed = {"job_name": "linear", "module_name": "trainer.task", "trainer_uri": package,
            "job_args": "--max_epochs 5000 --note 'two words'", "cpu_limit": "0.5", "memory_limit": "1Gi",
            "ps_count": 1, "worker_count": 2, "framework": "tensorflow"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(seed))
    notes = []
    loaded = load_seed_spec(str(path), notes.append)
    assert notes and "framework" in notes[0]
    name, spec = build_spec(args_of("-f", str(path), "-c", "2"), loaded)
    assert name == "linear"
    assert list(spec.job_args) == ["--max_epochs", "5000", "--note", "two words"]
    assert [r.type for r in spec.replica_specs] == [pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_PS, pb.REPLICA_TYPE_WORKER]
    assert {r.resources.cpu_millis for r in spec.replica_specs} == {2000}
    assert {r.resources.memory_bytes for r in spec.replica_specs} == {2**30}


def test_job_args_as_a_list_in_the_seed_file(tmp_path, package):
    _, spec = build_spec(args_of(), {"job_name": "a", "module_name": "m", "trainer_uri": "s3://b/t-1.tar.gz",
                                     "job_args": ["--x", "1 2"]})
    assert list(spec.job_args) == ["--x", "1 2"] and spec.trainer_uri == "s3://b/t-1.tar.gz"


def test_unknown_seed_field_is_a_usage_error(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"job_name": "a", "bogus": 1}))
    with pytest.raises(UsageError, match="bogus"):
        load_seed_spec(str(path))


def test_missing_essentials_and_missing_package_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="name"):
        build_spec(args_of("-m", "t.task"), None)
    with pytest.raises(UsageError, match="not a file"):
        build_spec(args_of("-n", "a", "-m", "t.task", "-u", str(tmp_path / "missing.tar.gz")), None)


def test_durations_and_replica_names():
    assert parse_duration("90") == 90 and parse_duration("2h") == 7200 and parse_duration(1.5) == 1.5
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert parse_replica("worker-1") == pb.ReplicaId(type=pb.REPLICA_TYPE_WORKER, index=1)
    with pytest.raises(ValueError):
        parse_replica("boss-1")


def test_logs_and_list_flags_parse():
    args = build_parser().parse_args(["jobs", "logs", "linear", "-f", "--replica", "worker-1", "--tail", "5"])
    assert args.follow and args.tail == 5 and args.replica[0].index == 1
    args = build_parser().parse_args(["jobs", "list", "--state", "running", "--state", "queued", "-o", "json"])
    assert args.state == ["running", "queued"] and args.output == "json"
