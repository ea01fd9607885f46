#!/usr/bin/env python3
"""What tenant isolation adds to starting a replica (issue 10).

The local runtime's `start()` of a replica, isolation on (the replica runs as
its tenant's own user through setpriv) against isolation off (as the
platform's user), the two alternating call by call in one process on one
state directory, so both sides see the same machine. Each start is timed
from `start()` to the replica's first line in its log (the process is up and
running Python, not only spawned), for a `python -I -S -c print(...)`
replica. The tenant's account exists before the timed calls (it is created
once per tenant, on its first replica: that one-time cost is printed too).

    .venv/bin/python bench/bench_isolation.py [--starts 40] [--json]

Needs root (isolation needs it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from services.common.runtime.base import Amount, ReplicaRequest  # noqa: E402
from services.common.runtime.local import LocalRuntime  # noqa: E402
from services.common.tenancy import Tenancy  # noqa: E402


async def start_to_first_line(runtime: LocalRuntime, base: str, rid: str, tenant: str) -> float:
    log = os.path.join(base, "logs", rid + ".log")
    runtime.reserve(rid, [Amount(10)])
    began = time.perf_counter()
    await runtime.start(ReplicaRequest(rid, rid, [sys.executable, "-I", "-S", "-c", "print('up', flush=True)"],
                                       {}, os.path.join(base, "work", rid), log, Amount(10), tenant=tenant))
    while True:
        try:
            with open(log, "rb") as f:
                if b"up" in f.read():
                    break
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.0005)
    took = time.perf_counter() - began
    await runtime.wait(rid, 10)
    await runtime.forget(rid)
    runtime.release(rid)
    return took


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 2)}


async def main(args) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("bench_isolation needs root: tenant isolation switches users")
    base = tempfile.mkdtemp(prefix="bench-isolation-")
    os.chmod(base, 0o711)
    state = os.path.join(base, "state")
    total = Amount(64000, 64 << 30, 0)
    isolated = LocalRuntime(state, total=total, tenancy=Tenancy(enabled=True))
    shared = LocalRuntime(state, total=total, tenancy=Tenancy(enabled=False))
    tenant = f"bench-{os.getpid()}"
    began = time.perf_counter()
    isolated.tenancy.account(tenant)
    first_account = time.perf_counter() - began
    await start_to_first_line(isolated, base, "warm-a", tenant)
    await start_to_first_line(shared, base, "warm-b", tenant)
    on, off = [], []
    for i in range(args.starts):
        on.append(await start_to_first_line(isolated, base, f"on-{i}", tenant))
        off.append(await start_to_first_line(shared, base, f"off-{i}", tenant))
    result = {"starts_each": args.starts, "isolation_on": summary(on), "isolation_off": summary(off),
              "p50_added_ms": round((statistics.median(on) - statistics.median(off)) * 1e3, 2),
              "p50_ratio": round(statistics.median(on) / statistics.median(off), 3),
              "tenant_account_first_use_ms": round(first_account * 1e3, 1)}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(main(args))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"replica start -> first log line, {out['starts_each']} starts each, alternating:")
        print(f"  isolation on  (tenant's user, setpriv): p50 {out['isolation_on']['p50_ms']} ms, "
              f"p99 {out['isolation_on']['p99_ms']} ms")
        print(f"  isolation off (platform's user):        p50 {out['isolation_off']['p50_ms']} ms, "
              f"p99 {out['isolation_off']['p99_ms']} ms")
        print(f"  added by isolation: p50 +{out['p50_added_ms']} ms (x{out['p50_ratio']})")
        print(f"  a tenant's account, first use (useradd): {out['tenant_account_first_use_ms']} ms")
