"""The kubernetes runtime's pure parts: quantities, names, and a replica's
status read from a Pod (as the client deserializes it), without an API server."""
from __future__ import annotations

import re

import pytest
from kubernetes import client

from services.common.runtime.base import Amount, ReplicaPhase, ReplicaRequest
from services.common.runtime.kube_objects import (
    GPU,
    PodVolumes,
    amount_of,
    names,
    object_name,
    pod_body,
    pod_status,
    quantity,
    secret_body,
    secret_name,
)

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@pytest.mark.parametrize("text, value", [("500m", 0.5), ("2", 2), ("2Gi", 2 << 30), ("1e3", 1000),
                                         ("100M", 10 ** 8), ("1.5Ki", 1536), (None, 0)])
def test_quantities(text, value):
    assert quantity(text) == value


def test_a_bad_quantity_is_refused():
    with pytest.raises(ValueError):
        quantity("two")


def test_allocatable_becomes_an_amount():
    assert amount_of({"cpu": "3500m", "memory": "16Gi", GPU: "2", "pods": "110"}) == Amount(3500, 16 << 30, 2)


def test_names_are_dns_labels_and_distinct_per_group_and_attempt():
    group = "jobs.team-a." + "very-long-job-name-" * 5 + ".0123456789abcdef0123456789abcdef"
    svc, host, pod = names(group, "evaluator", 0, group + ".a1.evaluator-0")
    for name in (svc, host, pod):
        assert DNS_LABEL.fullmatch(name) and len(name) <= 63, name
    assert host.startswith(svc) and pod.startswith(host)
    assert names(group, "evaluator", 0, group + ".a2.evaluator-0")[2] != pod
    assert object_name("jobs.a.b.1") != object_name("jobs.a-b.1")  # the hash tells them apart


def _pod(phase="Pending", container=None, reason=None, message=None, conditions=None) -> client.V1Pod:
    statuses = [client.V1ContainerStatus(name="replica", image="i", image_id="", ready=False, restart_count=0,
                                         state=client.V1ContainerState(**container))] if container else None
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", annotations={"cloudml.io/replica-id": "jobs.t.j.1.a1.worker-0",
                                                            "cloudml.io/group": "jobs.t.j.1"}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="replica")], node_name="n"),
        status=client.V1PodStatus(phase=phase, reason=reason, message=message, container_statuses=statuses,
                                  conditions=conditions))


def _terminated(code, reason):
    return {"terminated": client.V1ContainerStateTerminated(exit_code=code, reason=reason)}


def test_pod_phases_map_to_replica_phases():
    pending = pod_status(_pod(conditions=[client.V1PodCondition(
        type="PodScheduled", status="False", reason="Unschedulable", message="0/2 nodes are available")]))
    assert pending.phase == ReplicaPhase.RUNNING
    assert pending.message == "Pending: Unschedulable: 0/2 nodes are available"
    assert pending.replica_id == "jobs.t.j.1.a1.worker-0" and pending.group == "jobs.t.j.1"
    done = pod_status(_pod("Succeeded", _terminated(0, "Completed")))
    assert (done.phase, done.exit_code, done.reason) == (ReplicaPhase.SUCCEEDED, 0, "Completed")
    failed = pod_status(_pod("Failed", _terminated(3, "Error")))
    assert (failed.phase, failed.exit_code, failed.reason) == (ReplicaPhase.FAILED, 3, "Error")
    oom = pod_status(_pod("Failed", _terminated(137, "OOMKilled")))
    assert (oom.phase, oom.exit_code, oom.reason) == (ReplicaPhase.FAILED, 137, "OOMKilled")
    evicted = pod_status(_pod("Failed", reason="Evicted", message="low on memory"))
    assert (evicted.phase, evicted.exit_code, evicted.reason) == (ReplicaPhase.FAILED, 137, "Evicted")
    lost = pod_status(_pod("Failed", reason="NodeLost", message="node gone"))
    assert lost.reason == "Lost"
    stopped = pod_status(_pod("Failed", _terminated(143, "Error")), stopping=True)
    assert (stopped.reason, stopped.exit_code) == ("Killed", 143)
    bad_image = pod_status(_pod(container={"waiting": client.V1ContainerStateWaiting(
        reason="InvalidImageName", message="bad")}))
    assert (bad_image.phase, bad_image.message) == (ReplicaPhase.FAILED, "InvalidImageName: bad")


