#!/usr/bin/env python3
"""Dev environments (JupyterLab replicas behind the gateway's page proxy).

1. Kernel message round trip over the kernel's WebSocket, direct to the
   notebook server's socket vs through the gateway's page proxy
   (services/gateway/pages.py in this process, cookie check and token
   verification included): `kernel_info_request` -> `kernel_info_reply`,
   sequential, in alternating turns, p50 / p99 and the ratio (goal <= 1.2x).
2. `cloudml dev create NAME` (the CLI, waiting until RUNNING) -> the
   notebook page (`/dev/<tenant>/<name>/lab`) loaded through the gateway
   with the login link of `cloudml dev open`, on a whole platform
   (`cloudml-platform up`), p50 over --rounds (goal < 5 s warm: the first
   round, which fills the page caches, is reported apart).
3. `cloudml jobs tensorboard JOB` (the CLI, waiting until RUNNING) on a
   finished job of the seed's linear trainer -> its scalars (the `loss`
   series TensorBoard's scalars page lists, `data/plugin/scalars/tags`)
   loaded through the gateway with the login link of `cloudml tensorboard
   open`, p50 over --rounds (goal < 5 s; the first round apart, as above).

    python bench/bench_devenv.py [--round-trips 500] [--rounds 5] [--sections kernel,create,tensorboard]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.cookiejar
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from services.common.tokens import AUDIENCE, ISSUER, TokenVerifier  # noqa: E402
from services.gateway.pages import COOKIE, BrowserPages  # noqa: E402
from tests.integration.jupyter_kernel import kernel_info_round_trip, start_server, wait_answers  # noqa: E402

BASE = "/dev/bench/nb/"


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def kernel_section(round_trips: int) -> None:
    work = tempfile.mkdtemp(prefix="bench-devenv-")
    token = secrets.token_hex(32)
    started = time.perf_counter()
    sock, proc = start_server(work, BASE, token)
    auth = {"Authorization": f"token {token}"}
    direct = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock))
    try:
        await wait_answers(direct, f"http://nb{BASE}api/status", headers=auth)
        print(f"notebook server start -> first answer: {time.perf_counter() - started:.2f} s")
        key = Ed25519PrivateKey.generate()
        verifier = TokenVerifier()
        verifier.update({"k": key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()}, set())
        now = int(time.time())
        jwt_token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "role": 1, "akid": "AK",
                                "iat": now, "exp": now + 3600}, key, algorithm="EdDSA", headers={"kid": "k"})

        async def resolve(kind, tenant, name, _token):
            return "unix:" + sock, f"token {token}"

        pages = BrowserPages(verifier, None, resolve)
        app = web.Application()
        pages.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        proxied = aiohttp.ClientSession()
        cookie = {"Cookie": f"{COOKIE}={jwt_token}"}
        try:
            async with direct.post(f"http://nb{BASE}api/kernels", json={"name": "python3"}, headers=auth) as r:
                kernel = (await r.json())["id"]
            path = f"{BASE}api/kernels/{kernel}/channels?session_id="  # one session per connection
            ws_direct = await direct.ws_connect(f"http://nb{path}{uuid.uuid4().hex}", headers=auth)
            ws_proxied = await proxied.ws_connect(f"http://127.0.0.1:{port}{path}{uuid.uuid4().hex}", headers=cookie)
            for socket in (ws_direct, ws_proxied):  # the kernel starts; warm both paths
                for _ in range(20):
                    await kernel_info_round_trip(socket, uuid.uuid4().hex)
            a, b = [], []
            turn = 50
            for _ in range(max(1, round_trips // turn)):
                a += [await kernel_info_round_trip(ws_direct, "d") * 1000 for _ in range(turn)]
                b += [await kernel_info_round_trip(ws_proxied, "p") * 1000 for _ in range(turn)]
            print(f"kernel_info round trip over the kernel WebSocket, {len(a)} each in turns of {turn}: "
                  f"direct p50 {statistics.median(a):.2f} ms p99 {percentile(a, .99):.2f} ms; "
                  f"through the gateway p50 {statistics.median(b):.2f} ms p99 {percentile(b, .99):.2f} ms; "
                  f"ratio p50 x{statistics.median(b) / statistics.median(a):.2f} (goal <= 1.2)")
            await ws_direct.close()
            await ws_proxied.close()
        finally:
            await proxied.close()
            await pages.close()
            await runner.cleanup()
    finally:
        await direct.close()
        proc.terminate()
        proc.wait(15)


def load_page(link: str, url: str) -> bytes:
    """Follows the login link (cookie) and loads `url` through the gateway."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(link, timeout=60) as response:
        response.read()
    with opener.open(url, timeout=60) as response:
        body = response.read()
        assert response.status == 200, response.status
        return body


