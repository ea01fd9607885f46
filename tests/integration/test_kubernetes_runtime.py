"""The kubernetes runtime against a real kube-apiserver (RBAC on, no nodes).

The tests play the kubelet (deploy/kubernetes/envtest.py): they bind Pods to
Node objects they made and write Pod status through the status subresource,
and check that the runtime reacts as it would to a real kubelet. What they
cannot show: Pods really running, pulling images, reaching each other by DNS.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

import pytest

from services.common.runtime.base import Amount, CapacityBusy, ReplicaPhase, ReplicaRequest, Unschedulable
from services.common.runtime.factory import make_kubernetes_runtime
from services.common.runtime.kube_objects import DEFAULT_IMAGE, SELECTOR

GiB = 1 << 30
ROLES = [("master", 0), ("ps", 0), ("worker", 0), ("worker", 1)]


@pytest.fixture
def ns(kube_env) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_env.create_namespace(name)
    return name


@pytest.fixture
async def rt(kube_env, ns):
    runtime = make_kubernetes_runtime(kube_env.kubeconfig, ns)
    await runtime.wait_synced(30)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module", autouse=True)
def nodes(kube_env):
    """Two Nodes, 4 cores, 16 GiB and 2 GPUs each."""
    for name in ("node-a", "node-b"):
        kube_env.create_node(name, cpu="4", memory="16Gi", gpus=2)


def _req(group: str, role: str, index: int, *, env=None, image="", cpu=500, memory=GiB, gpus=0,
         tmp="/tmp/kube-test") -> ReplicaRequest:
    return ReplicaRequest(
        replica_id=f"jobs.team-a.{group}.a1.{role}-{index}", group=group,
        argv=["python", "-m", "trainer.task", "--epochs", "1"], env=env or {"A": "1"},
        workdir="/work/job", log_path=os.path.join(tmp, f"{group}-{role}-{index}.log"),
        resources=Amount(cpu, memory, gpus), image=image, tenant="team-a", role=role, index=index)


def _pods(env, ns) -> dict:
    return {p.metadata.annotations["cloudml.io/replica-id"]: p
            for p in env.core.list_namespaced_pod(ns, label_selector=SELECTOR).items}


async def _until(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    assert predicate()


async def _running(rt, requests, timeout=10.0):
    """Until the runtime has seen the kubelet's Running for these replicas."""
    for _ in range(int(timeout / 0.05)):
        statuses = await asyncio.gather(*(rt.status(r.replica_id) for r in requests))
        if all(s.message.startswith("Running") for s in statuses):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not running: {statuses}")


async def _group(rt, group, roles=ROLES, **kwargs) -> list[ReplicaRequest]:
    rt.reserve(group, [Amount(500, GiB)] * len(roles))
    addresses = await rt.addresses(group, roles)
    cluster = {}
    for role, index in roles:
        cluster.setdefault(role, []).append(addresses[(role, index)])
    requests = [_req(group, role, index, env={"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": role, "index": index}})}, **kwargs) for role, index in roles]
    statuses = await asyncio.gather(*(rt.start(r) for r in requests))
    assert all(s.phase == ReplicaPhase.RUNNING for s in statuses)
    return requests


async def _forget_all(rt, requests):
    for r in requests:
        await rt.forget(r.replica_id)
    rt.release(requests[0].group)


def _network_policies(env, ns) -> list:
    from kubernetes import client

    return client.NetworkingV1Api(env.core.api_client).list_namespaced_network_policy(ns).items


def _empty(env, ns) -> bool:
    return (not env.core.list_namespaced_pod(ns).items and not env.core.list_namespaced_service(ns).items
            and not _network_policies(env, ns))


