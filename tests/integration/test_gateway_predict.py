"""The gateway's Predict routing, as a real gateway process reading a real etcd
registry, in front of stand-in replicas (real gRPC servers that answer with
their own identity). The real model server behind the same gateway is
covered by the conformance suite; this file pins the routing rules: naming
and tenancy, versions, labels, traffic split, default version, balancing,
retry on a dead replica, and GetModelStatus. (Deadlines: test_gateway_deadlines.py.)"""
from __future__ import annotations

import collections
import json

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc
from deploy.local.stack import AuthGatewayStack
from tests.e2e.serving_platform import wait_until
from tests.integration.replicas import Replicas, replica_of, versions
from tests.integration.replicas import predict as predict_on

ADMIN = ("AKGWPREDICTADMIN0000", "admin-secret")
SERVICE = ("AKGWPREDICTSERVICE00", "service-secret")
AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE


@pytest.fixture(scope="module")
def env(tmp_path_factory, etcd_server):
    stack = AuthGatewayStack(tmp_path_factory.mktemp("gwp"), etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
    gateway, etcd, rest_port = stack.gateway, stack.etcd, stack.rest_port
    channel = grpc.insecure_channel(gateway.address)
    auth_stub = auth_grpc.AuthServiceStub(channel)
    admin_token = auth_stub.IssueToken(auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token
    admin_md = (("authorization", f"Bearer {admin_token}"),)
    tokens = {}
    for tenant in ("team-a", "team-b"):
        auth_stub.CreateTenant(auth_pb.CreateTenantRequest(name=tenant), metadata=admin_md)
        key = auth_stub.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant=tenant), metadata=admin_md)
        tokens[tenant] = auth_stub.IssueToken(auth_pb.IssueTokenRequest(
            access_key_id=key.access_key.access_key_id, secret_key=key.secret_key)).token
    replicas = Replicas(etcd)

    # team-a/linear: v1 (two replicas) and v2, labels, default 1.
    replicas.add("team-a", "linear", 1, "lin-1a")
    replicas.add("team-a", "linear", 1, "lin-1b")
    replicas.add("team-a", "linear", 2, "lin-2a")
    replicas.route(models_pb.ModelRoute(tenant="team-a", model="linear", default_version=1,
                                        labels={"stable": 1, "canary": 2, "ghost": 9},
                                        versions=versions((1, AVAILABLE), (2, AVAILABLE))))
    # team-a/public-model: public, one version.
    replicas.add("team-a", "shared", 3, "shared-3")
    replicas.route(models_pb.ModelRoute(tenant="team-a", model="shared", public=True,
                                        versions=versions((3, AVAILABLE))))
    # team-b/linear: same name in another tenant.
    replicas.add("team-b", "linear", 7, "b-lin-7")
    replicas.route(models_pb.ModelRoute(tenant="team-b", model="linear", versions=versions((7, AVAILABLE))))
    a = (("authorization", f"Bearer {tokens['team-a']}"),)
    wait_routed(channel, a, "linear", {"lin-1a", "lin-1b"}, version=1)
    wait_routed(channel, a, "linear", {"lin-2a"}, label="canary")  # the route's labels too
    wait_routed(channel, (), "team-a.shared", {"shared-3"})
    wait_routed(channel, (("authorization", f"Bearer {tokens['team-b']}"),), "linear", {"b-lin-7"})
    yield {"channel": channel, "replicas": replicas, "admin": admin_md, "rest": f"http://127.0.0.1:{rest_port}",
           "tokens": tokens,
           "a": (("authorization", f"Bearer {tokens['team-a']}"),),
           "b": (("authorization", f"Bearer {tokens['team-b']}"),)}
    channel.close()
    replicas.close()
    stack.stop()


def wait_routed(channel, metadata, name, replicas: set[str], version=None, label=None, timeout=10.0):
    """Calls `name` until every one of `replicas` has answered (the gateway's
    watch has caught up with their registration and the route)."""
    seen = set()

    def routed():
        seen.add(replica_of(predict_on(channel, metadata, name, version, label, timeout=2)))
        assert seen <= replicas, f"{name} answered by {seen - replicas}"
        return seen == replicas
    wait_until(routed, timeout, f"{name} (version {version}, label {label!r}) to reach {sorted(replicas)}",
               interval=0.02)


