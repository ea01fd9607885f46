"""The runtime a service's `--runtime` flag names, and where its state lives.

The jobs and models services both place their replicas through the runtime
`make_runtime()` builds. (Not in the package's `__init__`: the local
runtime's shim imports `services.common.runtime.shim` with no site packages
and must stay quick to start.)
"""
from __future__ import annotations

import os

from services.common.runtime.base import Amount, Runtime

RUNTIMES = ("local",)


def runtime_state_dir(data_dir: str, kind: str) -> str:
    """The runtime's state under the platform's data directory. Shared by every
    service that places replicas on this runtime (jobs and models): one
    capacity ledger for the machine, so train jobs and model replicas never
    over-commit it together. Each service adopts only its own replicas."""
    return os.path.join(data_dir, "runtime", kind)


def make_runtime(kind: str, data_dir: str, capacity_cpu: int | None = None,
                 capacity_memory: int | None = None) -> Runtime:
    """The runtime named `kind`, its state in `runtime_state_dir(data_dir, kind)`.
    `capacity_cpu` (millis) and `capacity_memory` (bytes) override what the
    machine has (None: probe it)."""
    if kind not in RUNTIMES:
        raise SystemExit(f"error: --runtime {kind!r} is not available (only 'local')")
    from services.common.runtime.local import LocalRuntime  # noqa: PLC0415 - only the runtime in use is loaded

    state_dir = runtime_state_dir(data_dir, kind)
    total = None
    if capacity_cpu is not None or capacity_memory is not None:
        probe = LocalRuntime(state_dir).total()
        total = Amount(capacity_cpu if capacity_cpu is not None else probe.cpu_millis,
                       capacity_memory if capacity_memory is not None else probe.memory_bytes, probe.gpus)
    return LocalRuntime(state_dir, total=total)