async def test_distributed_group_creates_its_pods_and_headless_service(kube_env, ns, rt):
    requests = await _group(rt, "linear")
    pods = _pods(kube_env, ns)
    assert sorted(pods) == sorted(r.replica_id for r in requests)
    services = kube_env.core.list_namespaced_service(ns).items
    assert len(services) == 1
    svc = services[0]
    assert svc.spec.cluster_ip == "None" and svc.metadata.annotations["cloudml.io/group"] == "linear"
    # Only the group's own Pods reach its TF port (TensorFlow's server authenticates no one).
    [policy] = _network_policies(kube_env, ns)
    assert policy.metadata.name == svc.metadata.name
    [owner] = policy.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("Service", svc.metadata.name, svc.metadata.uid)
    group_labels = {"cloudml.io/group": svc.metadata.name}
    assert policy.spec.pod_selector.match_labels == group_labels and policy.spec.policy_types == ["Ingress"]
    [rule] = policy.spec.ingress
    assert [peer.pod_selector.match_labels for peer in rule._from] == [group_labels]
    assert [(port.protocol, port.port) for port in rule.ports] == [("TCP", 2222)]
    for request in requests:
        pod = pods[request.replica_id]
        labels = pod.metadata.labels
        assert labels["cloudml.io/tenant"] == "team-a" and labels["cloudml.io/group"] == svc.metadata.name
        assert (labels["cloudml.io/role"], labels["cloudml.io/index"]) == (request.role, str(request.index))
        assert labels["cloudml.io/replica"] == pod.metadata.name
        [owner] = pod.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid) == ("Service", svc.metadata.name, svc.metadata.uid)
        spec = pod.spec
        assert spec.restart_policy == "Never" and spec.subdomain == svc.metadata.name
        assert spec.automount_service_account_token is False
        [container] = spec.containers
        assert container.image == DEFAULT_IMAGE and container.command == request.argv
        assert container.working_dir == "/work/job"
        assert container.resources.requests == container.resources.limits == {"cpu": "500m", "memory": str(GiB)}
        env = {e.name: e.value for e in container.env}
        assert "CUDA_VISIBLE_DEVICES" in env and not env["CUDA_VISIBLE_DEVICES"]  # "" (the API drops empty values)
        config = json.loads(env["TF_CONFIG"])
        assert config["task"] == {"type": request.role, "index": request.index}
        assert config["cluster"]["worker"] == [
            f"{svc.metadata.name}-worker-{i}.{svc.metadata.name}.{ns}.svc:2222" for i in (0, 1)]
        assert f"{spec.hostname}.{spec.subdomain}.{ns}.svc:2222" in config["cluster"][request.role]
    # Unbound Pods are Pending, which is not an end.
    status = await rt.status(requests[0].replica_id)
    assert status.phase == ReplicaPhase.RUNNING and status.message.startswith("Pending")
    # The test is the kubelet: bind, run, succeed.
    for request in requests:
        name = pods[request.replica_id].metadata.name
        kube_env.bind(ns, name, "node-a")
        kube_env.set_running(ns, name)
        kube_env.set_succeeded(ns, name)
    ended = await asyncio.gather(*(rt.wait(r.replica_id, 10) for r in requests))
    assert [(s.phase, s.exit_code, s.reason) for s in ended] == [(ReplicaPhase.SUCCEEDED, 0, "Completed")] * 4
    await _forget_all(rt, requests)
    assert _empty(kube_env, ns)


async def test_oom_killed_and_evicted_pods_fail_with_their_reasons(kube_env, ns, rt):
    requests = await _group(rt, "oom", roles=[("worker", 0), ("worker", 1)])
    pods = _pods(kube_env, ns)
    oom, evicted = (pods[r.replica_id].metadata.name for r in requests)
    for name in (oom, evicted):
        kube_env.bind(ns, name, "node-b")
        kube_env.set_running(ns, name)
    await _running(rt, requests)
    kube_env.set_failed(ns, oom, exit_code=137, reason="OOMKilled")
    kube_env.evict(ns, evicted)
    first = await rt.wait(requests[0].replica_id, 10)
    second = await rt.wait(requests[1].replica_id, 10)
    assert (first.phase, first.exit_code, first.reason) == (ReplicaPhase.FAILED, 137, "OOMKilled")
    assert (second.phase, second.reason) == (ReplicaPhase.FAILED, "Evicted")
    assert "low on resource" in second.message
    await _forget_all(rt, requests)
    assert _empty(kube_env, ns)


