"""deploy/kubernetes: the kustomize base and overlays render with kubectl,
a fresh real kube-apiserver accepts them, and the kubernetes runtime works
with only the ServiceAccount token those manifests grant (the API server
enforces RBAC; the test plays the kubelet)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
import yaml

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from deploy.kubernetes.envtest import Kubelet, KubeEnv, find_binary
from services.common.runtime.kube_objects import SELECTOR
from tests.integration.jobs_stack import ROOT, MiB, JobsStack, build_packages, replica_spec, spec

MANIFESTS = os.path.join(ROOT, "deploy", "kubernetes")
NAMESPACE = "cloudml"
SERVICES = ("auth", "jobs", "tuner", "models", "gateway")


def kustomize(overlay: str) -> str:
    result = subprocess.run([find_binary("kubectl"), "kustomize", os.path.join(MANIFESTS, overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(text: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    env = KubeEnv(str(tmp_path_factory.mktemp("kube"))).start()
    yield env
    env.stop()


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/production"])
def test_every_overlay_renders_the_whole_platform(overlay):
    rendered = objects(kustomize(overlay))
    for kind, name in [("Namespace", NAMESPACE), ("ServiceAccount", "cloudml-runtime"), ("Role", "cloudml-runtime"),
                       ("RoleBinding", "cloudml-runtime"), ("ClusterRole", "cloudml-node-reader"),
                       ("StatefulSet", "etcd"), ("Service", "gateway"), ("NetworkPolicy", "default-deny-ingress"),
                       *(("Deployment", s) for s in SERVICES), *(("PodDisruptionBudget", s) for s in SERVICES)]:
        assert (kind, name) in rendered, (kind, name)
    assert all(d["metadata"].get("namespace") == NAMESPACE for (kind, _), d in rendered.items()
               if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"))
    ports = {p["name"]: p["port"] for p in rendered[("Service", "gateway")]["spec"]["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}


def test_production_runs_three_etcd_members_and_two_replicas_per_service():
    rendered = objects(kustomize("overlays/production"))
    etcd = rendered[("StatefulSet", "etcd")]["spec"]
    assert etcd["replicas"] == 3 and etcd["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for name in SERVICES:
        deployment = rendered[("Deployment", name)]["spec"]
        assert deployment["replicas"] == 2, name
        [container] = deployment["template"]["spec"]["containers"]
        assert container["image"] == "cloudml/platform:1.0.0"
        assert container["readinessProbe"]["exec"]["command"][:3] == ["python", "-m", "services.common.health_probe"]
        assert container["livenessProbe"]["exec"]["command"][-1] == "--live"
    assert rendered[("Service", "gateway")]["spec"]["type"] == "LoadBalancer"
    settings = rendered[("ConfigMap", "cloudml-settings")]["data"]
    assert settings["CLOUDML_TRAINER_IMAGE"] == "cloudml/trainer:1.0.0"
    # Only the runtime's services get a token; everything else runs with none.
    tokens = {n: d["spec"]["template"]["spec"]["automountServiceAccountToken"]
              for (k, n), d in rendered.items() if k == "Deployment"}
    assert tokens == {"auth": False, "jobs": True, "tuner": False, "models": True, "gateway": False}


def test_the_role_grants_only_pods_logs_services_secrets_and_network_policies_in_the_namespace():
    rendered = objects(kustomize("base"))
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
             for r in rendered[("Role", "cloudml-runtime")]["rules"]}
    assert rules == {(("",), ("pods",)): {"get", "list", "watch", "create", "delete"},
                     (("",), ("pods/log",)): {"get"},
                     (("",), ("services",)): {"get", "create", "delete"},
                     (("",), ("secrets",)): {"create", "delete"},
                     (("networking.k8s.io",), ("networkpolicies",)): {"create", "delete"}}
    [cluster_rule] = rendered[("ClusterRole", "cloudml-node-reader")]["rules"]
    assert (cluster_rule["resources"], set(cluster_rule["verbs"])) == (["nodes"], {"get", "list", "watch"})


def test_no_base_policy_opens_a_replicas_tf_port_to_other_replicas():
    """Only each group's own NetworkPolicy (made by the runtime) lets Pods of
    that group reach its TF port: the base lets no tenant workload in."""
    rendered = objects(kustomize("base"))
    policy = rendered[("NetworkPolicy", "replicas")]
    sources = [peer.get("podSelector", {}).get("matchLabels", {}) for rule in policy["spec"]["ingress"]
               for peer in rule.get("from", ())]
    assert {"app.kubernetes.io/managed-by": "cloudml"} not in sources, sources
    assert all(labels.get("app.kubernetes.io/component") in ("gateway", "jobs") for labels in sources), sources


def _apply(kube, text: str) -> subprocess.CompletedProcess:
    # PodDisruptionBudget is policy/v1 from Kubernetes 1.21 (and policy/v1beta1 is gone
    # from 1.25); this test's API server is 1.20, which serves the same fields as v1beta1.
    text = text.replace("apiVersion: policy/v1\n", "apiVersion: policy/v1beta1\n")
    return subprocess.run([find_binary("kubectl"), "--kubeconfig", kube.kubeconfig, "apply", "-f", "-"],
                          input=text, capture_output=True, text=True, timeout=120)


def test_apply_to_a_fresh_api_server_is_accepted(kube):
    text = kustomize("overlays/production")
    result = _apply(kube, text)
    assert result.returncode == 0, result.stderr
    created = [line for line in result.stdout.splitlines() if line.endswith(" created")]
    assert len(created) == len(objects(text)), result.stdout
    # Applying again changes nothing.
    again = _apply(kube, text)
    assert again.returncode == 0 and "created" not in again.stdout, again.stdout


def _service_account_dir(kube, path: str) -> str:
    """What a Pod of the jobs Deployment finds in /var/run/secrets/kubernetes.io/serviceaccount."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "token"), "w") as f:
        f.write(kube.service_account_token(NAMESPACE, "cloudml-runtime"))
    with open(os.path.join(path, "namespace"), "w") as f:
        f.write(NAMESPACE)
    with open(os.path.join(kube.base_dir, "certs", "apiserver.crt")) as src, \
            open(os.path.join(path, "ca.crt"), "w") as dst:
        dst.write(src.read())
    return path


