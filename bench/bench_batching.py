"""Server-side batching on vs off, side by side, on the 3x1000 MLP.

Starts one model-server replica per configuration (batching off; on with
max batch 32, 1 ms timeout, 2 batch threads; on with a 5 ms timeout), all
with the replica's default thread settings, and loads each in turn with the
same grpc.aio client (pre-serialized PredictRequests, one row each, at
concurrency 32 by default). The rounds interleave the configurations so a
burst of other load on the machine hits them alike; medians are reported.

Replicas with batching on have their native front on the port (see
services/models/model_server/server.py), as they do in the platform.

Per run it also reports the replica's (with its front) and the client's CPU
(cores) and the CPU the rest of the machine used meanwhile ("foreign":
another process's load makes a run unrepresentative), and the mean batch
size (requests per batch, from the replica's metrics).

    .venv/bin/python bench/bench_batching.py [--seconds 3] [--rounds 3] [--concurrency 32]
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
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.bench_serving import build_mlp, grpc_load, predict_bytes  # noqa: E402
from deploy.local.service_process import ServiceProcess, read_port_file  # noqa: E402


def batching(timeout_micros: int) -> dict:
    return {"enabled": True, "max_batch_size": 32, "batch_timeout_micros": timeout_micros,
            "max_enqueued_batches": 1000, "num_batch_threads": 2}


CONFIGS = {
    "off": {"enabled": False},
    "on_1ms": batching(1000),
    "on_5ms": batching(5000),
}


def batch_stats(metrics_port: int) -> tuple[float, float]:
    """(batches, requests batched) so far, from the replica's Prometheus metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("cloudml_model_server_batch_requests_"):
            key, value = line.split()
            values[key] = float(value)
    return (values.get("cloudml_model_server_batch_requests_count", 0.0),
            values.get("cloudml_model_server_batch_requests_sum", 0.0))


def busy_cpu() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (a batching replica's native front)."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in (proc, *proc.children(recursive=True))))


def measure(proc: ServiceProcess, metrics_port: int, body: bytes, concurrency: int, seconds: float) -> dict:
    server, client = psutil.Process(proc.process.pid), psutil.Process()
    b0, s0, c0, m0 = batch_stats(metrics_port), tree_cpu(server), client.cpu_times(), busy_cpu()
    t0 = time.perf_counter()
    row = asyncio.run(grpc_load(proc.address, body, (), concurrency, seconds))
    elapsed = time.perf_counter() - t0
    b1, s1, c1, m1 = batch_stats(metrics_port), tree_cpu(server), client.cpu_times(), busy_cpu()
    server_cpu = (s1 - s0) / elapsed
    client_cpu = (c1.user + c1.system - c0.user - c0.system) / elapsed
    batches = b1[0] - b0[0]
    row.update(server_cpu=round(server_cpu, 2), client_cpu=round(client_cpu, 2),
               foreign_cpu=round(max(0.0, (m1 - m0) / elapsed - server_cpu - client_cpu), 2),
               mean_batch=round((b1[1] - b0[1]) / batches, 2) if batches else None)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    d = tempfile.mkdtemp(prefix="cloudml-bench-batching-")
    mlp_path = build_mlp(d)
    procs: dict[str, ServiceProcess] = {}
    metrics_ports: dict[str, int] = {}
    try:
        for name, config in CONFIGS.items():
            port_file = os.path.join(d, f"{name}.port")
            cmd = [sys.executable, "-m", "services.models.model_server", "--model-name", "mlp", "--version", "1",
                   "--base-path", mlp_path, "--port-file", port_file, "--batching-config", json.dumps(config),
                   "--metrics-listen", "127.0.0.1:0", "--log-level", "WARNING"]
            procs[name] = ServiceProcess(name, cmd, port_file, log_path=os.path.join(d, f"{name}.log")).start()
        for name, proc in procs.items():
            proc.wait_serving(180)
            metrics_ports[name] = read_port_file(proc.port_file)["metrics"]

        body = predict_bytes("mlp", {"x": np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)})
        runs: dict[str, list[dict]] = {name: [] for name in procs}
        for r in range(args.rounds):
            for name, proc in procs.items():
                row = measure(proc, metrics_ports[name], body, args.concurrency, args.seconds)
                runs[name].append(row)
                print(f"round {r} {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        medians = {name: statistics.median(row["rps"] for row in rows) for name, rows in runs.items()}
        results = {
            "concurrency": args.concurrency,
            "runs": runs,
            "median_rps": medians,
            "ratio_on_1ms_vs_off": round(medians["on_1ms"] / medians["off"], 2),
            "ratio_on_5ms_vs_off": round(medians["on_5ms"] / medians["off"], 2),
        }
        print(json.dumps(results, indent=2))
    finally:
        for proc in procs.values():
            proc.stop()


if __name__ == "__main__":
    main()
