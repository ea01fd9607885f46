"""The native data plane when a caller takes every descriptor it may open
(services/common/native/dataplane/h2front.h, ListenerPause): the real binary,
started with a limit of 64 descriptors, its gRPC port and its REST port both
flooded with idle connections until accept() fails with EMFILE.

A level-triggered listener that cannot accept would wake the loop forever:
the process would spin a whole core for as long as the attacker holds its
connections. What is checked: while exhausted it uses almost no CPU, and once
the connections go, both ports take new callers again (the REST port answers
a request; the gRPC port answers HTTP/2's connection preface).
"""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import time

import psutil

from deploy.local.etcd import free_port
from services.common.native import binary_path
from tests.e2e.serving_platform import wait_until

LIMIT = 64


def _limited():
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def _answers_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(4096)


def _answers_h2(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return sock.recv(4096)


def test_running_out_of_descriptors_does_not_spin_and_recovers(tmp_path):
    rest_port = free_port()
    process = subprocess.Popen(
        [binary_path(), "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--rest-listen",
         f"127.0.0.1:{rest_port}", "--rest-upstream", f"unix:{tmp_path}/nobody.sock"],
        stdout=subprocess.PIPE, text=True, preexec_fn=_limited,
        env=dict(os.environ, CLOUDML_DATAPLANE_SECRET="exhaustion-test"))
    held: list[socket.socket] = []
    try:
        grpc_port = int(process.stdout.readline())
        # Serving at first: the REST relay has no Python gateway behind it here, so 503.
        assert _answers_http(rest_port).startswith(b"HTTP/1.1 503")
        assert _answers_h2(grpc_port)[3:4] == b"\x04"  # a SETTINGS frame
        plane = psutil.Process(process.pid)
        for port in (rest_port, grpc_port) * (LIMIT + 16):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(lambda: plane.num_fds() >= LIMIT - 1, 10, "the data plane to run out of descriptors")
        time.sleep(0.5)
        before = sum(plane.cpu_times()[:2])
        time.sleep(2.0)
        spent = sum(plane.cpu_times()[:2]) - before
        assert spent < 0.3, f"{spent:.2f} s of CPU in 2 s while out of descriptors"
        for sock in held:
            sock.close()
        held.clear()
        wait_until(lambda: _answers_http(rest_port).startswith(b"HTTP/1.1 503"), 10, "the REST port to serve again")
        assert _answers_h2(grpc_port)[3:4] == b"\x04"
        assert process.poll() is None
    finally:
        for sock in held:
            sock.close()
        process.kill()
        process.wait()
