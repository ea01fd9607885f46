#!/usr/bin/env python3
"""The kubernetes runtime's figures (issue 18), against a real kube-apiserver
(deploy/kubernetes/envtest.py: its own etcd, RBAC on) and a real jobs service
(`--runtime kubernetes`, its own etcd and auth service). No kubelet: the
bench writes Pod status itself (kwok-style) where a figure needs it.

1. Submit -> every Pod of a 4-replica job (1 master, 1 ps, 2 workers)
   created, p50/p99 over N jobs submitted one after another: from the client's
   SubmitJob call to the ADDED event of the job's 4th Pod on a watch of the
   namespace (goal: p50 < 100 ms).
2. Pod status -> job state in GetJob, p50/p99 over M single-replica jobs: from
   the return of the status write that ends the Pod (Succeeded) to the first
   GetJob (polled every 2 ms) that shows SUCCEEDED (goal: p50 < 50 ms).
3. Throughput: K single-replica jobs submitted by 16 concurrent clients;
   API objects (Pods + Services) the platform created per second, from the
   first submit to the last object's ADDED event.

    .venv/bin/python bench/bench_kubernetes.py [--latency-jobs 100] [--state-jobs 50] [--jobs 1000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cloudml.jobs.v1 import jobs_service_pb2 as pb  # noqa: E402
from deploy.kubernetes.envtest import KubeEnv  # noqa: E402
from services.common.runtime.kube_objects import PREFIX, SELECTOR  # noqa: E402
from tests.integration.jobs_stack import MiB, JobsStack, build_packages, replica_spec, spec  # noqa: E402

NAMESPACE = "bench"


class PodWatch(threading.Thread):
    """Records when each Pod and Service of the platform appears (ADDED events), by job name."""

    def __init__(self, env: KubeEnv):
        super().__init__(daemon=True)
        self.env = env
        self.pods: dict[str, list[float]] = {}
        self.objects: list[float] = []
        self.changed = threading.Condition()
        self.ready = threading.Event()

    def _job(self, obj) -> str:
        group = (obj.metadata.annotations or {}).get(PREFIX + "group", "")  # jobs.<tenant>.<name>.<uid>
        return group.split(".")[2] if group.count(".") >= 3 else ""

    def run(self) -> None:
        for kind, lister in (("Service", self.env.core.list_namespaced_service),
                             ("Pod", self.env.core.list_namespaced_pod)):
            threading.Thread(target=self._watch, args=(kind, lister), daemon=True).start()

    def _watch(self, kind, lister) -> None:
        from kubernetes import watch

        version = lister(NAMESPACE, label_selector=SELECTOR).metadata.resource_version
        if kind == "Pod":
            self.ready.set()
        try:
            for event in watch.Watch().stream(lister, NAMESPACE, label_selector=SELECTOR, resource_version=version,
                                              timeout_seconds=3600):
                if event["type"] != "ADDED":
                    continue
                now = time.monotonic()
                with self.changed:
                    self.objects.append(now)
                    if kind == "Pod":
                        self.pods.setdefault(self._job(event["object"]), []).append(now)
                    self.changed.notify_all()
        except Exception:  # noqa: BLE001 - the API server stops at the end of the run
            return

    def wait_pods(self, job: str, count: int, timeout: float = 30.0) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.pods.get(job, ())) >= count, timeout):
                raise TimeoutError(f"job {job}: {len(self.pods.get(job, ()))} of {count} Pods in {timeout:.0f} s")
            return self.pods[job][count - 1]

    def wait_objects(self, count: int, timeout: float) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.objects) >= count, timeout):
                raise TimeoutError(f"{len(self.objects)} of {count} objects in {timeout:.0f} s")
            return self.objects[count - 1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--state-jobs", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-kube-")
    env = KubeEnv(os.path.join(work, "kube")).start()
    stack = None
    try:
        env.create_namespace(NAMESPACE)
        env.create_node("big", cpu="100000", memory="1000Ti")
        # The services' default lease (10 s), not the tests' 3 s: a loaded machine must not cost the leadership.
        stack = JobsStack(os.path.join(work, "stack"), lease_ttl=10).start()
        stack.start_jobs(extra=["--runtime", "kubernetes", "--kubeconfig", env.kubeconfig, "--namespace", NAMESPACE,
                                "--log-level", "WARNING"])
        admin = stack.admin()
        total = args.latency_jobs + args.state_jobs + args.jobs
        # Every job stays (their Pods Pending: no kubelet): a quota that holds them all.
        admin.set_quota("admin", cpu_millis=40 * total * 10, memory_bytes=40 * total * 16 * MiB, train_jobs=total + 10)
        uri = admin.upload(build_packages(os.path.join(work, "pkgs"))["plain"])
        watcher = PodWatch(env)
        watcher.start()
        watcher.ready.wait(30)
        small = dict(cpu=10, memory=16 * MiB)
        four = [replica_spec(pb.REPLICA_TYPE_MASTER, **small), replica_spec(pb.REPLICA_TYPE_PS, **small),
                replica_spec(pb.REPLICA_TYPE_WORKER, count=2, **small)]
        one = [replica_spec(pb.REPLICA_TYPE_MASTER, **small)]
        out: dict = {"machine_load_1m": os.getloadavg()[0]}

        # 1. submit -> 4 Pods created
        latencies = []
        for i in range(args.latency_jobs):
            name = f"lat-{i}"
            t0 = time.monotonic()
            admin.submit(name, spec(uri, "plain_trainer.task", "--steps 1", replicas=four))
            latencies.append(watcher.wait_pods(name, 4) - t0)
        out["submit_to_4_pods_ms"] = {"p50": 1000 * statistics.median(latencies), "p99": 1000 * pct(latencies, 0.99),
                                      "n": len(latencies)}

        # 2. Pod status -> GetJob
        changes = []
        for i in range(args.state_jobs):
            name = f"state-{i}"
            admin.submit(name, spec(uri, "plain_trainer.task", "--steps 1", replicas=one))
            watcher.wait_pods(name, 1)
            admin.wait(name, states=(pb.JOB_STATE_RUNNING,), timeout=30)
            [pod] = [p for p in env.core.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR).items
                     if watcher._job(p) == name]
            env.bind(NAMESPACE, pod.metadata.name, "big")
            env.set_succeeded(NAMESPACE, pod.metadata.name)
            t0 = time.monotonic()
            while admin.get(name).state != pb.JOB_STATE_SUCCEEDED:
                if time.monotonic() - t0 > 30:
                    raise TimeoutError(f"{name} not SUCCEEDED in 30 s")
                time.sleep(0.002)
            changes.append(time.monotonic() - t0)
        out["pod_status_to_getjob_ms"] = {"p50": 1000 * statistics.median(changes), "p99": 1000 * pct(changes, 0.99),
                                          "n": len(changes)}

        # 3. throughput
        before = len(watcher.objects)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: admin.submit(f"many-{i}", spec(uri, "plain_trainer.task", "--steps 1",
                                                                  replicas=one)), range(args.jobs)))
        submitted = time.monotonic() - t0
        last = watcher.wait_objects(before + 2 * args.jobs, timeout=max(120.0, args.jobs * 0.5))
        elapsed = last - t0
        out["throughput"] = {"jobs": args.jobs, "objects": 2 * args.jobs, "seconds": elapsed,
                             "objects_per_second": 2 * args.jobs / elapsed, "submits_per_second": args.jobs / submitted}
        out["machine_load_1m_after"] = os.getloadavg()[0]
    finally:
        if stack is not None:
            stack.stop()
        env.stop()
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(out, indent=2))
    else:
        a, b, c = out["submit_to_4_pods_ms"], out["pod_status_to_getjob_ms"], out["throughput"]
        print(f"submit -> 4 Pods created:      p50 {a['p50']:.1f} ms, p99 {a['p99']:.1f} ms (n={a['n']})")
        print(f"Pod status -> GetJob state:    p50 {b['p50']:.1f} ms, p99 {b['p99']:.1f} ms (n={b['n']})")
        print(f"{c['jobs']} jobs: {c['objects']} API objects in {c['seconds']:.1f} s = "
              f"{c['objects_per_second']:.0f} objects/s (submits {c['submits_per_second']:.0f}/s)")
        print(f"(load average {out['machine_load_1m']:.1f} before, {out['machine_load_1m_after']:.1f} after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
