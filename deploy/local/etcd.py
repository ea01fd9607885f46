"""Runs a single-member etcd server on loopback as a child process.

Used by the local launcher (`cloudml-platform up`) and by the test fixtures, so
both start etcd the same way. Ports are picked free and then bound by etcd
(etcd cannot report a port-0 bind); if another process wins the race etcd
exits at once and `start()` tries other ports.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

ETCD_BINARY_CANDIDATES = ("etcd", "/usr/bin/etcd")


def find_etcd_binary() -> str:
    for name in ETCD_BINARY_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        "etcd not found: install it with `apt-get install -y etcd-server` "
        "(the README's set-up command does this)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `port` now (SO_REUSEADDR, as etcd and
    gRPC set it, so connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class EtcdProcess:
    """One etcd member. `endpoint` is "127.0.0.1:<client port>"."""

    data_dir: str
    client_port: int = 0
    peer_port: int = 0
    log_path: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            find_etcd_binary(),
            "--name", "cloudml",
            "--data-dir", self.data_dir,
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"cloudml={peer}",
            "--initial-cluster-state", "new",
            # Keep one hour of history for watches that resume; older
            # revisions are compacted (watchers handle ErrCompacted).
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1h",
            "--quota-backend-bytes", str(4 * 1024**3),
            "--log-level", "warn",
        ]

    def start(self, timeout: float = 20.0, attempts: int = 5) -> "EtcdProcess":
        os.makedirs(self.data_dir, exist_ok=True)
        last_error = ""
        for _ in range(attempts):
            if not self.client_port or not port_is_free(self.client_port):
                self.client_port = free_port()
            if not self.peer_port or not port_is_free(self.peer_port) or self.peer_port == self.client_port:
                self.peer_port = free_port()
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=log, start_new_session=True
            )
            if log is not subprocess.DEVNULL:
                log.close()
            if self.wait_healthy(timeout):
                return self
            last_error = f"etcd exited with {self.process.poll()}" if self.process.poll() is not None else "etcd not healthy in time"
            self.stop()
            self.client_port = self.peer_port = 0
        raise RuntimeError(f"could not start etcd: {last_error}")

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.client_port}/health"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if b'"health":"true"' in response.read().replace(b" ", b""):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, for failure tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
