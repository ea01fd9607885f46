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


def test_a_gpu_job_that_fits_the_nodes_but_not_now_queues_until_the_gpus_are_free(kube_env, cluster, stack,
                                                                                    plain_uri):
    import grpc

    admin = stack.admin()
    kube_env.create_node("gpu-node", cpu="8", memory="32Gi", gpus=2)
    try:
        deadline = time.monotonic() + 30  # the service sees the Node through its watch
        while True:
            try:
                admin.submit("gpu-a", spec(plain_uri, "plain_trainer.task", "--steps 1",
                                           replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB,
                                                                  gpus=2)]))
                break
            except grpc.RpcError as err:  # RESOURCE_EXHAUSTED until the Node is in the cache
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, err
                time.sleep(0.2)
        admin.wait("gpu-a", states=(S.JOB_STATE_RUNNING,), timeout=60)
        [first] = _running_pods(kube_env, cluster, 1)
        [container] = first.spec.containers
        # Whole GPUs as an extended resource (a limit, and a request equal to it, as
        # Kubernetes requires); CPU and memory requested as much as their limits.
        assert container.resources.limits == {"cpu": "500m", "memory": str(256 * MiB), "nvidia.com/gpu": "2"}
        assert container.resources.requests == container.resources.limits
        assert "CUDA_VISIBLE_DEVICES" not in {e.name for e in container.env}  # the device plugin sets it
        # The second fits the cluster's Nodes, but not while the first holds the GPUs: it waits.
        admin.submit("gpu-b", spec(plain_uri, "plain_trainer.task", "--steps 1",
                                   replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB, gpus=2)]))
        deadline = time.monotonic() + 30
        while "Unschedulable" not in [e.reason for e in admin.get("gpu-b").events]:
            assert time.monotonic() < deadline, admin.get("gpu-b").events
            time.sleep(0.1)
        queued = admin.get("gpu-b")
        assert queued.state == S.JOB_STATE_QUEUED
        assert "gpus: needs 2, free 0 of 2" in queued.events[-1].message, queued.events
        assert [p.metadata.name for p in _pods(kube_env, cluster)] == [first.metadata.name]
        kube_env.set_succeeded(cluster, first.metadata.name)
        assert admin.wait("gpu-a", timeout=60).state == S.JOB_STATE_SUCCEEDED
        job = admin.wait("gpu-b", states=(S.JOB_STATE_RUNNING, S.JOB_STATE_FAILED), timeout=60)
        assert job.state == S.JOB_STATE_RUNNING, [(e.reason, e.message) for e in job.events]
        [second] = _running_pods(kube_env, cluster, 1)
        kube_env.set_succeeded(cluster, second.metadata.name)
        assert admin.wait("gpu-b", timeout=60).state == S.JOB_STATE_SUCCEEDED
        assert _gone(kube_env, cluster), "the jobs' Pods or Service are left behind"
    finally:
        kube_env.delete_node("gpu-node")


def test_cancel_of_a_running_job_removes_its_pods_and_service(kube_env, cluster, stack, plain_uri):
    admin = stack.admin()
    replicas = [replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB),
                replica_spec(pb.REPLICA_TYPE_WORKER, cpu=500, memory=256 * MiB)]
    admin.submit("cancelled", spec(plain_uri, "plain_trainer.task", "--steps 1", replicas=replicas))
    admin.wait("cancelled", states=(S.JOB_STATE_RUNNING,), timeout=60)
    _running_pods(kube_env, cluster, 2)
    assert kube_env.core.list_namespaced_service(cluster).items
    admin.cancel("cancelled")
    job = admin.wait("cancelled", timeout=60)
    assert job.state == S.JOB_STATE_CANCELLED, [(e.reason, e.message) for e in job.events]
    assert _gone(kube_env, cluster), "the job's Pods or Service are left behind"


def _events(job) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in job.events]


def test_an_image_the_api_server_refuses_fails_the_job_with_nothing_left(kube_env, cluster, stack, plain_uri):
    # The API server refuses only an image with whitespace around it; any other
    # string is the kubelet's to refuse (the test below).
    admin = stack.admin()
    admin.submit("spaced", spec(plain_uri, "plain_trainer.task", "--steps 1", docker_image=" registry.example/t:1",
                                replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB)]))
    job = admin.wait("spaced", timeout=60)
    assert job.state == S.JOB_STATE_FAILED and job.events[-1].reason == "StartFailed", _events(job)
    message = job.events[-1].message
    assert "\n" not in message and "must not have leading or trailing whitespace (HTTP 422)" in message, message
    assert _gone(kube_env, cluster), "the job's Service is left behind"


def test_an_image_name_the_kubelet_cannot_parse_fails_the_job(kube_env, cluster, stack, plain_uri):
    admin = stack.admin()
    admin.submit("badimage", spec(plain_uri, "plain_trainer.task", "--steps 1", docker_image="UPPER CASE:bad",
                                  replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB)]))
    job = admin.wait("badimage", timeout=60)
    assert job.state == S.JOB_STATE_FAILED, _events(job)
    message = job.events[-1].message
    assert "InvalidImageName" in message and '"UPPER CASE:bad"' in message and "\n" not in message, _events(job)
    assert _gone(kube_env, cluster), "the job's Pods or Service are left behind"


