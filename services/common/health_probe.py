"""An exec probe on a platform process's `grpc.health.v1` (Kubernetes 1.20's
probes cannot speak gRPC themselves; deploy/kubernetes and the models
reconciler's model-server Pods use it):

    python -m services.common.health_probe [HOST:]PORT [--live] [--timeout 1]

Readiness (default): exit 0 when the process says SERVING (a service: etcd
reachable and its state loaded; a model server: its model loaded and warmed
up, not draining), 1 otherwise. `--live` (liveness): exit 0 when it answers
at all, so a service waiting for etcd is taken out of rotation but not
restarted over and over. Imports grpc only (no TensorFlow).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.health_probe")
    parser.add_argument("address", help="[HOST:]PORT (HOST defaults to 127.0.0.1)")
    parser.add_argument("--live", action="store_true", help="any answer passes (liveness)")
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    address = args.address if ":" in args.address else f"127.0.0.1:{args.address}"
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"no answer from {address}: {err.code().name}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING and not args.live:
        print(f"not ready: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
