"""Runs a single-member etcd server as a child process.

Used by the local launcher (`cloudml-platform up`) and by the test fixtures, so
both start etcd the same way. Two ways to listen:

- `socket_dir` set (the launcher): client and peer URLs are Unix sockets in
  that directory, which only the platform's user may enter (0700). Tenant
  code runs as other users and cannot connect at all: etcd holds every
  tenant's state, and etcd 3.4 without TLS client certificates would
  otherwise answer anyone on loopback. The endpoint is then
  `unix:<socket_dir>/etcd:2379` (etcd insists on host:port in a URL, and
  names the socket file after it, relative to its working directory).
- no `socket_dir` (test fixtures of single services): loopback TCP. Ports
  are picked free and then bound by etcd (etcd cannot report a port-0
  bind); if another process wins the race etcd exits at once and `start()`
  tries other ports.
"""
from __future__ import annotations

import os
import random
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


def open_log(path: str):
    """A log file for appending, readable by the platform's user alone (0600;
    an existing file is narrowed to that too)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a listener started later. Picked below the
    kernel's ephemeral range where possible: a port from that range (what
    binding port 0 gives) can be taken in the meantime by any outgoing
    connection or port-0 listener on the machine, which made start-ups fail
    now and then ("cannot listen") when many processes ran at once."""
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randrange(max(1024, low - 12000), low)
        if port_is_free(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


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


SOCKET_NAME = "etcd:2379"
PEER_SOCKET_NAME = "peer:2380"
#: Unix socket paths are limited to 107 bytes (sun_path).
MAX_SOCKET_PATH = 100


def short_socket_dir(preferred: str, key: str) -> str:
    """`preferred` when a socket path in it fits sun_path, else a short
    private directory under /run (or the temp dir) named by a hash of `key`."""
    if len(os.path.join(preferred, SOCKET_NAME)) <= MAX_SOCKET_PATH:
        return preferred
    import hashlib  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "cloudml-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def etcd_health(endpoint: str, timeout: float = 1.0) -> int:
    """1 SERVING, 2 NOT_SERVING (answers, unhealthy), 0 unreachable; for a
    TCP ("host:port") or a Unix ("unix:/path") endpoint."""
    try:
        if endpoint.startswith("unix:"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(endpoint[len("unix:"):])
                sock.sendall(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
                body = b""
                while chunk := sock.recv(4096):
                    body += chunk
        else:
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=timeout) as response:
                body = response.read()
    except OSError:
        return 0
    return 1 if b'"health":"true"' in body.replace(b" ", b"") else 2


@dataclass
class EtcdProcess:
    """One etcd member. `endpoint` is "127.0.0.1:<client port>", or
    "unix:<socket_dir>/etcd:2379" with a socket directory."""

    data_dir: str
    client_port: int = 0
    peer_port: int = 0
    log_path: str | None = None
    socket_dir: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        if self.socket_dir:
            return f"unix:{os.path.join(self.socket_dir, SOCKET_NAME)}"
        return f"127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        if self.socket_dir:
            client, peer = f"unix://{SOCKET_NAME}", f"unix://{PEER_SOCKET_NAME}"
        else:
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
            if self.socket_dir:
                os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)
                os.chmod(self.socket_dir, 0o700)
                for name in (SOCKET_NAME, PEER_SOCKET_NAME):  # left by a killed etcd
                    try:
                        os.unlink(os.path.join(self.socket_dir, name))
                    except FileNotFoundError:
                        pass
            else:
                if not self.client_port or not port_is_free(self.client_port):
                    self.client_port = free_port()
                if not self.peer_port or not port_is_free(self.peer_port) or self.peer_port == self.client_port:
                    self.peer_port = free_port()
            log = open_log(self.log_path) if self.log_path else subprocess.DEVNULL
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=log, start_new_session=True, cwd=self.socket_dir or None
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
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            if etcd_health(self.endpoint) == 1:
                return True
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