def test_a_namespace_the_service_account_may_not_write_fails_the_job_with_the_refusal(kube_env, cluster, stack,
                                                                                     plain_uri, tmp_path):
    """The jobs service on a ServiceAccount's token (RBAC enforced), in a
    namespace where it first has no Role at all, then one that only reads."""
    from kubernetes import client

    from deploy.local.service_process import health_status

    namespace = f"readonly-{uuid.uuid4().hex[:8]}"
    kube_env.create_namespace(namespace)
    rbac = client.RbacAuthorizationV1Api(kube_env.core.api_client)
    subject = [{"kind": "ServiceAccount", "name": "cloudml-runtime", "namespace": cluster}]
    rbac.create_cluster_role({"metadata": {"name": f"cloudml-nodes-{namespace}"}, "rules": [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]})
    rbac.create_cluster_role_binding({"metadata": {"name": f"cloudml-nodes-{namespace}"}, "subjects": subject,
                                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                  "name": f"cloudml-nodes-{namespace}"}})
    kubeconfig = kube_env.write_kubeconfig(str(tmp_path / "sa.kubeconfig"),
                                           kube_env.service_account_token(cluster, "cloudml-runtime"))
    stack.jobs[-1].kill()
    try:
        jobs = stack.start_jobs(wait=False, extra=["--runtime", "kubernetes", "--kubeconfig", kubeconfig,
                                                    "--namespace", namespace])
        deadline = time.monotonic() + 30
        while not jobs.poll_address():
            assert jobs.alive() and time.monotonic() < deadline
            time.sleep(0.1)
        admin = stack.admin(jobs)
        admin.submit("refused", spec(plain_uri, "plain_trainer.task", "--steps 1",
                                     replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB)]))
        # No Role: it cannot even list the namespace's Pods. It stays up, not
        # serving, the job queued; its log says why, in one line.
        permission = f'cannot list resource "pods" in API group "" in the namespace "{namespace}"'
        deadline = time.monotonic() + 15
        while True:
            with open(jobs.log_path) as f:
                said = [line for line in f if "(retrying)" in line]
            if said:
                break
            assert jobs.alive() and time.monotonic() < deadline
            time.sleep(0.2)
        assert permission in said[0] and "(HTTP 403)" in said[0], said
        assert health_status(jobs.address) == 2  # NOT_SERVING
        assert admin.get("refused").state == S.JOB_STATE_QUEUED
        # A Role that reads but does not write: the job fails at its start, with
        # the API server's refusal, and nothing of it is left in the namespace.
        rbac.create_namespaced_role(namespace, {"metadata": {"name": "reader"}, "rules": [
            {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]}]})
        rbac.create_namespaced_role_binding(namespace, {"metadata": {"name": "reader"}, "subjects": subject,
                                                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                                    "kind": "Role", "name": "reader"}})
        job = admin.wait("refused", timeout=30)
        assert job.state == S.JOB_STATE_FAILED and job.events[-1].reason == "StartFailed", _events(job)
        message = job.events[-1].message
        assert f'cannot create resource "services" in API group "" in the namespace "{namespace}"' in message, message
        assert "(HTTP 403)" in message and "\n" not in message, message
        assert jobs.alive(), "the service crashed"
        assert _gone(kube_env, namespace)
    finally:
        stack.jobs[-1].kill()
        _start_jobs(stack, kube_env, cluster)


def test_a_pods_log_is_streamed_into_the_jobs_logs_and_outlives_the_pod(kube_env, cluster, stack, plain_uri):
    # pods/log is proxied by the API server to the Node's kubelet endpoint, which
    # envtest serves with the test's text, whole (a real kubelet follows a running
    # container: not shown here, nor what a container writes after the request).
    admin = stack.admin()
    admin.submit("logged", spec(plain_uri, "plain_trainer.task", "--steps 1",
                                replicas=[replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB)]))
    admin.wait("logged", states=(S.JOB_STATE_RUNNING,), timeout=60)
    [pod] = _running_pods(kube_env, cluster, 1)
    kube_env.pod_logs[(cluster, pod.metadata.name)] = b"epoch 1 loss 0.5\nepoch 2 loss 0.25\n"

    def master_lines() -> list[str]:
        return [line.text for line in admin.logs("logged") if line.replica.type == pb.REPLICA_TYPE_MASTER]

    deadline = time.monotonic() + 30  # (the service's follower retries every 2 s until the log is there)
    while master_lines() != ["epoch 1 loss 0.5", "epoch 2 loss 0.25"]:
        assert time.monotonic() < deadline, master_lines()
        time.sleep(0.2)
    kube_env.set_succeeded(cluster, pod.metadata.name)
    assert admin.wait("logged", timeout=60).state == S.JOB_STATE_SUCCEEDED
    assert _gone(kube_env, cluster)
    assert master_lines() == ["epoch 1 loss 0.5", "epoch 2 loss 0.25"]


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
