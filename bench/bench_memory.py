#!/usr/bin/env python3
"""Resident memory of every platform process on an idle platform started by
the launcher, and whether any of them loaded TensorFlow.

    .venv/bin/python bench/bench_memory.py [--after-demo]

`--after-demo`: the platform the end-to-end demo (scripts/demo.sh) leaves
behind instead, measured after it: a tenant, a train job run, its model
deployed (a replica, the models service's own figure excludes it) and
predicted over REST (the CLI) and gRPC (the stock TF Serving client).
"""
from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after-demo", action="store_true", help="measure after scripts/demo.sh's main job")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="cloudml-bench-mem-")
    launcher = [sys.executable, "-m", "deploy.local.launcher"]
    if args.after_demo:
        subprocess.run([os.path.join(ROOT, "scripts", "demo.sh")], check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
                       env=dict(os.environ, CLOUDML_DEMO_DIR=data, CLOUDML_DEMO_KEEP="1",
                                CLOUDML_GRPC_PORT=str(free_port()), CLOUDML_REST_PORT=str(free_port())))
    else:
        subprocess.run([*launcher, "up", "--data-dir", data, "--grpc-port", str(free_port()),
                        "--rest-port", str(free_port()), "--detach"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        time.sleep(3)  # let start-up allocations settle
        status = json.loads(subprocess.run([*launcher, "status", "--data-dir", data, "-o", "json"],
                                           check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        rows = {}
        for comp in status["components"]:
            # The models service's children are model replicas (TensorFlow), not the service.
            rows[comp["component"]] = process_memory(comp["pid"], children=comp["component"] != "models")
            if comp["component"] == "models":
                rows["model replicas"] = process_memory(comp["pid"], only_children=True)
        rows["total"] = {unit: round(sum(row[unit] for row in list(rows.values())), 1) for unit in ("rss_mb", "pss_mb")}
        rows["total"]["without model replicas"] = {
            unit: round(sum(row[unit] for name, row in rows.items() if name not in ("total", "model replicas")), 1)
            for unit in ("rss_mb", "pss_mb")}
        print(json.dumps(rows, indent=2))
    finally:
        subprocess.run([*launcher, "down", "--data-dir", data], stdout=subprocess.DEVNULL, cwd=ROOT)


if __name__ == "__main__":
    main()
