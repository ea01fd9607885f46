"""Server-side batching on vs off, and the native front with vs without,
side by side on the 3x1000 MLP, direct to the replicas.

One model-server replica per configuration, all with the replica's default
thread settings:
  off_front     batching off, the native front on the port (as the platform
                runs every replica: it relays calls, never coalesces)
  on_front      batching on (max batch 32, 1 ms timeout, 2 batch threads),
                the native front on the port (coalesces direct callers' calls)
  on_nofront    batching on, `--native-front off`
  off_nofront   batching off, `--native-front off`
  (`--configs` adds on5_front: batching on with a 5 ms timeout, with the front)
Each is loaded with the same grpc.aio client (pre-serialized PredictRequests,
one row each, at concurrency 32 by default) for `--seconds`, after a warm-up
load of its own; the rounds rotate the order of the configurations (the first
run after the replicas start is slower), and medians over rounds are reported.

The ratios separate what each piece gives:
  batching, front on both sides   on_front / off_front
  batching, no front either side  on_nofront / off_nofront
  the front, batching on          on_front / on_nofront
  the front, batching off         off_front / off_nofront

Per run it also reports the replica's CPU with its front (cores) and the
client's, the CPU the rest of the machine used meanwhile ("foreign": another
process's load makes a run unrepresentative), and the mean batch size
(requests per batch, from the replica's metrics).

    .venv/bin/python bench/bench_batching.py [--seconds 3] [--rounds 3] [--concurrency 32] [--configs ...]
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


OFF = {"enabled": False}
#: name -> (batching config, --native-front)
CONFIGS = {
    "off_front": (OFF, "on"),
    "on_front": (batching(1000), "on"),
    "on_nofront": (batching(1000), "off"),
    "off_nofront": (OFF, "off"),
    "on5_front": (batching(5000), "on"),
}
DEFAULT_CONFIGS = "off_front,on_front,on_nofront,off_nofront"
RATIOS = (  # (label, numerator, denominator)
    ("batching, front on both sides", "on_front", "off_front"),
    ("batching, no front on either side", "on_nofront", "off_nofront"),
    ("batching 5 ms, front on both sides", "on5_front", "off_front"),
    ("the front, batching on", "on_front", "on_nofront"),
    ("the front, batching off", "off_front", "off_nofront"),
    ("both (the old headline: on+front vs off without)", "on_front", "off_nofront"),
)


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
    parser.add_argument("--warmup-seconds", type=float, default=1.0)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {','.join(CONFIGS)}")
    args = parser.parse_args()
    names = args.configs.split(",")

    d = tempfile.mkdtemp(prefix="cloudml-bench-batching-")
    mlp_path = build_mlp(d)
    procs: dict[str, ServiceProcess] = {}
    metrics_ports: dict[str, int] = {}
    try:
        for name in names:
            config, front = CONFIGS[name]
            port_file = os.path.join(d, f"{name}.port")
            cmd = [sys.executable, "-m", "services.models.model_server", "--model-name", "mlp", "--version", "1",
                   "--base-path", mlp_path, "--port-file", port_file, "--batching-config", json.dumps(config),
                   "--native-front", front, "--metrics-listen", "127.0.0.1:0", "--log-level", "WARNING"]
            procs[name] = ServiceProcess(name, cmd, port_file, log_path=os.path.join(d, f"{name}.log")).start()
        for name, proc in procs.items():
            proc.wait_serving(180)
            metrics_ports[name] = read_port_file(proc.port_file)["metrics"]

        body = predict_bytes("mlp", {"x": np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)})
        for name, proc in procs.items():  # the first load after a start is slower: not measured
            asyncio.run(grpc_load(proc.address, body, (), args.concurrency, args.warmup_seconds))
        runs: dict[str, list[dict]] = {name: [] for name in procs}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                row = measure(procs[name], metrics_ports[name], body, args.concurrency, args.seconds)
                runs[name].append(row)
                print(f"round {r} {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        median = {name: {key: statistics.median(row[key] for row in rows)
                         for key in ("rps", "p50_ms", "p99_ms", "server_cpu")}
                  for name, rows in runs.items()}
        ratios = {label: round(median[a]["rps"] / median[b]["rps"], 2)
                  for label, a, b in RATIOS if a in median and b in median}
        print(json.dumps({"concurrency": args.concurrency, "runs": runs, "median": median, "ratios_rps": ratios},
                         indent=2))
        print(f"\nMLP direct at c={args.concurrency}, medians of {args.rounds} rounds of {args.seconds:g} s "
              "(rps / p50 / p99 / replica+front CPU cores):")
        for name in names:
            m = median[name]
            print(f"  {name:12s} {m['rps']:8,.0f} rps  {m['p50_ms']:6.2f} / {m['p99_ms']:6.2f} ms  "
                  f"{m['server_cpu']:.2f} cores")
        for label, a, b in RATIOS:
            if label in ratios:
                print(f"  {label:50s} {a} / {b}: {median[a]['rps']:,.0f} / {median[b]['rps']:,.0f} rps = "
                      f"x{ratios[label]:.2f}")
    finally:
        for proc in procs.values():
            proc.stop()


if __name__ == "__main__":
    main()
