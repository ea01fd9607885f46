"""The TensorBoard replica (`python -m services.jobs.tensorboard_replica`) on
its own: the real `tensorboard` package on a Unix socket under its path
prefix, one logdir or several runs (`--logdir-spec`, as `cloudml hp
tensorboard` makes), TensorFlow never loaded, no TCP port opened."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "/tensorboard/acme/board"


def write_scalars(directory: str, tag: str, values: list[float]) -> None:
    """Event files as a trainer writes them (the tensorboard package's own writer, no TensorFlow)."""
    code = ("import sys, types; sys.modules['tensorboard.compat.notf'] = types.ModuleType('notf');"
            "from tensorboard.summary import Writer;"
            f"w = Writer({directory!r});"
            f"[w.add_scalar({tag!r}, v, step=i) for i, v in enumerate({values!r})];"
            "w.close()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
def start(tmp_path):
    processes = []

    def start_replica(*logdir_args: str) -> tuple[str, subprocess.Popen]:
        sock = str(tmp_path / f"tb{len(processes)}.sock")
        proc = subprocess.Popen([sys.executable, "-m", "services.jobs.tensorboard_replica", "--socket", sock,
                                 *logdir_args, "--path-prefix", PREFIX, "--reload-interval", "1"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        processes.append(proc)
        return sock, proc

    yield start_replica
    for proc in processes:
        proc.terminate()
        proc.wait(10)


async def get_json(sock: str, path: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as session:
        while True:
            try:
                async with session.get(f"http://tb{PREFIX}{path}") as response:
                    if response.status == 200:
                        return json.loads(await response.read())
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} never answered on {sock}")
            await __import__("asyncio").sleep(0.2)


async def wait_runs(sock: str, expected: set[str], timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        runs = await get_json(sock, "/data/runs")
        if {run.split("/")[0] for run in runs} >= expected or time.monotonic() > deadline:
            return runs
        await __import__("asyncio").sleep(0.5)


async def test_one_logdir_serves_its_scalars_without_tensorflow_or_tcp(start, tmp_path):
    write_scalars(str(tmp_path / "logs"), "loss", [3.0, 2.0, 1.0])
    sock, proc = start("--logdir", str(tmp_path / "logs"))
    assert await wait_runs(sock, {"."}) == ["."]  # the logdir itself holds the events
    tags = await get_json(sock, "/data/plugin/scalars/tags")
    assert "loss" in tags["."]
    process = psutil.Process(proc.pid)
    assert not [c for c in process.net_connections(kind="inet")]
    assert not [m.path for m in process.memory_maps() if "tensorflow" in m.path.lower()
                and "tensorboard" not in m.path.lower()]


async def test_logdir_spec_shows_one_run_per_directory(start, tmp_path):
    write_scalars(str(tmp_path / "t1"), "loss", [1.0, 0.5])
    write_scalars(str(tmp_path / "t2"), "loss", [2.0, 1.5])
    sock, _ = start("--logdir-spec", f"t1 lr=0.1:{tmp_path / 't1'},t2 lr=0.2:{tmp_path / 't2'}")
    runs = await wait_runs(sock, {"t1 lr=0.1", "t2 lr=0.2"})
    # TensorBoard names a run "<group>/<directory below the group's path>".
    assert set(runs) == {"t1 lr=0.1/.", "t2 lr=0.2/."}, runs
