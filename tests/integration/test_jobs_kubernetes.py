"""A train job through the real jobs service on `--runtime kubernetes`,
against a real kube-apiserver: the test plays the kubelet (binds the job's
Pods to a Node, runs them, ends them) and sees the job's state in GetJob.
The trainer never runs (no kubelet here): what is shown is the platform's
side, from submit to SUCCEEDED, with the Pods and Service it made."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from deploy.kubernetes.envtest import Kubelet
from services.common.runtime.kube_objects import SELECTOR
from tests.integration.jobs_stack import MiB, JobsStack, build_packages, replica_spec, spec

S = pb.JobState


@pytest.fixture(scope="module")
def cluster(kube_env):
    namespace = f"jobs-{uuid.uuid4().hex[:8]}"
    kube_env.create_namespace(namespace)
    kube_env.create_node("jobs-node", cpu="8", memory="32Gi")
    kubelet = Kubelet(kube_env, namespace, "jobs-node").start()
    yield namespace
    kubelet.halt()


def _start_jobs(stack, kube_env, namespace):
    return stack.start_jobs(extra=["--runtime", "kubernetes", "--kubeconfig", kube_env.kubeconfig,
                                   "--namespace", namespace, "--image", "registry.example/cloudml/trainer:1",
                                   "--storage-claim", "cloudml-storage", "--package-cache-claim", "cloudml-packages"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory, kube_env, cluster):
    stack = JobsStack(str(tmp_path_factory.mktemp("jobs-kube"))).start()
    _start_jobs(stack, kube_env, cluster)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def plain_uri(tmp_path_factory, stack):
    built = build_packages(str(tmp_path_factory.mktemp("packages")))
    return stack.admin().upload(built["plain"])


def _pods(env, namespace):
    return env.core.list_namespaced_pod(namespace, label_selector=SELECTOR).items


def _running_pods(env, namespace, count: int, timeout: float = 60.0) -> list:
    """The job's Pods once `count` of them run (the Kubelet thread runs them)."""
    deadline = time.monotonic() + timeout
    while True:
        pods = [p for p in _pods(env, namespace) if p.metadata.deletion_timestamp is None]
        if len(pods) == count and all(p.status.phase == "Running" for p in pods):
            return pods
        assert time.monotonic() < deadline, [(p.metadata.name, p.status.phase) for p in pods]
        time.sleep(0.1)


def _gone(env, namespace, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while (_pods(env, namespace) or env.core.list_namespaced_service(namespace).items) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _pods(env, namespace) and not env.core.list_namespaced_service(namespace).items


def test_a_distributed_job_runs_as_pods_and_succeeds(kube_env, cluster, stack, plain_uri):
    admin = stack.admin()
    replicas = [replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=512 * MiB),
                replica_spec(pb.REPLICA_TYPE_PS, cpu=500, memory=512 * MiB),
                replica_spec(pb.REPLICA_TYPE_WORKER, count=2, cpu=500, memory=512 * MiB)]
    admin.submit("kube", spec(plain_uri, "plain_trainer.task", "--steps 1", replicas=replicas))
    job = admin.wait("kube", states=(S.JOB_STATE_RUNNING, S.JOB_STATE_FAILED), timeout=180)
    assert job.state == S.JOB_STATE_RUNNING, [(e.reason, e.message) for e in job.events]
    pods = _running_pods(kube_env, cluster, 4)
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
        # The Pod installs the package itself (the trainer image's entrypoint), from the
        # tenant's directory of the storage volume, into its directory of the package cache.
        assert container.command == ["python", "-m", "services.jobs.pod_entrypoint", "--package", plain_uri,
                                     "--module", "plain_trainer.task", "--", "--steps", "1"]
        assert env["CLOUDML_PACKAGE_CACHE"] == "/var/cache/cloudml/packages"
        mounts = {m.name: (m.mount_path, m.sub_path) for m in container.volume_mounts}
        storage = stack.storage("admin")
        assert plain_uri.startswith("file://" + storage + "/")
        assert mounts["storage"] == (storage, "admin")
        assert mounts["packages"] == ("/var/cache/cloudml/packages", "admin")
        claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
        assert claims == {"storage": "cloudml-storage", "packages": "cloudml-packages"}
    addresses = {f"{r.replica.type}-{r.replica.index}": r.address for r in job.replicas}
    assert addresses[f"{pb.REPLICA_TYPE_PS}-0"].endswith(f".{cluster}.svc:2222")
    # The kubelet ends them: workers and ps first, then the master (the coordinator).
    for pod in sorted(pods, key=lambda p: p.metadata.labels["cloudml.io/role"] == "master"):
        kube_env.set_succeeded(cluster, pod.metadata.name)
    job = admin.wait("kube", timeout=60)
    assert job.state == S.JOB_STATE_SUCCEEDED, [(e.reason, e.message) for e in job.events]
    assert _gone(kube_env, cluster), "the job's Pods or Service are left behind"


