"""A train job through the real jobs service on `--runtime kubernetes`,
against a real kube-apiserver: the test plays the kubelet (binds the job's
Pods to a Node, runs them, ends them) and sees the job's state in GetJob.
The trainer never runs (no kubelet here): what is shown is the platform's
side, from submit to SUCCEEDED, with the Pods and Service it made."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common.runtime.kube_objects import SELECTOR
from tests.integration.jobs_stack import MiB, JobsStack, build_packages, replica_spec, spec

S = pb.JobState


class Kubelet(threading.Thread):
    """Binds every new Pod of the namespace to `node` and marks it Running;
    finishes graceful deletions (what a kubelet confirms)."""

    def __init__(self, env, namespace: str, node: str):
        super().__init__(daemon=True)
        self.env, self.namespace, self.node = env, namespace, node
        self.halt = threading.Event()

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self.halt.wait(0.1):
            try:
                for pod in self.env.core.list_namespaced_pod(self.namespace).items:
                    if pod.metadata.deletion_timestamp is None and not pod.spec.node_name:
                        self.env.bind(self.namespace, pod.metadata.name, self.node)
                        self.env.set_running(self.namespace, pod.metadata.name)
                self.env.finish_deletions(self.namespace)
            except ApiException:  # a Pod deleted meanwhile: look again
                continue


@pytest.fixture(scope="module")
def cluster(kube_env):
    namespace = f"jobs-{uuid.uuid4().hex[:8]}"
    kube_env.create_namespace(namespace)
    kube_env.create_node("jobs-node", cpu="8", memory="32Gi")
    kubelet = Kubelet(kube_env, namespace, "jobs-node")
    kubelet.start()
    yield namespace
    kubelet.halt.set()
    kubelet.join(5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, kube_env, cluster):
    stack = JobsStack(str(tmp_path_factory.mktemp("jobs-kube"))).start()
    stack.start_jobs(extra=["--runtime", "kubernetes", "--kubeconfig", kube_env.kubeconfig,
                            "--namespace", cluster, "--image", "registry.example/cloudml/trainer:1"])
    yield stack
    stack.stop()


def _pods(env, namespace):
    return env.core.list_namespaced_pod(namespace, label_selector=SELECTOR).items


def test_a_distributed_job_runs_as_pods_and_succeeds(kube_env, cluster, stack, tmp_path):
    built = build_packages(str(tmp_path / "packages"))
    admin = stack.admin()
    replicas = [replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=512 * MiB),
                replica_spec(pb.REPLICA_TYPE_PS, cpu=500, memory=512 * MiB),
                replica_spec(pb.REPLICA_TYPE_WORKER, count=2, cpu=500, memory=512 * MiB)]
    admin.submit("kube", spec(admin.upload(built["plain"]), "plain_trainer.task", "--steps 1", replicas=replicas))
    job = admin.wait("kube", states=(S.JOB_STATE_RUNNING, S.JOB_STATE_FAILED), timeout=180)
    assert job.state == S.JOB_STATE_RUNNING, [(e.reason, e.message) for e in job.events]
    deadline = time.monotonic() + 30
    while not all(p.status.phase == "Running" for p in _pods(kube_env, cluster)) and time.monotonic() < deadline:
        time.sleep(0.1)
    pods = _pods(kube_env, cluster)
    assert sorted(p.metadata.labels["cloudml.io/role"] + "-" + p.metadata.labels["cloudml.io/index"]
                  for p in pods) == ["master-0", "ps-0", "worker-0", "worker-1"]
    [svc] = kube_env.core.list_namespaced_service(cluster).items
    for pod in pods:
        [container] = pod.spec.containers
        assert container.image == "registry.example/cloudml/trainer:1"
        env = {e.name: e.value for e in container.env}
        config = json.loads(env["TF_CONFIG"])
        assert config["cluster"]["worker"][1] == f"{svc.metadata.name}-worker-1.{svc.metadata.name}.{cluster}.svc:2222"
        assert env["CLOUDML_JOB_NAME"] == "kube"
    addresses = {f"{r.replica.type}-{r.replica.index}": r.address for r in job.replicas}
    assert addresses[f"{pb.REPLICA_TYPE_PS}-0"].endswith(f".{cluster}.svc:2222")
    # The kubelet ends them: workers and ps first, then the master (the coordinator).
    for pod in sorted(pods, key=lambda p: p.metadata.labels["cloudml.io/role"] == "master"):
        kube_env.set_succeeded(cluster, pod.metadata.name)
    job = admin.wait("kube", timeout=60)
    assert job.state == S.JOB_STATE_SUCCEEDED, [(e.reason, e.message) for e in job.events]
    deadline = time.monotonic() + 30
    while (_pods(kube_env, cluster) or kube_env.core.list_namespaced_service(cluster).items) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pods(kube_env, cluster), "the job's Pods are left behind"