async def test_stop_deletes_with_the_grace_period_and_forget_leaves_nothing(kube_env, ns, rt):
    requests = await _group(rt, "stopped", roles=[("master", 0), ("worker", 0)])
    pods = _pods(kube_env, ns)
    bound = pods[requests[0].replica_id].metadata.name
    kube_env.bind(ns, bound, "node-a")
    kube_env.set_running(ns, bound)
    await _running(rt, requests[:1])

    async def kubelet():  # the kubelet confirms the graceful delete
        await _until(lambda: kube_env.core.read_namespaced_pod(bound, ns).metadata.deletion_timestamp is not None)
        assert kube_env.core.read_namespaced_pod(bound, ns).metadata.deletion_grace_period_seconds == 3
        kube_env.finish_deletions(ns)

    helper = asyncio.create_task(kubelet())
    stopped = await rt.stop(requests[0].replica_id, grace_seconds=3)
    await helper
    assert (stopped.phase, stopped.reason, stopped.exit_code) == (ReplicaPhase.FAILED, "Killed", 137)
    # An unbound (Pending) Pod goes at once.
    pending = await rt.stop(requests[1].replica_id, grace_seconds=3)
    assert pending.phase == ReplicaPhase.FAILED and pending.reason == "Killed"
    await _forget_all(rt, requests)
    assert _empty(kube_env, ns)
    assert (await rt.status(requests[0].replica_id)).phase == ReplicaPhase.UNKNOWN


async def test_a_pod_deleted_behind_the_runtimes_back_is_lost(kube_env, ns, rt):
    [request] = await _group(rt, "lost", roles=[("worker", 0)])
    name = _pods(kube_env, ns)[request.replica_id].metadata.name
    kube_env.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    status = await rt.wait(request.replica_id, 10)
    assert (status.phase, status.reason) == (ReplicaPhase.UNKNOWN, "Lost")
    await _forget_all(rt, [request])
    assert _empty(kube_env, ns)


async def test_gpus_are_whole_and_capacity_comes_from_the_nodes(kube_env, ns, rt):
    assert rt.total() == Amount(8000, 32 * GiB, 4)
    with pytest.raises(Unschedulable, match="nvidia.com/gpu: requested 5"):
        rt.check_fits_ever([Amount(100, GiB, 1)] * 5)
    with pytest.raises(Unschedulable, match="no single Node"):
        rt.check_fits_ever([Amount(100, GiB, 3)])
    rt.reserve("gpu-a", [Amount(1000, GiB, 2), Amount(1000, GiB, 1)])
    with pytest.raises(CapacityBusy, match="nvidia.com/gpu: requested 2, free 1"):
        rt.reserve("gpu-b", [Amount(1000, GiB, 2)])
    start = [_req("gpu-a", "worker", 0, gpus=2, cpu=1000), _req("gpu-a", "worker", 1, gpus=1, cpu=1000)]
    await asyncio.gather(*(rt.start(r) for r in start))
    pods = _pods(kube_env, ns)
    resources = pods[start[0].replica_id].spec.containers[0].resources
    assert resources.limits["nvidia.com/gpu"] == resources.requests["nvidia.com/gpu"] == "2"
    env = {e.name: e.value for e in pods[start[0].replica_id].spec.containers[0].env}
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin names the GPUs it hands out
    for r in start:
        await rt.stop(r.replica_id, 0)
    await _forget_all(rt, start)
    rt.reserve("gpu-b", [Amount(1000, GiB, 2)])  # fits once gpu-a is released
    rt.release("gpu-b")
    assert rt.free() == rt.total()