def test_the_pod_body_has_equal_requests_and_limits_and_no_token():
    request = ReplicaRequest("r", "g", ["python", "-m", "t"], {"A": "1"}, "/w", "/l", Amount(250, 1 << 30, 1),
                             tenant="t", role="worker", index=2)
    body = pod_body(request, "ns", "img:1", 1000, "svc", "uid", "svc-worker-2", "svc-worker-2-abcde")
    [container] = body["spec"]["containers"]
    assert container["resources"]["requests"] == container["resources"]["limits"] == {
        "cpu": "250m", "memory": str(1 << 30), GPU: "1"}
    assert body["spec"]["automountServiceAccountToken"] is False and body["spec"]["restartPolicy"] == "Never"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert body["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000}
    assert {"name": "A", "value": "1"} in container["env"]
    assert not any(e["name"] == "CUDA_VISIBLE_DEVICES" for e in container["env"])  # it has a GPU


def test_a_pod_mounts_only_its_own_tenants_directories_of_the_volumes():
    request = ReplicaRequest("r", "g", ["python"], {"A": "1"}, "/w", "/l", tenant="team-a")
    volumes = PodVolumes(storage_claim="st", storage_root="/data/storage/", package_cache_claim="pk")
    body = pod_body(request, "ns", "img", 1000, "svc", "uid", "h", "p", volumes)
    [container] = body["spec"]["containers"]
    assert {m["name"]: (m["mountPath"], m.get("subPath")) for m in container["volumeMounts"]} == {
        "work": ("/w", None), "storage": ("/data/storage/team-a", "team-a"),
        "packages": ("/var/cache/cloudml/packages", "team-a")}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CLOUDML_PACKAGE_CACHE"] == "/var/cache/cloudml/packages" and env["A"] == "1"
    # No claims configured (or no tenant): the work directory only.
    plain = pod_body(request, "ns", "img", 1000, "svc", "uid", "h", "p")
    assert [v["name"] for v in plain["spec"]["volumes"]] == ["work"]
    anonymous = ReplicaRequest("r", "g", ["python"], {}, "/w", "/l")
    assert [v["name"] for v in pod_body(anonymous, "ns", "img", 1000, "svc", "uid", "h", "p", volumes)["spec"]["volumes"]] == ["work"]


def test_secret_env_goes_into_the_replicas_own_secret_never_the_pod_spec():
    request = ReplicaRequest("devenv.t.nb.0123abcd", "devenv.t.nb.0123abcd", ["python"], {"A": "1"}, "/w", "/l",
                             tenant="t", secret_env={"CLOUDML_JUPYTER_TOKEN": "s3cret-token"})
    body = pod_body(request, "ns", "img", 1000, "svc", "uid", "h", "p")
    name = secret_name(request.replica_id)
    assert DNS_LABEL.fullmatch(name) and body["metadata"]["annotations"]["cloudml.io/secret"] == name
    [container] = body["spec"]["containers"]
    assert {"name": "CLOUDML_JUPYTER_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": name, "key": "CLOUDML_JUPYTER_TOKEN"}}} in container["env"]
    assert "s3cret-token" not in repr(body)
    secret = secret_body(request, "svc", "uid")
    assert secret["metadata"]["name"] == name and secret["stringData"] == {"CLOUDML_JUPYTER_TOKEN": "s3cret-token"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid"
    assert secret["metadata"]["labels"]["cloudml.io/tenant"] == "t"
    # No secrets: no Secret, no annotation.
    plain = pod_body(ReplicaRequest("r", "g", ["python"], {}, "/w", "/l"), "ns", "img", 1000, "svc", "uid", "h", "p")
    assert "cloudml.io/secret" not in plain["metadata"]["annotations"]