def test_the_runtime_works_with_only_the_service_accounts_token(kube, tmp_path, monkeypatch):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    if _apply(kube, kustomize("base")).returncode:  # (already applied when the test above ran)
        pytest.fail("apply failed")
    account = _service_account_dir(kube, str(tmp_path / "serviceaccount"))
    kube.create_node("node-1", cpu="8", memory="32Gi")
    kubelet = Kubelet(kube, NAMESPACE, "node-1").start()
    # In-cluster credentials, exactly as a Pod of the jobs Deployment has them.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
    monkeypatch.setenv("CLOUDML_SERVICE_ACCOUNT_DIR", account)
    stack = JobsStack(str(tmp_path / "stack")).start()
    try:
        stack.start_jobs(extra=["--runtime", "kubernetes", "--image", "registry.example/trainer:2"])
        admin = stack.admin()
        uri = admin.upload(build_packages(str(tmp_path / "pkgs"))["plain"])
        admin.submit("rbac", spec(uri, "plain_trainer.task", "--steps 1", replicas=[
            replica_spec(pb.REPLICA_TYPE_MASTER, cpu=500, memory=256 * MiB),
            replica_spec(pb.REPLICA_TYPE_WORKER, cpu=500, memory=256 * MiB)]))
        job = admin.wait("rbac", states=(pb.JOB_STATE_RUNNING, pb.JOB_STATE_FAILED), timeout=120)
        assert job.state == pb.JOB_STATE_RUNNING, [(e.reason, e.message) for e in job.events]
        deadline = time.monotonic() + 60
        while True:
            pods = kube.core.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR).items
            if len(pods) == 2 and all(p.status.phase == "Running" for p in pods):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for pod in sorted(pods, key=lambda p: "-master-" in p.metadata.name):
            kube.set_succeeded(NAMESPACE, pod.metadata.name)
        job = admin.wait("rbac", timeout=60)
        assert job.state == pb.JOB_STATE_SUCCEEDED, [(e.reason, e.message) for e in job.events]
        deadline = time.monotonic() + 30
        networking = client.NetworkingV1Api(kube.api_client())
        while kube.core.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR).items or \
                kube.core.list_namespaced_service(NAMESPACE, label_selector=SELECTOR).items or \
                networking.list_namespaced_network_policy(NAMESPACE, label_selector=SELECTOR).items:
            assert time.monotonic() < deadline, "the job's Pods, Service or NetworkPolicy are left behind"
            time.sleep(0.2)
    finally:
        stack.stop()
        kubelet.halt()
    # ... and that token can do nothing else: RBAC is enforced.
    configuration = client.Configuration()
    configuration.host = kube.url
    configuration.ssl_ca_cert = os.path.join(account, "ca.crt")
    with open(os.path.join(account, "token")) as f:
        configuration.api_key = {"authorization": "Bearer " + f.read()}
    core = client.CoreV1Api(client.ApiClient(configuration))
    for call in (lambda: core.list_namespaced_secret(NAMESPACE),
                 lambda: core.list_namespaced_pod("default"),
                 lambda: core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "x"}}),
                 lambda: core.delete_node("node-1")):
        with pytest.raises(ApiException) as info:
            call()
        assert info.value.status == 403