async def test_a_restarted_service_adopts_its_pods_without_duplicates(kube_env, ns, rt):
    requests = await _group(rt, "adopted", roles=[("master", 0), ("worker", 0)])
    name = _pods(kube_env, ns)[requests[0].replica_id].metadata.name
    kube_env.bind(ns, name, "node-a")
    kube_env.set_running(ns, name)
    free_before = rt.free()
    rt.close()
    second = make_kubernetes_runtime(kube_env.kubeconfig, ns)
    try:
        adopted = await second.adopt()
        assert sorted(s.replica_id for s in adopted) == sorted(r.replica_id for r in requests)
        assert all(s.phase == ReplicaPhase.RUNNING for s in adopted)
        assert second.free() == free_before  # the group's reservation is restored once
        again = await asyncio.gather(*(second.start(r) for r in requests))
        assert [s.replica_id for s in again] == [r.replica_id for r in requests]
        assert len(_pods(kube_env, ns)) == 2
        kube_env.set_succeeded(ns, name)
        assert (await second.wait(requests[0].replica_id, 10)).phase == ReplicaPhase.SUCCEEDED
        await second.stop(requests[1].replica_id, 0)
        await _forget_all(second, requests)
        assert _empty(kube_env, ns)
    finally:
        second.close()


async def test_an_image_the_api_server_rejects_is_a_clear_error_and_leaves_nothing(kube_env, ns, rt):
    rt.reserve("bad-image", [Amount(500, GiB)])
    with pytest.raises(ValueError, match="refused the Pod.*image"):
        await rt.start(_req("bad-image", "master", 0, image=" trainer:latest"))
    assert _empty(kube_env, ns)
    rt.release("bad-image")


async def _unavailable(runtime, pattern: str) -> None:
    """The runtime cannot list the cluster: waiting says why, and so does reserve()."""
    with pytest.raises(ConnectionError, match=pattern):
        await runtime.wait_synced(2.0)
    with pytest.raises(CapacityBusy, match=pattern):
        runtime.reserve("g", [Amount(100, GiB)])


async def test_an_unreachable_api_server_is_a_clear_error_not_a_crash(tmp_path):
    from deploy.kubernetes.envtest import unreachable_kubeconfig

    kubeconfig = unreachable_kubeconfig(str(tmp_path / "kubeconfig"))
    runtime = make_kubernetes_runtime(kubeconfig, "default")
    try:
        runtime.check_fits_ever([Amount(100, GiB)])  # not known yet: reserve() decides
        await _unavailable(runtime, "API server https://127.0.0.1")
    finally:
        runtime.close()


def test_a_missing_kubeconfig_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--kubeconfig"):
        make_kubernetes_runtime(str(tmp_path / "nope"), "default")


