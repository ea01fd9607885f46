"""Starting one platform service as a child process and waiting until it
reports SERVING. Shared by the launcher and the test fixtures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.etcd import open_log


def service_command(service: str, etcd: str, port_file: str, *, listen: str = "127.0.0.1:0",
                    data_dir: str | None = None, credentials_file: str | None = None, etcd_namespace: str = "",
                    extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", f"services.{service}", "--etcd", etcd, "--listen", listen,
           "--port-file", port_file]
    if etcd_namespace:
        cmd += ["--etcd-namespace", etcd_namespace]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if credentials_file:
        cmd += ["--credentials-file", credentials_file]
    return cmd + list(extra)


def thread_cpu_ns(pid: int) -> int:
    """CPU time of a process's threads so far, in ns, from each thread's
    schedstat (exact; /proc/<pid>/stat counts 10 ms ticks). Threads that end
    meanwhile are skipped. Used by the benches' and tests' CPU-per-call figures."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def read_port_file(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def health_status(address: str, timeout: float = 1.0, service: str = "") -> int:
    """The health status number (1 SERVING, 2 NOT_SERVING), 0 if unreachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return 0
    return resp.status


@dataclass
class ServiceProcess:
    """A running service. `address` is known once its port file appears."""

    service: str
    command: list[str]
    port_file: str
    log_path: str | None = None
    env: dict | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    address: str = ""

    def start(self) -> "ServiceProcess":
        if os.path.exists(self.port_file):
            os.unlink(self.port_file)
        log = open_log(self.log_path) if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, **(self.env or {}))
        self.process = subprocess.Popen(self.command, stdout=log, stderr=log, env=env, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        self.address = ""
        return self

    def wait_serving(self, timeout: float = 30.0) -> "ServiceProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.process.returncode}{self._log_tail()}")
            if self.poll_address() and health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"{self.service} not SERVING within {timeout}s{self._log_tail()}")

    def poll_address(self) -> str:
        """The bound address once this process has written its port file
        (a file left by an earlier process of the same service is ignored)."""
        if not self.address and self.process is not None:
            ports = read_port_file(self.port_file)
            if ports and ports.get("pid") == self.process.pid:
                self.address = ports["address"]
        return self.address

    def _log_tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return "\n" + f.read()[-3000:].decode(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for failure tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