def test_an_evicted_pod_is_retried_and_an_oom_killed_one_fails_the_job(kube_env, cluster, stack, plain_uri):
    admin = stack.admin()
    replicas = [replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB),
                replica_spec(pb.REPLICA_TYPE_WORKER, cpu=500, memory=256 * MiB)]
    admin.submit("evict", spec(plain_uri, "plain_trainer.task", "--steps 1", replicas=replicas,
                               restart_policy=pb.RESTART_POLICY_EXIT_CODE, max_retries=1))
    admin.wait("evict", states=(S.JOB_STATE_RUNNING,), timeout=120)
    first = {p.metadata.labels["cloudml.io/role"]: p.metadata.name for p in _running_pods(kube_env, cluster, 2)}
    kube_env.evict(cluster, first["worker"])
    # A second attempt: new Pods (the first attempt's are stopped and removed).
    deadline = time.monotonic() + 60
    while True:
        pods = _running_pods(kube_env, cluster, 2)
        if not {p.metadata.name for p in pods} & set(first.values()):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    master = next(p.metadata.name for p in pods if p.metadata.labels["cloudml.io/role"] == "master")
    kube_env.set_failed(cluster, master, exit_code=137, reason="OOMKilled")
    job = admin.wait("evict", timeout=60)
    events = [(e.reason, e.message) for e in job.events]
    assert job.state == S.JOB_STATE_FAILED and job.attempts == 2, events
    assert "ReplicaEvicted" in [e.reason for e in job.events], events
    assert job.events[-1].reason == "OOMKilled", events
    assert _gone(kube_env, cluster), "the job's Pods or Service are left behind"


def test_a_job_needing_more_gpus_than_the_nodes_have_fails_at_submit(stack, plain_uri):
    import grpc

    admin = stack.admin()
    with pytest.raises(grpc.RpcError) as info:
        admin.submit("gpus", spec(plain_uri, "plain_trainer.task", "--steps 1",
                                  replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, gpus=1)]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "nvidia.com/gpu: requested 1" in info.value.details()


def test_a_killed_jobs_service_adopts_its_pods_without_duplicates(kube_env, cluster, stack, plain_uri):
    admin = stack.admin()
    replicas = [replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB),
                replica_spec(pb.REPLICA_TYPE_WORKER, cpu=500, memory=256 * MiB)]
    admin.submit("adopted", spec(plain_uri, "plain_trainer.task", "--steps 1", replicas=replicas))
    admin.wait("adopted", states=(S.JOB_STATE_RUNNING,), timeout=120)
    before = {p.metadata.name: p.metadata.uid for p in _running_pods(kube_env, cluster, 2)}
    stack.jobs[-1].kill()
    worker = next(n for n in before if "-worker-" in n)
    kube_env.set_succeeded(cluster, worker)  # ends while nobody watches
    _start_jobs(stack, kube_env, cluster)
    admin = stack.admin()
    deadline = time.monotonic() + 60
    while "Recovered" not in [e.reason for e in admin.get("adopted").events]:
        assert time.monotonic() < deadline, admin.get("adopted").events
        time.sleep(0.1)
    assert {p.metadata.name: p.metadata.uid for p in _pods(kube_env, cluster)} == before
    master = next(n for n in before if "-master-" in n)
    kube_env.set_succeeded(cluster, master)
    job = admin.wait("adopted", timeout=60)
    assert job.state == S.JOB_STATE_SUCCEEDED and job.attempts == 1, [(e.reason, e.message) for e in job.events]
    assert _gone(kube_env, cluster)


def test_an_unreachable_api_server_keeps_the_service_up_and_not_serving(tmp_path):
    from deploy.kubernetes.envtest import unreachable_kubeconfig
    from deploy.local.service_process import health_status

    kubeconfig = unreachable_kubeconfig(str(tmp_path / "kubeconfig"))
    stack = JobsStack(str(tmp_path / "stack")).start()
    try:
        jobs = stack.start_jobs(wait=False, extra=["--runtime", "kubernetes", "--kubeconfig", kubeconfig,
                                                    "--namespace", "default"])
        deadline = time.monotonic() + 30
        while not jobs.poll_address():
            assert jobs.alive() and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)
        assert jobs.alive(), "the service crashed"
        assert health_status(jobs.address) == 2  # NOT_SERVING
        with open(stack.workdir + "/jobs-0.log") as f:
            text = f.read()
        assert "cannot list" in text and "(retrying)" in text, text[-2000:]
    finally:
        stack.stop()