async def test_a_watch_whose_version_expired_lists_again(kube_env, ns, monkeypatch):
    """410 Gone (the watch's resourceVersion was compacted away): the runtime
    lists again and misses nothing that changed meanwhile."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    real = watch.Watch.stream
    gone = {"pods": 0}
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stream(self, func, *args, **kwargs):
        if "pod" in getattr(func, "__name__", "") and gone["pods"] == 0:
            gone["pods"] += 1
            # Meanwhile (between the list and this watch) a replica's Pod was deleted.
            loop.call_soon_threadsafe(ready.set)
            time.sleep(1.0)
            raise ApiException(status=410, reason="Gone")
        return real(self, func, *args, **kwargs)

    monkeypatch.setattr(watch.Watch, "stream", stream)
    runtime = make_kubernetes_runtime(kube_env.kubeconfig, ns)
    try:
        await runtime.wait_synced(30)
        [request] = await _group(runtime, "expired", roles=[("worker", 0)])
        await ready.wait()
        name = _pods(kube_env, ns)[request.replica_id].metadata.name
        kube_env.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        status = await runtime.wait(request.replica_id, 10)
        assert gone["pods"] == 1
        assert (status.phase, status.reason) == (ReplicaPhase.UNKNOWN, "Lost")
        await _forget_all(runtime, [request])
        assert _empty(kube_env, ns)
    finally:
        runtime.close()


async def test_a_running_pods_log_is_followed_into_its_log_file(kube_env, ns, rt, tmp_path):
    """pods/log, proxied by the API server to the Node's kubelet endpoint
    (envtest serves the test's text there, as kwok does)."""
    rt.reserve("logged", [Amount(500, GiB)])
    request = _req("logged", "master", 0, tmp=str(tmp_path))
    await rt.start(request)
    name = _pods(kube_env, ns)[request.replica_id].metadata.name
    kube_env.pod_logs[(ns, name)] = b"epoch 1 loss 0.5\nepoch 2 loss 0.25\n"
    kube_env.bind(ns, name, "node-a")
    kube_env.set_running(ns, name)
    await _until(lambda: os.path.exists(request.log_path) and "loss 0.25" in open(request.log_path).read())
    kube_env.set_succeeded(ns, name)
    assert (await rt.wait(request.replica_id, 10)).phase == ReplicaPhase.SUCCEEDED
    await _forget_all(rt, [request])
    with open(request.log_path) as f:  # the platform's copy outlives the Pod
        assert f.read() == "epoch 1 loss 0.5\nepoch 2 loss 0.25\n"


def _grant(env, ns: str, account: str) -> None:
    """What the runtime needs: Pods, their logs, Services and NetworkPolicies
    in its namespace; reading Nodes (capacity) cluster-wide."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(env.core.api_client)
    verbs = ["get", "list", "watch", "create", "delete"]
    rbac.create_namespaced_role(ns, {"metadata": {"name": "cloudml-runtime"}, "rules": [
        {"apiGroups": [""], "resources": ["pods", "services"], "verbs": verbs},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "delete"]}]})
    subject = [{"kind": "ServiceAccount", "name": account, "namespace": ns}]
    rbac.create_namespaced_role_binding(ns, {"metadata": {"name": "cloudml-runtime"}, "subjects": subject,
                                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                         "name": "cloudml-runtime"}})
    rbac.create_cluster_role({"metadata": {"name": f"cloudml-nodes-{ns}"}, "rules": [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]})
    rbac.create_cluster_role_binding({"metadata": {"name": f"cloudml-nodes-{ns}"}, "subjects": subject,
                                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                  "name": f"cloudml-nodes-{ns}"}})


async def test_the_runtime_needs_only_its_roles_and_says_when_refused(kube_env, ns, tmp_path):
    """With a ServiceAccount's token (RBAC enforced by the API server) and
    only the grants above, a group runs and ends; in a namespace it may not
    write, the error names the refusal."""
    kube_env.core.create_namespace({"metadata": {"name": ns + "-other"}})
    _grant(kube_env, ns, "cloudml-jobs")
    kubeconfig = kube_env.write_kubeconfig(str(tmp_path / "sa.kubeconfig"),
                                           kube_env.service_account_token(ns, "cloudml-jobs"))
    runtime = make_kubernetes_runtime(kubeconfig, ns)
    refused = make_kubernetes_runtime(kubeconfig, ns + "-other")
    try:
        await runtime.wait_synced(30)
        requests = await _group(runtime, "least", roles=[("master", 0), ("worker", 0)], tmp=str(tmp_path))
        for request in requests:
            name = _pods(kube_env, ns)[request.replica_id].metadata.name
            kube_env.bind(ns, name, "node-a")
            kube_env.set_running(ns, name)
            kube_env.set_succeeded(ns, name)
        ended = await asyncio.gather(*(runtime.wait(r.replica_id, 10) for r in requests))
        assert {s.phase for s in ended} == {ReplicaPhase.SUCCEEDED}
        await _forget_all(runtime, requests)
        assert _empty(kube_env, ns)
        # The API server's reason: the verb, the resource and the namespace.
        await _unavailable(refused, rf'cannot list pods.*cannot list resource "pods".* "{ns}-other" \(HTTP 403\)')
    finally:
        runtime.close()
        refused.close()
