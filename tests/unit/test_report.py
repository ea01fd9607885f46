"""`cloudml.report`: the JSON-lines contract with the jobs service."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

import cloudml
from cloudml.report import report

PLATFORM_ENV = ("CLOUDML_METRICS_FILE", "CLOUDML_REPLICA_TYPE", "CLOUDML_REPLICA_INDEX", "CLOUDML_ATTEMPT")


@pytest.fixture
def metrics_file(tmp_path, monkeypatch):
    for name in PLATFORM_ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("CLOUDML_METRICS_FILE", str(path))
    return path


def read_lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_report_is_exported_as_cloudml_report():
    assert cloudml.report is report
    assert "report" in cloudml.__all__


def test_import_cloudml_does_not_load_grpc():
    code = "import sys, cloudml; cloudml.report; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_report_appends_one_json_line_per_call(metrics_file, monkeypatch):
    monkeypatch.setenv("CLOUDML_REPLICA_TYPE", "worker")
    monkeypatch.setenv("CLOUDML_REPLICA_INDEX", "1")
    monkeypatch.setenv("CLOUDML_ATTEMPT", "2")
    report(step=0, loss=5.5)
    report(step=1, loss=0.25, accuracy=0.9)
    first, second = read_lines(metrics_file)
    assert first["step"] == 0 and first["metrics"] == {"loss": 5.5}
    assert second["metrics"] == {"loss": 0.25, "accuracy": 0.9}
    assert second["replica"] == "worker-1" and second["attempt"] == 2
    assert abs(second["time"] - __import__("time").time()) < 60
    assert set(second) == {"step", "metrics", "time", "replica", "attempt"}


def test_report_defaults_replica_to_master_0_attempt_1(metrics_file):
    report(step=3, loss=1)
    (line,) = read_lines(metrics_file)
    assert line["replica"] == "master-0" and line["attempt"] == 1
    assert line["metrics"] == {"loss": 1.0} and isinstance(line["metrics"]["loss"], float)


def test_report_accepts_numpy_like_scalars(metrics_file):
    class Scalar:  # what NumPy scalars and 0-d tensors offer
        def __float__(self):
            return 0.5

        def __index__(self):
            return 7

    report(step=Scalar(), loss=Scalar(), names_with_dots_and_slashes=1)
    report(step=1, **{"eval/loss.v-2": 2})
    lines = read_lines(metrics_file)
    assert lines[0]["step"] == 7 and lines[0]["metrics"]["loss"] == 0.5
    assert lines[1]["metrics"] == {"eval/loss.v-2": 2.0}


def test_report_outside_the_platform_writes_nothing(tmp_path, monkeypatch):
    for name in PLATFORM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    report(step=1, loss=0.1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1.5", b"1", None, True, [1.0], object()])
def test_report_rejects_non_finite_or_non_numeric_values(metrics_file, value):
    with pytest.raises(ValueError, match="loss"):
        report(step=1, loss=value)
    assert not metrics_file.exists()


@pytest.mark.parametrize("name", ["", "x" * 129, "a b", "loss!", "é", "a\nb"])
def test_report_rejects_bad_metric_names(metrics_file, name):
    with pytest.raises(ValueError, match="metric name"):
        report(step=1, **{name: 1.0})


def test_report_accepts_a_128_character_name(metrics_file):
    report(step=1, **{"x" * 128: 1.0})
    assert read_lines(metrics_file)[0]["metrics"] == {"x" * 128: 1.0}


@pytest.mark.parametrize("step", [-1, 1.5, "3", None, True])
def test_report_rejects_bad_steps(metrics_file, step):
    with pytest.raises(ValueError, match="step"):
        report(step=step, loss=1.0)


def test_report_needs_a_metric(metrics_file):
    with pytest.raises(ValueError, match="at least one metric"):
        report(step=1)


def test_report_io_error_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLOUDML_METRICS_FILE", str(tmp_path / "no-such-dir" / "metrics.jsonl"))
    report(step=1, loss=1.0)
    assert "could not append" in caplog.text


def test_submodule_is_callable_too(metrics_file):
    module = sys.modules["cloudml.report"]
    module(step=2, loss=0.5)
    assert read_lines(metrics_file)[0]["step"] == 2


def _hammer(replica: int | None, count: int) -> None:
    if replica is not None:  # a forked child: its own environment
        os.environ["CLOUDML_REPLICA_INDEX"] = str(replica)
    for i in range(count):
        report(step=i, loss=float(i), **{f"padding_{j}": 1.0 for j in range(20)})


def test_concurrent_writers_never_interleave_lines(metrics_file, monkeypatch):
    monkeypatch.setenv("CLOUDML_REPLICA_INDEX", "9")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(r, 300)) for r in range(3)]
    threads = [threading.Thread(target=_hammer, args=(None, 300))]
    for p in procs + threads:
        p.start()
    for p in procs + threads:
        p.join()
    lines = read_lines(metrics_file)  # every line parses
    assert len(lines) == 4 * 300
    per_replica = {}
    for line in lines:
        per_replica.setdefault(line["replica"], []).append(line["step"])
    assert set(per_replica) == {"master-0", "master-1", "master-2", "master-9"}
    assert all(sorted(steps) == list(range(300)) for steps in per_replica.values())