@contextlib.contextmanager
def platform_up():
    """A whole platform (`cloudml-platform up`) and a tenant's CLI config on it."""
    from tests.e2e.serving_platform import ServingPlatform

    work = tempfile.mkdtemp(prefix="bench-devenv-platform-")
    platform = ServingPlatform(os.path.join(work, "data")).start()
    try:
        platform.wait_up()
        platform.workdir = work
        yield platform, platform.new_tenant("bench")
    finally:
        platform.down()


def report(what: str, times: list[float]) -> None:
    print(f"{what}, warm, {len(times)} rounds: p50 {statistics.median(times):.2f} s, max {max(times):.2f} s "
          "(goal p50 < 5 s)")


def create_section(rounds: int) -> None:
    with platform_up() as (platform, tenant):
        times = []
        for i in range(rounds + 1):
            name = f"nb{i}"
            started = time.perf_counter()
            env = platform.cli_json("dev", "create", name, config=tenant, timeout=300)
            assert env["state"] == "DEV_ENVIRONMENT_STATE_RUNNING", env
            running = time.perf_counter() - started
            link = platform.cli_json("dev", "open", name, config=tenant)["login_link"]
            assert b"JupyterLab" in load_page(link, f"{platform.rest_endpoint}/dev/bench/{name}/lab")
            total = time.perf_counter() - started
            print(f"  round {i}: dev create -> RUNNING {running:.2f} s, -> lab page loaded {total:.2f} s"
                  + (" (first: cold caches)" if i == 0 else ""))
            if i:
                times.append(total)
            platform.cli("dev", "delete", name, config=tenant)
            deadline = time.monotonic() + 60
            while platform.cli_json("dev", "list", config=tenant) and time.monotonic() < deadline:
                time.sleep(0.5)
        report("dev create -> notebook page through the gateway", times)


def tensorboard_section(rounds: int) -> None:
    from tests.e2e.serving_platform import ROOT as PROJECT, clean_env

    with platform_up() as (platform, tenant):
        build = subprocess.run([sys.executable, os.path.join(PROJECT, "examples", "build_packages.py"),
                                os.path.join(platform.workdir, "packages"), "--only", "linear", "--json"],
                               capture_output=True, text=True, timeout=120, env=clean_env(), check=True)
        package = json.loads(build.stdout)["linear"]
        platform.cli_json("jobs", "submit", "-n", "linear", "-m", "trainer.task", "-u", package,
                          "-a", "--max_epochs 5", config=tenant)
        deadline = time.monotonic() + 300
        while (state := platform.cli_json("jobs", "describe", "linear", config=tenant)["state"]) not in (
                "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"):
            assert time.monotonic() < deadline, state
            time.sleep(1)
        assert state == "JOB_STATE_SUCCEEDED", state
        times = []
        for i in range(rounds + 1):
            started = time.perf_counter()
            board = platform.cli_json("jobs", "tensorboard", "linear", config=tenant, timeout=180)
            assert board["state"] == "TENSORBOARD_STATE_RUNNING", board
            running = time.perf_counter() - started
            link = platform.cli_json("tensorboard", "open", "linear", config=tenant)["login_link"]
            tags = json.loads(load_page(link, f"{platform.rest_endpoint}{board['path']}data/plugin/scalars/tags"))
            assert any("loss" in run_tags for run_tags in tags.values()), tags
            total = time.perf_counter() - started
            print(f"  round {i}: jobs tensorboard -> RUNNING {running:.2f} s, -> scalars loaded {total:.2f} s"
                  + (" (first: cold caches)" if i == 0 else ""))
            if i:
                times.append(total)
            platform.cli("tensorboard", "delete", "linear", config=tenant)
            deadline = time.monotonic() + 60
            while platform.cli_json("tensorboard", "list", config=tenant) and time.monotonic() < deadline:
                time.sleep(0.5)
        report("jobs tensorboard -> scalars through the gateway", times)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sections", default="kernel,create,tensorboard")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    if "kernel" in sections:
        asyncio.run(kernel_section(args.round_trips))
    if "create" in sections:
        create_section(args.rounds)
    if "tensorboard" in sections:
        tensorboard_section(args.rounds)
