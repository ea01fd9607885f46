#!/usr/bin/env python3
"""Foundation figures (issue 2), measured side by side in one script:

1. Token verification in the auth interceptor, µs per call: the first sight
   of a token (Ed25519 signature check) and a repeated token (cache hit).
2. Unary RPC latency (WhoAmI) through the gateway vs. direct to the auth
   service, p50/p99, interleaved rounds on the same processes; the gateway's
   added latency is the difference of the medians.
3. Quota reservations per second under contention: C concurrent clients
   reserving and releasing in one tenant whose limit fits only some of them.
4. Resident memory of each service process, and whether it loaded TensorFlow.

    .venv/bin/python bench/bench_foundation.py [--calls 2000] [--rounds 4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import psutil  # noqa: E402

from cloudml.auth.v1 import auth_service_pb2 as pb  # noqa: E402
from cloudml.auth.v1 import auth_service_pb2_grpc as pbg  # noqa: E402
from deploy.local.stack import AuthGatewayStack  # noqa: E402

ADMIN = ("AKBENCHADMIN00000000", "bench-admin-secret")
SERVICE = ("AKBENCHSERVICE000000", "bench-service-secret")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_token_verification(n: int = 20000) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    import jwt

    from services.common.tokens import TokenVerifier

    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    verifier = TokenVerifier()
    verifier.update({"k1": pem}, set())
    now = int(time.time())
    tokens = [jwt.encode({"iss": "cloudml-auth", "aud": "cloudml", "sub": "t", "role": 1, "akid": "AK",
                          "iat": now, "exp": now + 3600, "jti": str(i)}, key, algorithm="EdDSA",
                         headers={"kid": "k1"}) for i in range(2000)]
    start = time.perf_counter()
    for token in tokens:
        verifier.verify(token)
    cold = (time.perf_counter() - start) / len(tokens) * 1e6
    start = time.perf_counter()
    for i in range(n):
        verifier.verify(tokens[i % len(tokens)])
    warm = (time.perf_counter() - start) / n * 1e6
    return {"first_sight_us": round(cold, 1), "cached_us": round(warm, 2)}


def latency(stub, metadata, calls: int) -> list[float]:
    out = []
    request = pb.WhoAmIRequest()
    for _ in range(calls):
        t = time.perf_counter()
        stub.WhoAmI(request, metadata=metadata, timeout=5)
        out.append(time.perf_counter() - t)
    return out


def bench_reservations(stub, metadata, clients: int, seconds: float) -> dict:
    stub.CreateTenant(pb.CreateTenantRequest(name="bench-contention"), metadata=metadata)
    # The limit fits half of the clients at once: the rest see "busy".
    stub.SetQuota(pb.SetQuotaRequest(tenant="bench-contention",
                                     limits={"cpu_millis": 100 * clients // 2, "train_jobs": 1000}),
                  metadata=metadata)
    granted = busy = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(i: int):
        nonlocal granted, busy
        g = b = 0
        n = 0
        while time.monotonic() < stop:
            owner = f"bench/{i}/{n}"
            n += 1
            try:
                stub.Reserve(pb.ReserveRequest(tenant="bench-contention", owner_id=owner,
                                               resources={"cpu_millis": 100, "train_jobs": 1}),
                             metadata=metadata, timeout=10)
                g += 1
                stub.Release(pb.ReleaseRequest(tenant="bench-contention", owner_id=owner),
                             metadata=metadata, timeout=10)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                b += 1
        with lock:
            granted += g
            busy += b

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.monotonic() - start
    quota = stub.GetQuota(pb.GetQuotaRequest(tenant="bench-contention"), metadata=metadata)
    return {
        "clients": clients,
        "granted_per_s": round(granted / elapsed, 1),
        "attempts_per_s": round((granted + busy) / elapsed, 1),
        "busy_answers": busy,
        "usage_after": quota.usage.cpu_millis,
    }


def process_memory(pid: int, children: bool = True, only_children: bool = False) -> dict:
    """RSS of a service's process and its children (the gateway's native data
    plane), and their PSS: RSS counts the shared libraries' pages (gRPC's,
    Python's: ~30 MB) in full in every process; PSS shares them out among the
    processes that map them, so the PSS of all components adds up to what the
    platform costs the machine. `children=False`: the process alone;
    `only_children`: its children alone (the models service's replicas)."""
    p = psutil.Process(pid)
    procs = p.children(recursive=True) if only_children else [p, *p.children(recursive=True)] if children else [p]
    tf_loaded = False
    for q in procs:
        with open(f"/proc/{q.pid}/maps") as f:
            tf_loaded = tf_loaded or any("tensorflow" in line for line in f)
    pss = sum(q.memory_full_info().pss for q in procs)
    return {"rss_mb": round(sum(q.memory_info().rss for q in procs) / 2**20, 1),
            "pss_mb": round(pss / 2**20, 1), "processes": len(procs), "tensorflow_loaded": tf_loaded}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    stack = AuthGatewayStack(tempfile.mkdtemp(prefix="cloudml-bench-"), admin=ADMIN, service=SERVICE,
                             flags=["--log-level", "WARNING"])
    try:
        stack.start()
        auth, gateway = stack.auth, stack.gateway
        results = {"token_verification": bench_token_verification()}

        direct = pbg.AuthServiceStub(grpc.insecure_channel(auth.address))
        via = pbg.AuthServiceStub(grpc.insecure_channel(gateway.address))
        token = direct.IssueToken(pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token
        md = (("authorization", f"Bearer {token}"),)
        latency(direct, md, 300)
        latency(via, md, 300)  # warm up both paths
        samples = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            samples["direct"] += latency(direct, md, args.calls)
            samples["gateway"] += latency(via, md, args.calls)
        lat = {}
        for name, values in samples.items():
            lat[name] = {"p50_ms": round(pct(values, 0.5) * 1e3, 3), "p99_ms": round(pct(values, 0.99) * 1e3, 3)}
        lat["gateway_added_p50_ms"] = round(lat["gateway"]["p50_ms"] - lat["direct"]["p50_ms"], 3)
        lat["ratio_p50"] = round(lat["gateway"]["p50_ms"] / lat["direct"]["p50_ms"], 2)
        results["unary_latency_whoami"] = lat

        results["reservations"] = bench_reservations(direct, md, args.clients, args.seconds)
        results["memory"] = {"auth": process_memory(auth.process.pid),
                             "gateway": process_memory(gateway.process.pid)}
        print(json.dumps(results, indent=2))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
