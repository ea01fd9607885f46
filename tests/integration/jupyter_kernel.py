"""Helpers for tests and benchmarks of a dev environment's notebook server
(`services.jobs.devenv_replica`): start one on a Unix socket, and speak
Jupyter's kernel protocol over its WebSocket (the JSON frames JupyterLab
sends when it asks for no subprotocol). Not a test module."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_server(workdir: str, base_url: str, token: str) -> tuple[str, subprocess.Popen]:
    """(socket path, process) of a notebook server rooted at `workdir`/root (HOME `workdir`/home)."""
    for sub in ("root", "home"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    sock = os.path.join(workdir, "nb.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDML_", "JUPYTER"))}
    env.update(HOME=os.path.join(workdir, "home"), PYTHONPATH=ROOT, CLOUDML_JUPYTER_TOKEN=token,
               PATH=f"{os.path.dirname(sys.executable)}:/usr/bin:/bin")
    proc = subprocess.Popen([sys.executable, "-m", "services.jobs.devenv_replica", "--socket", sock,
                             "--base-url", base_url, "--root-dir", os.path.join(workdir, "root")],
                            cwd=ROOT, env=env, stdout=open(os.path.join(workdir, "server.log"), "wb"),
                            stderr=subprocess.STDOUT)
    return sock, proc


async def wait_answers(session: aiohttp.ClientSession, url: str, timeout: float = 120.0,
                       headers: dict | None = None) -> float:
    """Seconds until `url` answers at all (any HTTP status)."""
    started = time.monotonic()
    while True:
        try:
            async with session.get(url, headers=headers or {}) as response:
                await response.read()
                return time.monotonic() - started
        except aiohttp.ClientError:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{url} never answered")
        await asyncio.sleep(0.05)


def message(msg_type: str, content: dict, session_id: str, channel: str = "shell") -> dict:
    return {"header": {"msg_id": uuid.uuid4().hex, "username": "test", "session": session_id,
                       "msg_type": msg_type, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "content": content, "channel": channel, "buffers": []}


async def reply_to(socket, sent: dict, reply_type: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
    """(the reply to `sent`, every iopub message of it before the reply and its idle status)."""
    iopub, reply, idle = [], None, False
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        got = await socket.receive_json(timeout=max(0.1, deadline - time.monotonic()))
        if got.get("parent_header", {}).get("msg_id") != sent["header"]["msg_id"]:
            continue
        if got["msg_type"] == reply_type:
            reply = got
        elif got.get("channel") == "iopub":
            iopub.append(got)
            if got["msg_type"] == "status" and got["content"].get("execution_state") == "idle":
                idle = True
    return reply, iopub


async def execute(socket, code: str, session_id: str, timeout: float = 120.0) -> tuple[str, dict]:
    """(stdout text, execute_reply content) of running `code` in the kernel."""
    sent = message("execute_request", {"code": code, "silent": False, "store_history": False,
                                       "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                   session_id)
    await socket.send_json(sent)
    reply, iopub = await reply_to(socket, sent, "execute_reply", timeout)
    text = "".join(m["content"].get("text", "") for m in iopub if m["msg_type"] == "stream")
    errors = [m["content"] for m in iopub if m["msg_type"] == "error"]
    if errors:
        text += "\n".join("\n".join(e.get("traceback", [])) for e in errors)
    return text, reply["content"]


async def kernel_info_round_trip(socket, session_id: str) -> float:
    """Seconds for one kernel_info_request -> kernel_info_reply over the WebSocket."""
    sent = message("kernel_info_request", {}, session_id)
    started = time.perf_counter()
    await socket.send_json(sent)
    while True:
        got = await socket.receive_json(timeout=30)
        if got["msg_type"] == "kernel_info_reply" and got["parent_header"].get("msg_id") == sent["header"]["msg_id"]:
            return time.perf_counter() - started
