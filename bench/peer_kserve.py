#!/usr/bin/env python3
"""Peer benchmark (issue 14): KServe's Python model server against this
platform, same machine, same run, same client, same two SavedModels.

KServe side: `kserve` (0.21.0 by default, else the newest that installs) and
`tensorflow-cpu` from PyPI in a venv of their own, made on first use at
~/.cache/cloudml/peer-kserve-venv (`--venv`); `peer_kserve_server.py` runs
KServe's `ModelServer` there with a custom `kserve.Model` per SavedModel
(V1 REST `:predict` and V2 gRPC `ModelInfer`), KServe's defaults otherwise,
its per-request latency log line off.

Platform side: etcd, auth, the gateway and one model-server replica per
model, started as `bench_serving.py` starts them (`bench_serving.Platform`),
called through the gateway (gRPC Predict, TF Serving REST) with a tenant's
token; replicas without batching, plus an MLP replica with batching on
(max batch 32, 1 ms) for the MLP c=32 rows (gRPC and REST).

Models: half_plus_two (tests/conformance) and the MLP of bench_serving.py
(256 -> 3 x 1,000 ReLU -> 10, float32), both built here with TensorFlow
under a temp dir; one example per request.

The client (bench_serving.grpc_load / rest_load: one grpc.aio channel or
one aiohttp session, `c` workers calling back to back, pre-serialized
request bytes) drives each cell for `--seconds` per side, `--rounds` rounds,
the sides' order alternating by round. Each figure is shown as the range over
the rounds; the ratio is platform over KServe on req/s and KServe over
platform on p50 (above 1: this platform ahead).

Never part of the test suite.

    .venv/bin/python bench/peer_kserve.py [--seconds 8] [--rounds 2] [--venv DIR] [--kserve-version 0.21.0]
                                          [--venv-only]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import bench_serving  # noqa: E402

DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "cloudml", "peer-kserve-venv")
V2_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER = os.path.join(HERE, "peer_kserve_server.py")


# --- the peer's venv --------------------------------------------------------------------------

def ensure_venv(path: str, version: str) -> str:
    """The peer venv's python, made (uv, else venv + pip) on first use. The
    asked kserve version first; if it cannot be installed here, the newest
    that can. A marker names what was installed; a half-made venv is made again."""
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, "cloudml-peer-ready.json")
    if os.path.exists(marker):
        return python
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from services.jobs.envs import find_uv

    uv = find_uv()
    base = getattr(sys, "_base_executable", sys.executable)
    print(f"making the peer venv at {path} (kserve, tensorflow-cpu from PyPI; a few minutes the first time)",
          file=sys.stderr, flush=True)
    if uv:
        subprocess.run([uv, "venv", "-q", "--python", base, path], check=True)
        install = [uv, "pip", "install", "-q", "--python", python]
    else:
        subprocess.run([base, "-m", "venv", path], check=True)
        install = [python, "-m", "pip", "install", "-q"]
    for wanted in (f"kserve=={version}", "kserve"):
        result = subprocess.run([*install, wanted, "tensorflow-cpu"])
        if result.returncode == 0:
            break
        print(f"{wanted} does not install here; trying the newest kserve", file=sys.stderr, flush=True)
    else:
        raise SystemExit("could not install kserve with tensorflow-cpu into the peer venv")
    versions = json.loads(subprocess.run(
        [python, "-c", "import json, importlib.metadata as m; print(json.dumps({d: m.version(d) for d in "
         "('kserve', 'tensorflow-cpu', 'grpcio', 'protobuf', 'fastapi', 'uvicorn')}))"],
        check=True, capture_output=True, text=True).stdout)
    with open(marker, "w") as f:
        json.dump(versions, f)
    return python


def venv_versions(path: str) -> dict:
    with open(os.path.join(path, "cloudml-peer-ready.json")) as f:
        return json.load(f)


# --- KServe's server ------------------------------------------------------------------------------

def free_port() -> int:
    """KServe takes its ports as flags (it cannot report a port 0 it bound),
    so one is picked here; another process may take it first (rare: then rerun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KServe:
    def __init__(self, python: str, models: dict[str, str], directory: str):
        self.python = python
        self.models = models
        self.directory = directory
        self.http_port, self.grpc_port = free_port(), free_port()
        self.rest = f"http://127.0.0.1:{self.http_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.process = None  # its ServiceProcess
        self.log = os.path.join(directory, "kserve.log")

    def _model_flags(self) -> list[str]:
        return [f"--savedmodel={name}={path}" for name, path in self.models.items()]

    def start(self, timeout: float = 180) -> "KServe":
        from deploy.local.service_process import ServiceProcess

        cmd = [self.python, SERVER, "serve", *self._model_flags(), f"--http_port={self.http_port}",
               f"--grpc_port={self.grpc_port}", "--enable_latency_logging=false"]
        # Started, logged and stopped as the platform's processes are (it writes no port file).
        self.process = ServiceProcess("kserve", cmd, os.path.join(self.directory, "kserve.port"), self.log).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise SystemExit(f"KServe's server exited ({self.process.process.returncode}); see {self.log}")
            try:
                ready = all(self._ready(name) for name in self.models)
            except OSError:
                ready = False
            if ready:
                return self
            time.sleep(0.5)
        raise SystemExit(f"KServe's server was not ready in {timeout:.0f} s; see {self.log}")

    def _ready(self, name: str) -> bool:
        with urllib.request.urlopen(f"{self.rest}/v2/models/{name}/ready", timeout=2) as resp:
            return resp.status == 200

    def request_bytes(self, name: str, inputs_npy: str) -> bytes:
        out = os.path.join(self.directory, f"{name}.v2.bin")
        subprocess.run([self.python, SERVER, "request", f"--name={name}", f"--input={inputs_npy}", f"--out={out}"],
                       check=True)
        with open(out, "rb") as f:
            return f.read()

    def check(self, inputs_dir: str) -> None:
        subprocess.run([self.python, SERVER, "check", *self._model_flags(), f"--inputs-dir={inputs_dir}",
                        f"--check-rest={self.rest}", f"--check-grpc={self.grpc}"],
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process:
            self.process.stop(30)


def same_rest_answers(kserve: KServe, platform: "bench_serving.Platform", bodies: dict) -> None:
    """Both sides' REST answers to the same body agree (KServe's `check` compared
    its own with the SavedModel in-process)."""
    for model in ("hpt", "mlp"):
        answers = []
        for url, token in ((f"{kserve.rest}/v1/models/{model}:predict", ""),
                           (f"http://127.0.0.1:{platform.rest_port}/v1/models/{model}:predict", platform.token)):
            request = urllib.request.Request(url, data=bodies["json", model], headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                answers.append(np.asarray(json.loads(resp.read())["predictions"], dtype=np.float32))
        if answers[0].shape != answers[1].shape or not np.allclose(*answers, rtol=1e-5, atol=1e-5):
            raise SystemExit(f"KServe and the platform answer {model} differently: {answers}")


# --- the run --------------------------------------------------------------------------------------

#: (row label, protocol, model, concurrency, figure) in the issue's order
CELLS = (
    ("gRPC, MLP, c=32, req/s", "grpc", "mlp", 32, "rps"),
    ("gRPC, half_plus_two, c=32, req/s", "grpc", "hpt", 32, "rps"),
    ("gRPC, half_plus_two, c=1, p50 ms", "grpc", "hpt", 1, "p50_ms"),
    ("REST, half_plus_two, c=1, p50 ms", "rest", "hpt", 1, "p50_ms"),
    ("REST, MLP, c=1, p50 ms", "rest", "mlp", 1, "p50_ms"),
    ("REST, half_plus_two, c=32, req/s", "rest", "hpt", 32, "rps"),
    ("REST, MLP, c=32, req/s", "rest", "mlp", 32, "rps"),
)


def run_cells(kserve: KServe, platform: "bench_serving.Platform", bodies: dict, seconds: float,
              rounds: int) -> dict:
    """{label: {side: [figure per round]}}; sides: kserve, platform (and
    platform_batching for the MLP c=32 rows)."""
    results: dict[str, dict[str, list]] = {}
    for label, protocol, model, c, figure in CELLS:
        if protocol == "grpc":
            sides = {
                "kserve": lambda m=model, c=c: bench_serving.grpc_load(kserve.grpc, bodies["v2", m], (), c, seconds,
                                                                       method=V2_INFER),
                "platform": lambda m=model, c=c: bench_serving.grpc_load(platform.gateway.address, bodies["tfs", m],
                                                                         platform.md, c, seconds),
            }
            if model == "mlp" and "mlp-batch" in platform.servers:
                sides["platform_batching"] = lambda c=c: bench_serving.grpc_load(
                    platform.gateway.address, bodies["tfs", "mlp-batch"], platform.md, c, seconds)
        else:
            sides = {
                "kserve": lambda m=model, c=c: bench_serving.rest_load(
                    f"{kserve.rest}/v1/models/{m}:predict", bodies["json", m], "", c, seconds),
                "platform": lambda m=model, c=c: bench_serving.rest_load(
                    f"http://127.0.0.1:{platform.rest_port}/v1/models/{m}:predict", bodies["json", m],
                    platform.token, c, seconds),
            }
            if model == "mlp" and c > 1 and "mlp-batch" in platform.servers:
                sides["platform_batching"] = lambda c=c: bench_serving.rest_load(
                    f"http://127.0.0.1:{platform.rest_port}/v1/models/mlp-batch:predict", bodies["json", "mlp"],
                    platform.token, c, seconds)
        row = {name: [] for name in sides}
        names = list(sides)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                row[name].append(asyncio.run(sides[name]())[figure])
        results[label] = row
        print(f"{label}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return results


def _span(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    fmt = f"{{:,.{digits}f}}"
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"


def ratio(label: str, kserve: list[float], platform: list[float]) -> float:
    """Above 1: this platform ahead (more req/s, or a lower p50)."""
    k, p = sum(kserve) / len(kserve), sum(platform) / len(platform)
    return p / k if label.endswith("req/s") else k / p


def print_table(results: dict) -> None:
    print("\n| | KServe | this platform | ratio (above 1: this platform ahead) |")
    print("|---|---|---|---|")
    for label, row in results.items():
        digits = 0 if label.endswith("req/s") else 2
        cell = _span(row["platform"], digits)
        r = f"×{ratio(label, row['kserve'], row['platform']):.2f}"
        if "platform_batching" in row:
            cell += f" ({_span(row['platform_batching'], digits)} with batching on)"
            r += f" (×{ratio(label, row['kserve'], row['platform_batching']):.2f})"
        print(f"| {label} | {_span(row['kserve'], digits)} | {cell} | {r} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="each side's calls per cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--venv", default=DEFAULT_VENV, help="the peer venv (made on first use)")
    parser.add_argument("--kserve-version", default="0.21.0")
    parser.add_argument("--no-batching-row", action="store_true", help="skip the MLP replica with batching on")
    parser.add_argument("--venv-only", action="store_true", help="make the peer venv and exit")
    args = parser.parse_args()

    python = ensure_venv(args.venv, args.kserve_version)
    if args.venv_only:
        print(json.dumps(venv_versions(args.venv)))
        return

    from tests.conformance.half_plus_two import build_half_plus_two

    load_before = os.getloadavg()
    d = tempfile.mkdtemp(prefix="cloudml-bench-peer-")
    paths = {"hpt": build_half_plus_two(os.path.join(d, "half_plus_two"), version=1),
             "mlp": bench_serving.build_mlp(d)}
    inputs = bench_serving.bench_inputs()
    inputs_dir = os.path.join(d, "inputs")
    os.makedirs(inputs_dir)
    for name, x in inputs.items():
        np.save(os.path.join(inputs_dir, f"{name}.npy"), x)

    kserve = KServe(python, {name: path for name, path in paths.items()}, d)
    replicas = [("hpt", paths["hpt"], False), ("mlp", paths["mlp"], False)]
    if not args.no_batching_row:
        replicas.append(("mlp-batch", paths["mlp"], True))
    platform = bench_serving.Platform(d, replicas)
    try:
        kserve.start()
        kserve.check(inputs_dir)
        platform.start()
        bodies = {}
        for name, x in inputs.items():
            bodies["v2", name] = kserve.request_bytes(name, os.path.join(inputs_dir, f"{name}.npy"))
            bodies["json", name] = json.dumps({"instances": x.tolist()}).encode()
            bodies["tfs", name] = bench_serving.predict_bytes(name, {"x": x})
        bodies["tfs", "mlp-batch"] = bench_serving.predict_bytes("mlp-batch", {"x": inputs["mlp"]})
        platform.check({name: bodies["tfs", name] for name in platform.servers})
        same_rest_answers(kserve, platform, bodies)
        results = run_cells(kserve, platform, bodies, args.seconds, args.rounds)
    finally:
        platform.stop()
        kserve.stop()
    load_after = os.getloadavg()
    report = {"seconds": args.seconds, "rounds": args.rounds, "versions": venv_versions(args.venv),
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
              "cells": results}
    print(json.dumps(report, indent=2))
    print_table(results)
    print(f"\nkserve {report['versions']['kserve']}, tensorflow-cpu {report['versions']['tensorflow-cpu']}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores)")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