def predict(env, name, metadata, version=None, label=None, timeout=5):
    return predict_on(env["channel"], metadata, name, version, label, timeout)


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_plain_name_resolves_in_callers_tenant(env):
    assert replica_of(predict(env, "linear", env["a"])) in {"lin-1a", "lin-1b"}  # default version 1
    assert replica_of(predict(env, "linear", env["b"])) == "b-lin-7"


def test_response_echoes_model_spec(env):
    resp = predict(env, "linear", env["a"], version=2)
    assert resp.model_spec.name == "linear" and resp.model_spec.version.value == 2


def test_explicit_version_and_label(env):
    assert replica_of(predict(env, "linear", env["a"], version=2)) == "lin-2a"
    assert replica_of(predict(env, "linear", env["a"], label="canary")) == "lin-2a"
    assert replica_of(predict(env, "linear", env["a"], label="stable")) in {"lin-1a", "lin-1b"}


def test_unknown_version_is_not_found_with_tf_serving_message(env):
    code, details = code_of(lambda: predict(env, "linear", env["a"], version=5))
    assert code == grpc.StatusCode.NOT_FOUND
    # TF Serving's words, then where the name was looked up and what to run.
    assert details == ("Servable not found for request: Specific(linear, 5) (cloudml: version 5 of model 'linear' "
                       "in tenant 'team-a' is not serving; see `cloudml models describe linear`)")


