#!/usr/bin/env python3
"""REST on the native data plane (issue 14 goal 1), side by side in one run.

One platform (etcd, auth, replicas of half_plus_two and a 3-layer MLP
without batching, as bench_serving.py starts them) and two gateways on it:
    native   the gateway's data plane owns the REST port (the default):
             repeat predict calls converted to protos and back in C++;
    python   `--dataplane-rest off`: the gateway's Python process serves the
             REST port (aiohttp, JSON in Python), as before this work;
and, for the goal "REST c=1 p50 <= gRPC c=1 p50 + 0.15 ms", gRPC through
the native gateway with the same client library family (grpc.aio, bytes).
Each (model, concurrency) cell runs `--rounds` rounds, the three targets in
a rotated order each round, `--seconds` each; figures are the median round.
Per REST target: the CPU its gateway spent per call (the Python process and
its data plane, from /proc/<pid>/task/*/schedstat), so the speed is not
bought with spinning. The same aiohttp client and JSON body on both sides.

    .venv/bin/python bench/bench_rest.py [--seconds 3] [--rounds 3] [--models hpt,mlp]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

from bench_serving import (Platform, bench_inputs, build_mlp, cpu_ns, grpc_load, native_child,  # noqa: E402
                           predict_bytes, rest_load)


def gateway_cpu_ns(pid: int) -> int:
    """Run time (ns) of a gateway: its Python process and its data plane."""
    child = native_child(pid)
    return cpu_ns(pid)[0] + (cpu_ns(child)[0] if child else 0)


def median_round(rounds: list[dict]) -> dict:
    """The round with the median p50, with the CPU per call."""
    ordered = sorted(rounds, key=lambda r: r["p50_ms"])
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="hpt,mlp")
    args = parser.parse_args()
    models = args.models.split(",")

    from tests.conformance.half_plus_two import build_half_plus_two

    d = tempfile.mkdtemp(prefix="cloudml-bench-rest-")
    replicas = [("hpt", build_half_plus_two(os.path.join(d, "half_plus_two"), version=1), False)]
    if "mlp" in models:
        replicas.append(("mlp", build_mlp(d), False))
    platform = Platform(d, replicas)
    try:
        platform.start()
        python_gateway, python_rest = platform.stack.start_gateway(
            "gwpy", env=dict(os.environ, CLOUDML_DATAPLANE_REST="off", CLOUDML_LOG_LEVEL="WARNING"))
        native_gateway = platform.gateway
        inputs = bench_inputs()
        results: dict = {}
        for model in models:
            x = inputs[model]
            rest_body = json.dumps({"instances": x.tolist()}).encode()
            grpc_body = predict_bytes(model, {"x": x})
            urls = {"native": f"http://127.0.0.1:{platform.rest_port}/v1/models/{model}:predict",
                    "python": f"http://127.0.0.1:{python_rest}/v1/models/{model}:predict"}
            pids = {"native": native_gateway.process.pid, "python": python_gateway.process.pid}
            for c in (1, 32):
                runs: dict[str, list[dict]] = {"native": [], "python": [], "grpc": []}
                order = ["native", "python", "grpc"]
                for r in range(args.rounds):
                    for target in order[r % 3:] + order[:r % 3]:
                        if target == "grpc":
                            runs[target].append(asyncio.run(grpc_load(native_gateway.address, grpc_body,
                                                                      platform.md, c, args.seconds)))
                            continue
                        before = gateway_cpu_ns(pids[target])
                        row = asyncio.run(rest_load(urls[target], rest_body, platform.token, c, args.seconds))
                        calls = row["rps"] * args.seconds + 10  # rest_load's 10 warm-up calls count too
                        row["gateway_cpu_us_per_call"] = round((gateway_cpu_ns(pids[target]) - before)
                                                               / calls / 1000, 1)
                        runs[target].append(row)
                cell = {target: median_round(rows) for target, rows in runs.items()}
                cell["rest_native_minus_grpc_p50_ms"] = round(cell["native"]["p50_ms"] - cell["grpc"]["p50_ms"], 3)
                cell["rest_python_over_native_p50"] = round(cell["python"]["p50_ms"] / cell["native"]["p50_ms"], 2)
                cell["rest_native_over_python_rps"] = round(cell["native"]["rps"] / cell["python"]["rps"], 2)
                cell["cpu_python_over_native"] = round(cell["python"]["gateway_cpu_us_per_call"]
                                                       / max(cell["native"]["gateway_cpu_us_per_call"], 0.1), 2)
                results[f"{model}_c{c}"] = cell
        results["native_gateway_dataplane_calls"] = platform.stack.dataplane_calls()
        print(json.dumps(results, indent=2))
        print(f"\n{'cell':8} {'REST native p50':>16} {'REST python p50':>16} {'gRPC p50':>9} {'native-gRPC':>12}"
              f" {'native rps':>11} {'python rps':>11} {'CPU/call native':>16} {'python':>8}")
        for name, cell in results.items():
            if not name.endswith(("_c1", "_c32")):
                continue
            n, p, g = cell["native"], cell["python"], cell["grpc"]
            print(f"{name:8} {n['p50_ms']:>13.3f} ms {p['p50_ms']:>13.3f} ms {g['p50_ms']:>6.3f} ms"
                  f" {cell['rest_native_minus_grpc_p50_ms']:>+9.3f} ms {n['rps']:>11.0f} {p['rps']:>11.0f}"
                  f" {n['gateway_cpu_us_per_call']:>13.0f} us {p['gateway_cpu_us_per_call']:>5.0f} us")
    finally:
        platform.stop()


if __name__ == "__main__":
    main()
