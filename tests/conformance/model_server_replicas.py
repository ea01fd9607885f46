"""The model-server processes of tests/conformance/test_model_server.py: a
`Server` (a real `python -m services.models.model_server` process, its port
file, log, health and metrics) and the module's set of servers, started
together so that their TensorFlow imports overlap.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODEL = "half_plus_two"
VERSION = 123

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


@dataclass
class Server:
    name: str
    argv: list[str]
    workdir: str
    port_file: str = ""
    log_path: str = ""
    metrics_listen: str = "127.0.0.1:0"
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self) -> "Server":
        os.makedirs(self.workdir, exist_ok=True)
        self.port_file = os.path.join(self.workdir, f"{self.name}.port")
        self.log_path = os.path.join(self.workdir, f"{self.name}.log")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.models.model_server", *self.argv,
             "--port-file", self.port_file, "--metrics-listen", self.metrics_listen],
            cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def server_address(self) -> str:
        """The Python server's own address (behind the native front: what gateways call)."""
        return self.info.get("replica_address", self.info["address"])

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def read_port_file(self) -> dict | None:
        try:
            with open(self.port_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def wait_serving(self, timeout: float = 90.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.read_port_file()
            if info and "error" in info:
                raise AssertionError(f"{self.name} failed to load: {info['error']}\n{self.log()[-3000:]}")
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}\n{self.log()[-3000:]}")
            if info and health(info["address"]) == health_pb2.HealthCheckResponse.SERVING:
                self.info = info
                return self
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not SERVING after {timeout}s\n{self.log()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.info['metrics']}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            ).status
        except grpc.RpcError:
            return 0


def module_servers(models: dict, workdir: str, socket_dir: str) -> dict[str, Server]:
    """The servers of test_model_server.py (its docstring lists them), not
    started yet; `models` are the probe's built test models."""
    batching = json.dumps({"enabled": True, "max_batch_size": 64, "batch_timeout_micros": 150000,
                           "max_enqueued_batches": 4, "num_batch_threads": 1})
    return {
        "hpt": Server("hpt", ["--model-name", MODEL, "--version", str(VERSION), "--base-path", models["hpt"],
                             ], workdir),
        "batching": Server("batching", ["--model-name", MODEL, "--version", str(VERSION), "--base-path",
                                        models["hpt_plain"], "--batching-config", batching, "--tensor-content"],
                           workdir),
        "keras": Server("keras", ["--model-name", "keras", "--version", "1", "--base-path", models["keras"]], workdir),
        "module": Server("module", ["--model-name", "affine", "--version", "1", "--base-path", models["module"],
                                   ], workdir),
        "broken": Server("broken", ["--model-name", "broken", "--version", "1", "--base-path", models["broken"]],
                         workdir),
        "unix": Server("unix", ["--model-name", MODEL, "--version", str(VERSION), "--base-path", models["hpt_plain"],
                                "--batching-config", json.dumps({"enabled": True, "max_batch_size": 8, "num_batch_threads": 2}),
                                "--listen", f"unix:{socket_dir}/r.sock", "--drain-delay", "1"], workdir,
                       metrics_listen=f"unix:{socket_dir}/r.metrics.sock"),
    }
