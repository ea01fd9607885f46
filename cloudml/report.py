"""`cloudml.report`: a trainer reports its metrics to the platform.

    import cloudml
    cloudml.report(step=epoch, loss=loss, accuracy=acc)

On the platform every replica gets `CLOUDML_METRICS_FILE`; each call appends
one JSON line to it, which the jobs service ingests:

    {"step": 3, "metrics": {"loss": 0.25}, "time": 1767225600.123,
     "replica": "worker-1", "attempt": 1}

The line is written with a single `write(2)` on a descriptor opened with
`O_APPEND`, so lines from concurrent replicas (or threads) never interleave.
There is no flush/fsync per call: the kernel's page cache is enough for a
reader on the same machine, and training is not slowed down.

Outside the platform (no `CLOUDML_METRICS_FILE`) a call validates its
arguments and does nothing else, so the same trainer runs on a laptop.

Arguments are checked the same way everywhere: `step` is a non-negative
integer, metric names match `[A-Za-z0-9_./-]{1,128}`, values are finite real
numbers (anything `float()` accepts except strings and bools, e.g. NumPy
scalars or 0-d tensors). Anything else raises `ValueError`. An I/O error while
writing (a full disk) is logged, not raised: metrics never kill a training run.

This module only uses the standard library: `import cloudml` stays cheap.
"""
from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
import sys
import time
import types

__all__ = ["report", "METRICS_FILE_ENV"]

METRICS_FILE_ENV = "CLOUDML_METRICS_FILE"

_log = logging.getLogger("cloudml.report")
_NAME = re.compile(r"[A-Za-z0-9_./-]{1,128}")


def _check_step(step) -> int:
    if isinstance(step, bool):
        raise ValueError(f"step must be an integer, got {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be an integer, got {type(step).__name__} {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def _check_value(name: str, value) -> float:
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"metric {name!r} must be finite, got {number!r}")
    return number


def _record(step: int, metrics: dict) -> dict:
    env = os.environ
    replica_type = env.get("CLOUDML_REPLICA_TYPE") or "master"
    replica_index = env.get("CLOUDML_REPLICA_INDEX") or "0"
    try:
        attempt = int(env.get("CLOUDML_ATTEMPT") or 1)
    except ValueError:
        attempt = 1
    return {
        "step": step,
        "metrics": metrics,
        "time": time.time(),
        "replica": f"{replica_type}-{replica_index}",
        "attempt": attempt,
    }


def report(step: int, **metrics: float) -> None:
    """Records `metrics` (name=value, at least one) at training step `step`.

    Raises ValueError for a bad step, name or value; otherwise never raises.
    """
    step = _check_step(step)
    if not metrics:
        raise ValueError("report() needs at least one metric, e.g. report(step=1, loss=0.5)")
    values = {}
    for name, value in metrics.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} must match [A-Za-z0-9_./-]{{1,128}}")
        values[name] = _check_value(name, value)

    path = os.environ.get(METRICS_FILE_ENV)
    if not path:
        _log.debug("not on the platform (%s unset): step %d %s", METRICS_FILE_ENV, step, values)
        return
    line = (json.dumps(_record(step, values), separators=(",", ":"), allow_nan=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):  # only on exotic filesystems; keep the data
                written += os.write(fd, line[written:])
        finally:
            os.close(fd)
    except OSError as exc:
        _log.warning("cloudml.report: could not append to %s: %s", path, exc)


class _CallableModule(types.ModuleType):
    """`import cloudml.report as r; r(step=1, loss=0.5)` works too.

    `cloudml/__init__.py` binds `cloudml.report` to the function; this keeps
    the submodule usable the same way wherever it is reached as a module.
    """

    def __call__(self, step: int, **metrics: float) -> None:
        report(step, **metrics)


sys.modules[__name__].__class__ = _CallableModule