def test_unknown_label_is_invalid_argument(env):
    code, details = code_of(lambda: predict(env, "linear", env["a"], label="nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "Unrecognized servable version label: nope"


def test_label_to_unavailable_version_is_not_found(env):
    code, _ = code_of(lambda: predict(env, "linear", env["a"], label="ghost"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unknown_model_is_not_found(env):
    code, details = code_of(lambda: predict(env, "nope", env["a"]))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == ("Servable not found for request: Latest(nope) (cloudml: no model 'nope' in tenant 'team-a' "
                       "that you may call; see `cloudml models list`)")


def test_other_tenants_private_model_looks_missing(env):
    code_b, details_b = code_of(lambda: predict(env, "team-a.linear", env["b"]))
    code_x, details_x = code_of(lambda: predict(env, "team-a.nothing", env["b"]))
    assert code_b == code_x == grpc.StatusCode.NOT_FOUND
    assert details_b.replace("linear", "X") == details_x.replace("nothing", "X")


def test_public_model_by_qualified_name_without_token_and_from_other_tenant(env):
    assert replica_of(predict(env, "team-a.shared", ())) == "shared-3"
    assert replica_of(predict(env, "team-a.shared", env["b"])) == "shared-3"


def test_no_token_and_plain_name_is_unauthenticated(env):
    code, _ = code_of(lambda: predict(env, "linear", ()))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_bad_token_is_unauthenticated_even_for_public_model(env):
    code, _ = code_of(lambda: predict(env, "team-a.shared", (("authorization", "Bearer x.y.z"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_admin_reaches_any_model_by_qualified_name(env):
    assert replica_of(predict(env, "team-b.linear", env["admin"])) == "b-lin-7"


def test_empty_model_spec_is_invalid_argument(env):
    code, _ = code_of(lambda: predict(env, "", env["a"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_requests_spread_over_replicas(env):
    seen = collections.Counter(replica_of(predict(env, "linear", env["a"], version=1)) for _ in range(40))
    assert set(seen) == {"lin-1a", "lin-1b"} and min(seen.values()) >= 5


def test_traffic_split_between_versions(env):
    r = env["replicas"]
    r.add("team-a", "split", 1, "s-1")
    r.add("team-a", "split", 2, "s-2")
    r.route(models_pb.ModelRoute(tenant="team-a", model="split",
                                 traffic_split=[models_pb.TrafficTarget(version=1, percent=90),
                                                models_pb.TrafficTarget(version=2, percent=10)],
                                 versions=versions((1, AVAILABLE), (2, AVAILABLE))))
    wait_routed(env["channel"], env["a"], "split", {"s-1"}, version=1)
    wait_routed(env["channel"], env["a"], "split", {"s-2"}, version=2)
    seen = collections.Counter(replica_of(predict(env, "split", env["a"])) for _ in range(300))
    assert 0.8 < seen["s-1"] / 300 < 0.97, seen
    assert replica_of(predict(env, "split", env["a"], version=2)) == "s-2"


def test_dead_replica_is_retried_on_another(env):
    r = env["replicas"]
    r.add("team-a", "failover", 1, "f-1")
    r.add("team-a", "failover", 1, "f-2")
    r.route(models_pb.ModelRoute(tenant="team-a", model="failover", versions=versions((1, AVAILABLE))))
    wait_routed(env["channel"], env["a"], "failover", {"f-1", "f-2"})
    r.kill("f-1")  # registration stays: the gateway still routes to it
    for _ in range(20):
        assert replica_of(predict(env, "failover", env["a"])) == "f-2"


def test_get_model_status_from_registry(env):
    stub = model_service_pb2_grpc.ModelServiceStub(env["channel"])
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "linear"
    resp = stub.GetModelStatus(req, metadata=env["a"])
    assert [(s.version, s.state) for s in resp.model_version_status] == [(1, 30), (2, 30)]
    req.model_spec.version.value = 2
    assert [s.version for s in stub.GetModelStatus(req, metadata=env["a"]).model_version_status] == [2]
    req.model_spec.version.value = 9
    code, details = code_of(lambda: stub.GetModelStatus(req, metadata=env["a"]))
    assert code == grpc.StatusCode.NOT_FOUND and details == "Could not find version 9 of model linear"
    req2 = get_model_status_pb2.GetModelStatusRequest()
    req2.model_spec.name = "nothing"
    code, details = code_of(lambda: stub.GetModelStatus(req2, metadata=env["a"]))
    assert code == grpc.StatusCode.NOT_FOUND and details == "Could not find any versions of model nothing"


def test_reload_config_is_unimplemented(env):
    from cloudml.tfs.tensorflow_serving.apis import model_management_pb2
    stub = model_service_pb2_grpc.ModelServiceStub(env["channel"])
    code, _ = code_of(lambda: stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(),
                                                             metadata=env["admin"]))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def rest(env, method, path, body=None, token=None):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(env["rest"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_rest_predict_row_and_columnar(env):
    token = env["tokens"]["team-a"]
    status, body = rest(env, "POST", "/v1/models/linear/versions/2:predict", {"instances": [1.0]}, token)
    assert status == 200 and body == {"predictions": ["lin-2a"]}
    status, body = rest(env, "POST", "/v1/models/linear/labels/canary:predict", {"inputs": {"x": [1.0]}}, token)
    assert status == 200 and body == {"outputs": ["lin-2a"]}


def test_rest_public_model_without_token(env):
    status, body = rest(env, "POST", "/v1/models/team-a.shared:predict", {"instances": [1.0]})
    assert status == 200 and body == {"predictions": ["shared-3"]}


def test_rest_errors_use_tf_serving_codes(env):
    token = env["tokens"]["team-a"]
    status, body = rest(env, "POST", "/v1/models/nope:predict", {"instances": [1.0]}, token)
    assert status == 404 and "Servable not found" in body["error"]
    status, body = rest(env, "POST", "/v1/models/linear/labels/nope:predict", {"instances": [1.0]}, token)
    assert status == 400 and "Unrecognized servable version label" in body["error"]
    status, body = rest(env, "POST", "/v1/models/linear/versions/x:predict", {"instances": [1.0]}, token)
    assert status == 400 and body["error"] == "Failed to convert version: x to numeric."
    status, body = rest(env, "POST", "/v1/models/linear:predict", {"instances": [1.0]})
    assert status == 401
    status, body = rest(env, "POST", "/v1/models/team-a.linear:predict", {"instances": [1.0]},
                        env["tokens"]["team-b"])
    assert status == 404
    status, body = rest(env, "POST", "/v1/models/linear:explode", {}, token)
    assert status == 404 and "error" in body


def test_rest_status_metadata_and_listing(env):
    token = env["tokens"]["team-a"]
    status, body = rest(env, "GET", "/v1/models/linear", token=token)
    assert status == 200
    assert [(v["version"], v["state"]) for v in body["model_version_status"]] == [("1", "AVAILABLE"), ("2", "AVAILABLE")]
    status, body = rest(env, "GET", "/v1/models/linear/versions/2/metadata", token=token)
    assert status == 200 and body["model_spec"]["version"] == "2"
    assert "serving_default" in body["metadata"]["signature_def"]["signature_def"]
    status, body = rest(env, "GET", "/v1/models", token=token)
    names = {m["name"] for m in body["models"]}
    assert {"linear", "shared"} <= names
    status, body = rest(env, "GET", "/v1/models", token=env["tokens"]["team-b"])
    assert {m["name"] for m in body["models"]} == {"linear"}
