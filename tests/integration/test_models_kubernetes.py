"""Model replicas on the kubernetes runtime, against a real kube-apiserver:
the models service (a real process, real auth and gateway around it) makes
a Pod of the model-server image with a readiness probe on its serving port;
the test plays the kubelet. A real model server (TensorFlow, half_plus_two)
listens on loopback where the Pod's IP and port say, standing in for the
container; the readiness probe module is run against it as the kubelet
would. A version is routable through the gateway exactly while its Pod is
Ready (written through the status subresource, kwok-style)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from cloudml.models.v1 import models_service_pb2 as pb
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc
from deploy.kubernetes.envtest import KubeEnv
from deploy.local import stack as harness
from deploy.local.etcd import free_port
from services.common.runtime.kube_objects import SELECTOR
from tests.integration.conftest import ADMIN_ACCESS_KEY, connect
from tests.integration.models_stack import ROOT, predict, wait_for

S = pb.ModelVersionState
AVAILABLE = S.MODEL_VERSION_STATE_AVAILABLE
IMAGE = "registry.example/cloudml/model-server:3"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, etcd_server, half_plus_two):
    workdir = str(tmp_path_factory.mktemp("models-kube"))
    kube = KubeEnv(os.path.join(workdir, "kube")).start()
    namespace = f"models-{uuid.uuid4().hex[:6]}"
    kube.create_namespace(namespace)
    kube.create_node("node-1", cpu="4", memory="16Gi")
    port = free_port()
    secret = uuid.uuid4().hex
    container = None
    stack = harness.Stack(workdir, etcd_endpoint=etcd_server.endpoint, admin=(ADMIN_ACCESS_KEY, secret),
                          service=None, lease_ttl=3, service_flags={"models": [
                              "--runtime", "kubernetes", "--kubeconfig", kube.kubeconfig, "--namespace", namespace,
                              "--model-image", IMAGE, "--storage-claim", "cloudml-storage",
                              "--replica-port", str(port), "--stop-grace", "2"]})
    try:
        stack.start()
        models = stack.start_service("models", "models", wait=90)
        gateway, _ = stack.start_gateway()
        auth = connect(stack.auth, secret)
        # The container's process: the model server the Pod would run, on loopback (the
        # Pod's IP here). Started now, since importing TensorFlow takes a while.
        with open(os.path.join(workdir, "container.log"), "wb") as log:
            container = subprocess.Popen([sys.executable, "-m", "services.models.model_server", "--model-name", "hp",
                                          "--version", "1", "--base-path", half_plus_two,
                                          "--listen", f"127.0.0.1:{port}", "--native-front", "off"],
                                         cwd=ROOT, stdout=log, stderr=log)
        with grpc.insecure_channel(models.address) as channel:
            yield {"kube": kube, "namespace": namespace, "port": port, "stack": stack, "auth": auth,
                   "gateway": gateway.address, "stub": pb_grpc.ModelsServiceStub(channel),
                   "saved_model": half_plus_two, "workdir": workdir}
        auth.channel.close()
    finally:
        if container is not None:
            container.terminate()
            container.wait(30)
        stack.stop()
        kube.stop()


def _pods(kube, namespace):
    return [p for p in kube.core.list_namespaced_pod(namespace, label_selector=SELECTOR).items
            if p.metadata.deletion_timestamp is None]


def _probe(port: int) -> int:
    """The Pod's readiness probe, as the kubelet runs it (exit code)."""
    return subprocess.run([sys.executable, "-m", "services.common.health_probe", str(port)], cwd=ROOT,
                          capture_output=True, timeout=30).returncode


# The stand-in container imports TensorFlow (~6 s idle; minutes on a loaded machine).
@pytest.mark.timeout(900)
def test_a_version_is_routable_exactly_while_its_pod_is_ready(setup):
    kube, namespace, port, stub = setup["kube"], setup["namespace"], setup["port"], setup["stub"]
    team = setup["auth"].new_tenant("mk")
    md = team.md
    path = os.path.join(setup["stack"].data_dir, "storage", team.tenant, "models", "hp", "1")
    shutil.copytree(setup["saved_model"], path)
    stub.CreateModel(pb.CreateModelRequest(name="hp"), metadata=md, timeout=10)
    stub.CreateVersion(pb.CreateVersionRequest(model="hp", model_version=pb.ModelVersion(
        version=1, model_uri="file://" + path, resources={"cpu_millis": 500, "memory_bytes": 1 << 30})),
        metadata=md, timeout=10)

    [pod] = wait_for(lambda: _pods(kube, namespace), 30, "the replica's Pod")
    [container] = pod.spec.containers
    assert container.image == IMAGE
    assert container.command[:3] == ["python", "-m", "services.models.model_server"]
    assert container.command[container.command.index("--listen") + 1] == f"0.0.0.0:{port}"
    assert container.command[container.command.index("--base-path") + 1] == path
    assert [p.container_port for p in container.ports] == [port]
    assert container.readiness_probe._exec.command == ["python", "-m", "services.common.health_probe", str(port)]
    assert container.resources.limits == {"cpu": "500m", "memory": str(1 << 30)}
    mounts = {m.name: (m.mount_path, m.sub_path) for m in container.volume_mounts}
    assert mounts["storage"] == (os.path.dirname(os.path.dirname(os.path.dirname(path))), team.tenant)
    assert pod.metadata.labels["cloudml.io/tenant"] == team.tenant

    kube.bind(namespace, pod.metadata.name, "node-1")
    kube.set_running(namespace, pod.metadata.name, pod_ip="127.0.0.1", ready=False)

    def version():
        return stub.GetVersion(pb.GetVersionRequest(model="hp", version=1), metadata=md,
                               timeout=10).model_version

    def answer():
        try:
            return predict(setup["gateway"], "hp", 3.0, metadata=md)
        except grpc.RpcError as err:
            return err.code()

    time.sleep(1.0)
    assert version().state != AVAILABLE
    assert answer() != pytest.approx(3.5)

    wait_for(lambda: _probe(port) == 0, 480, "the model server's health SERVING (the probe passes)")
    kube.set_running(namespace, pod.metadata.name, pod_ip="127.0.0.1", ready=True)
    ready = wait_for(lambda: (v := version()).state == AVAILABLE and v, 20, "the version AVAILABLE")
    assert [r.address for r in ready.replicas] == [f"127.0.0.1:{port}"]
    assert wait_for(lambda: answer() == pytest.approx(3.5), 20, "Predict through the gateway")

    # The probe fails (the kubelet marks the Pod not Ready): no longer routed.
    kube.set_running(namespace, pod.metadata.name, pod_ip="127.0.0.1", ready=False)
    wait_for(lambda: answer() != pytest.approx(3.5), 20, "Predict refused while the Pod is not Ready")
    # The endpoint is withdrawn first; the version's state follows on the reconciler's pass.
    wait_for(lambda: version().state != AVAILABLE, 20, "the version no longer AVAILABLE")
    # Ready again: routed again.
    kube.set_running(namespace, pod.metadata.name, pod_ip="127.0.0.1", ready=True)
    assert wait_for(lambda: answer() == pytest.approx(3.5), 20, "Predict routed again")

    # Deleting the version removes its Pod and Service (the test confirms the kubelet's part).
    stub.DeleteVersion(pb.DeleteVersionRequest(model="hp", version=1), metadata=md, timeout=10)

    def nothing_left():
        kube.finish_deletions(namespace)
        return not kube.core.list_namespaced_pod(namespace).items and \
            not kube.core.list_namespaced_service(namespace).items

    wait_for(nothing_left, 30, "the version's Pod and Service deleted")
