#!/usr/bin/env python3
"""Resident memory of every platform process on an idle platform started by
the launcher, and whether any of them loaded TensorFlow.

    .venv/bin/python bench/bench_memory.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from bench.bench_foundation import process_memory  # noqa: E402
from deploy.local.etcd import free_port  # noqa: E402


def main() -> None:
    data = tempfile.mkdtemp(prefix="cloudml-bench-mem-")
    launcher = [sys.executable, "-m", "deploy.local.launcher"]
    subprocess.run([*launcher, "up", "--data-dir", data, "--grpc-port", str(free_port()),
                    "--rest-port", str(free_port()), "--detach"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        time.sleep(3)  # let start-up allocations settle
        status = json.loads(subprocess.run([*launcher, "status", "--data-dir", data, "-o", "json"],
                                           check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        rows = {}
        for comp in status["components"]:
            rows[comp["component"]] = process_memory(comp["pid"])
        rows["total"] = {unit: round(sum(row[unit] for row in list(rows.values())), 1) for unit in ("rss_mb", "pss_mb")}
        print(json.dumps(rows, indent=2))
    finally:
        subprocess.run([*launcher, "down", "--data-dir", data], stdout=subprocess.DEVNULL, cwd=ROOT)


if __name__ == "__main__":
    main()
