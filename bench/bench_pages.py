#!/usr/bin/env python3
"""The gateway's page proxy (services/gateway/pages.py) in front of a real
TensorBoard replica (services/jobs/tensorboard_replica.py) on a Unix socket:

- the replica's start: process start -> first answer on its socket;
- a small JSON request (`data/plugins_listing`), sequential: direct to the
  socket vs through the proxy (cookie check, token verification, header
  filtering, streaming), p50 / p99 and the ratio;
- an 8 MiB static-sized body (TensorBoard's index.js and friends are the
  big ones; here the page's main bundle), MB/s direct vs proxied.

    python bench/bench_pages.py [--requests 500]

Prints its figures; runs in one process plus the replica (no platform).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from services.common.tokens import AUDIENCE, ISSUER, TokenVerifier  # noqa: E402
from services.gateway.pages import COOKIE, BrowserPages  # noqa: E402

PREFIX = "/tensorboard/bench/board"


def fixed(address: str):
    """A page-address lookup that always answers `address`."""
    async def resolve(kind, tenant, name, token):
        return address
    return resolve


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def timed(session, url, headers, count):
    out = []
    for _ in range(count):
        start = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            await response.read()
            assert response.status == 200, response.status
        out.append((time.perf_counter() - start) * 1000)
    return out


async def main(requests: int) -> None:
    work = tempfile.mkdtemp(prefix="bench-pages-")
    sock = os.path.join(work, "tb.sock")
    os.makedirs(os.path.join(work, "logs"))
    started = time.perf_counter()
    replica = subprocess.Popen([sys.executable, "-m", "services.jobs.tensorboard_replica", "--socket", sock,
                                "--logdir", os.path.join(work, "logs"), "--path-prefix", PREFIX],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    direct = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock))
    try:
        while True:
            try:
                async with direct.get(f"http://tb{PREFIX}/") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.02)
        print(f"replica start -> first answer: {time.perf_counter() - started:.2f} s")

        key = Ed25519PrivateKey.generate()
        verifier = TokenVerifier()
        verifier.update({"k": key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()}, set())
        now = int(time.time())
        token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "role": 1, "akid": "AK",
                            "iat": now, "exp": now + 3600}, key, algorithm="EdDSA", headers={"kid": "k"})
        pages = BrowserPages(verifier, None, fixed("unix:" + sock))
        app = web.Application()
        pages.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        proxied = aiohttp.ClientSession()
        cookie = {"Cookie": f"{COOKIE}={token}"}
        small = f"{PREFIX}/data/plugins_listing"
        try:
            await timed(direct, f"http://tb{small}", {}, 20)  # warm-up
            await timed(proxied, f"http://127.0.0.1:{port}{small}", cookie, 20)
            a = await timed(direct, f"http://tb{small}", {}, requests)
            b = await timed(proxied, f"http://127.0.0.1:{port}{small}", cookie, requests)
            print(f"plugins_listing, {requests} sequential: direct p50 {statistics.median(a):.2f} ms "
                  f"p99 {percentile(a, .99):.2f} ms; through the proxy p50 {statistics.median(b):.2f} ms "
                  f"p99 {percentile(b, .99):.2f} ms; ratio p50 x{statistics.median(b) / statistics.median(a):.2f}")
            big = f"{PREFIX}/index.js"
            for name, session, url, headers in (("direct", direct, f"http://tb{big}", {}),
                                                ("proxied", proxied, f"http://127.0.0.1:{port}{big}", cookie)):
                start, size = time.perf_counter(), 0
                for _ in range(5):
                    async with session.get(url, headers=headers) as response:
                        size += len(await response.read())
                print(f"index.js ({size // 5 >> 10} KiB) x5 {name}: {size / (time.perf_counter() - start) / 1e6:.0f} MB/s")
        finally:
            await proxied.close()
            await pages.close()
            await runner.cleanup()
    finally:
        await direct.close()
        replica.terminate()
        replica.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    asyncio.run(main(parser.parse_args().requests))
