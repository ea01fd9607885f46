"""`cloudml-platform up --runtime kubernetes`: the launcher hands the runtime
settings to the services, and a job submitted with the CLI becomes Pods in
the namespace of a real kube-apiserver (the test plays the kubelet)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from deploy.kubernetes.envtest import Kubelet, KubeEnv
from deploy.local.etcd import free_port
from services.common.runtime.kube_objects import SELECTOR
from tests.integration.jobs_stack import build_packages

pytestmark = [pytest.mark.slow, pytest.mark.needs_local_platform]

LAUNCHER = [sys.executable, "-m", "deploy.local.launcher"]
CLI = [sys.executable, "-m", "cloudml"]


def _run(argv, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    env = KubeEnv(str(tmp_path_factory.mktemp("kube"))).start()
    namespace = f"platform-{uuid.uuid4().hex[:6]}"
    env.create_namespace(namespace)
    env.create_node("node-1", cpu="8", memory="32Gi")
    kubelet = Kubelet(env, namespace, "node-1").start()
    yield env, namespace
    kubelet.halt()
    env.stop()


def test_runtime_flags_without_runtime_kubernetes_are_refused(tmp_path):
    result = _run([*LAUNCHER, "up", "--data-dir", str(tmp_path / "p"), "--namespace", "ns"])
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --namespace need --runtime kubernetes"
    result = _run([*LAUNCHER, "up", "--data-dir", str(tmp_path / "p"), "--runtime", "kubernetes",
                   "--kubeconfig", str(tmp_path / "missing")])
    assert result.returncode == 1 and "no such file" in result.stderr
    assert not os.path.exists(tmp_path / "p" / "run" / "state.json"), "nothing is started"


def test_up_runtime_kubernetes_runs_a_submitted_job_as_pods(tmp_path, kube):
    env, namespace = kube
    data_dir = str(tmp_path / "platform")
    grpc_port, rest_port = free_port(), free_port()
    up = _run([*LAUNCHER, "up", "--data-dir", data_dir, "--grpc-port", str(grpc_port), "--rest-port", str(rest_port),
               "--detach", "--runtime", "kubernetes", "--kubeconfig", env.kubeconfig, "--namespace", namespace,
               "--image", "registry.example/trainer:7"])
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        with open(os.path.join(data_dir, "platform.json")) as f:
            saved = json.load(f)["runtime"]
        assert saved == {"kind": "kubernetes", "kubeconfig": env.kubeconfig, "namespace": namespace,
                         "image": "registry.example/trainer:7"}
        built = build_packages(str(tmp_path / "pkgs"))
        cli_env = {"CLOUDML_CONFIG": os.path.join(data_dir, "credentials.json")}
        submit = _run([*CLI, "jobs", "submit", "-n", "onkube", "-m", "plain_trainer.task", "-u", built["plain"],
                       "-c", "0.5", "-M", "256Mi"], env=cli_env)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        deadline = time.monotonic() + 90
        while True:
            pods = env.core.list_namespaced_pod(namespace, label_selector=SELECTOR).items
            if pods and pods[0].status.phase == "Running":
                break
            assert time.monotonic() < deadline, "no Pod of the job runs"
            time.sleep(0.2)
        [pod] = pods
        assert pod.spec.containers[0].image == "registry.example/trainer:7"
        assert pod.metadata.labels["cloudml.io/tenant"] == "admin"
        env.set_succeeded(namespace, pod.metadata.name)
        deadline = time.monotonic() + 60
        while True:
            described = _run([*CLI, "jobs", "describe", "onkube", "-o", "json"], env=cli_env)
            state = json.loads(described.stdout).get("state", "") if described.returncode == 0 else ""
            if state.endswith("SUCCEEDED"):
                break
            assert time.monotonic() < deadline, described.stdout + described.stderr
            time.sleep(0.3)
    finally:
        down = _run([*LAUNCHER, "down", "--data-dir", data_dir])
        assert down.returncode == 0, down.stderr
