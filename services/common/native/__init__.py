"""The native data-plane binary and running it as a child process.

`services/common/native/dataplane/`, built by `scripts/build_native.sh`
into `build/native/cloudml-dataplane`, runs in two roles: the
gateway's data plane (services/gateway/dataplane.py) and the front of a
model-server replica with batching on (services/models/model_server/server.py).
Either way it prints its bound port on its first line, dies with the process
that started it (PR_SET_PDEATHSIG), and drains in-flight calls on SIGTERM.

Every address it takes (`--listen`, `--upstream`, `--front-for`, and the
replica addresses in routing decisions) is a gRPC target: `host:port` or
`unix:/path` (model-server replicas listen on Unix sockets that only the
platform can reach). For a `unix:` listen address gRPC reports port 1, and
the address itself is what callers use.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from typing import Callable

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_BINARY = os.path.join(ROOT, "build", "native", "cloudml-dataplane")


def binary_path() -> str:
    return os.environ.get("CLOUDML_DATAPLANE_BINARY", DEFAULT_BINARY)


def built() -> bool:
    return os.access(binary_path(), os.X_OK)


class NativeProcess:
    """One running data-plane binary."""

    def __init__(self, what: str):
        self.what = what  # for messages: "the native data plane", "the replica's native front"
        self.process: subprocess.Popen | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    async def start(self, args: list[str], env: dict | None = None) -> int:
        """Runs the binary with `args`; returns the port it bound (1 for a unix: address)."""
        self.process = subprocess.Popen([binary_path(), *args], stdout=subprocess.PIPE, env=env, text=True)
        line = await asyncio.get_running_loop().run_in_executor(None, self.process.stdout.readline)
        if not line.strip().isdigit():
            code = self.process.wait()
            raise RuntimeError(f"{self.what} failed to start (exit {code}); see the log")
        return int(line)

    def watch(self, on_failure: Callable[[int], None]) -> None:
        """Calls `on_failure(exit code)` if the process exits before `stop`."""
        async def wait() -> None:
            code = await asyncio.get_running_loop().run_in_executor(None, self.process.wait)
            if not self._stopping:
                on_failure(code)
        self._watch = asyncio.create_task(wait())

    async def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM: it stops taking calls and drains in-flight ones (5 s at most)."""
        self._stopping = True
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.process.wait), timeout)
            except asyncio.TimeoutError:
                self.process.kill()
        if self._watch:
            self._watch.cancel()
