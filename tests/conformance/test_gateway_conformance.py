"""The gateway against TF Serving's behaviour, end to end, with the stock client.

One platform (`cloudml-platform up --detach`) for the module. TF Serving's
`half_plus_two` test model (tests/conformance/half_plus_two.py) is deployed as
version 123 through the models API (`cloudml models create ... --replicas 1
--wait`), then called THROUGH THE GATEWAY:

- over gRPC with the official `tensorflow_serving.apis` PredictionServiceStub
  and ModelServiceStub, unmodified, plus `authorization: Bearer <token>`
  metadata;
- over REST with plain HTTP requests, as curl would send them.

The expected codes and messages are TF Serving's (the ones
tests/conformance/test_model_server.py asserts against a replica directly:
the gateway must answer exactly the same), and TF Serving's HTTP mapping of
them for REST (INVALID_ARGUMENT and FAILED_PRECONDITION 400, NOT_FOUND 404,
UNIMPLEMENTED 501, ...).

Tenancy: a model named plainly resolves in the caller's tenant; a public
model is called without a token as `<tenant>.<model>`; another tenant's
private model is NOT_FOUND, exactly like a missing one.

The pytest process never imports TensorFlow or `tensorflow_serving` (other
modules import the project's own copies, `cloudml.tfs`, which define the same
protobuf symbols): the stock client runs in a helper process, this file
started as `python test_gateway_conformance.py --probe`, which reads JSON
commands on stdin and answers each with one JSON line (the pattern of
test_model_server.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# TF Serving's name for it; model names may hold "_" (not ".", which separates
# "<tenant>.<model>").
MODEL = "half_plus_two"
VERSION = 123
PUBLIC_TENANT = "team-pub"
PUBLIC_MODEL = "shared"

# ======================================================================================
# The probe (runs in its own process; imports TensorFlow and the stock client).
# ======================================================================================


def _build(cmd):  # pragma: no cover - runs in the helper process
    import half_plus_two

    return {"path": half_plus_two.build_half_plus_two(cmd["dir"], cmd["version"])}


if __name__ == "__main__" and "--probe" in sys.argv:
    sys.path[:0] = [ROOT, HERE]
    from tests.conformance.stock_client import serve

    serve({"build": _build})
    sys.exit(0)

# ======================================================================================
# The tests (pytest process: no TensorFlow).
# ======================================================================================

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from tests.conformance.stock_client import Probe, assert_error, examples, tfs_text, x_tensor  # noqa: E402
from tests.e2e.serving_platform import CLOUDML_CLI, PlatformClient, clean_env, wait_until  # noqa: E402

pytestmark = pytest.mark.slow


@dataclass
class Deployment:
    platform: PlatformClient
    probe: Probe
    admin_token: str
    public_config: str   # PUBLIC_TENANT's credentials (owner of the public model)
    public_token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory, serving_platform):
    workdir = tmp_path_factory.mktemp("gateway_conformance")
    platform = serving_platform(str(workdir / "data")).start()
    probe = None
    try:
        # The probe imports TensorFlow and builds the model while the platform starts.
        probe = Probe(__file__, str(workdir / "probe.log"), env=clean_env(PYTHONPATH=ROOT), cwd=ROOT)
        path = probe.send(cmd="build", dir=str(workdir / "models"), version=VERSION)["path"]
        platform.wait_up()
        public_config = platform.new_tenant(PUBLIC_TENANT)
        # Both models load side by side: the private one in the admin tenant,
        # the public one in another tenant, each from a local directory the CLI uploads.
        procs = [
            subprocess.Popen([*CLOUDML_CLI, "models", "create", "-n", MODEL, "-v", str(VERSION), "-u", path,
                              "--replicas", "1", "--wait", "--timeout", "180", "-o", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=clean_env(CLOUDML_CONFIG=platform.credentials_path)),
            subprocess.Popen([*CLOUDML_CLI, "models", "create", "-n", PUBLIC_MODEL, "-v", "v1", "-u", path,
                              "--public", "--wait", "--timeout", "180", "-o", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=clean_env(CLOUDML_CONFIG=public_config)),
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, out + err
            created = json.loads(out)
            assert created["model_version"]["state"] == "MODEL_VERSION_STATE_AVAILABLE", created
        platform.cli("models", "label", MODEL, "stable", str(VERSION))
        yield Deployment(platform, probe, platform.token(), public_config, platform.token(public_config))
    finally:
        if probe is not None:
            probe.close()
        platform.down()


# --- helpers ---------------------------------------------------------------------------------


def spec(name=MODEL, **fields):
    return {"name": name, **fields}





@pytest.fixture(scope="module")
def call(env):
    """call(method, request, tensors=..., examples=..., token=...) through the gateway's
    gRPC port with the stock client (token: the admin's by default, None for none)."""

    def _call(method, request=None, *, token="admin", **extra):
        if token == "admin":
            token = env.admin_token
        metadata = [["authorization", f"Bearer {token}"]] if token else []
        return env.probe.send(cmd="call", address=env.platform.endpoint, method=method, request=request or {},
                              metadata=metadata, **extra)

    return _call


@pytest.fixture(scope="module")
def python_rest(env):
    """A second gateway on the platform whose Python process serves REST (`--dataplane-rest off`)."""
    gateway, endpoint = env.platform.start_gateway_copy("gateway-python-rest", "--dataplane-rest", "off")
    yield endpoint
    gateway.stop()


@pytest.fixture(scope="module", params=["native", "python"])
def rest(request, env):
    """rest(method, path, body=None, token=...) -> (HTTP status, JSON) on a gateway's REST port:
    `native` (the platform's gateway: its data plane owns the port; each call is
    sent twice, the first relayed to the Python gateway, the repeat converted in
    C++ when the codec takes it, and both answers must agree) or `python`
    (a gateway whose Python process serves REST, as TF Serving's cases run
    unchanged against both paths)."""
    endpoint = env.platform.rest_endpoint if request.param == "native" else request.getfixturevalue("python_rest")

    def _rest(method, path, body=None, *, token="admin"):
        if token == "admin":
            token = env.admin_token
        answer = env.platform.rest(method, path, body, token=token, endpoint=endpoint)
        if request.param == "native":
            again = env.platform.rest(method, path, body, token=token, endpoint=endpoint)
            assert again == answer, (method, path, answer, again)
        return answer

    return _rest


# --- gRPC: Predict ---------------------------------------------------------------------------


def test_predict_default_signature(call):
    r = call("Predict", {"modelSpec": spec()}, tensors=x_tensor([[1.0], [2.0], [5.0]]))
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[2.5], [3.0], [4.5]]}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": str(VERSION), "signatureName": "serving_default"}


def test_predict_with_output_filter_and_explicit_version(call):
    r = call("Predict", {"modelSpec": spec(version=VERSION, signatureName="serving_default"), "outputFilter": ["y"]},
             tensors=x_tensor([[2.0]]))
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[3.0]]}
    assert r["response"]["modelSpec"]["version"] == str(VERSION)


def test_predict_output_filter_unknown_alias(call):
    r = call("Predict", {"modelSpec": spec(), "outputFilter": ["z"]}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT",
                 "output tensor alias not found in signature: z Outputs expected to be in the set {y}.")


def test_predict_other_signatures(call):
    r = call("Predict", {"modelSpec": spec(signatureName="regress_x2_to_y3")},
             tensors={"inputs": {"value": [[2.0]], "dtype": "float32"}})
    assert r["code"] == "OK", r
    assert r["arrays"] == {"outputs": [[4.0]]}
    assert r["response"]["modelSpec"]["signatureName"] == "regress_x2_to_y3"
    r = call("Predict", {"modelSpec": spec(signatureName="classify_x_to_y")}, examples={"inputs": [{"x": 2.0}]})
    assert r["arrays"] == {"scores": [[3.0]]}


# --- gRPC: Classify, Regress, MultiInference ---------------------------------------------------


def test_classify(call):
    r = call("Classify", {"modelSpec": spec(signatureName="classify_x_to_y"),
                          "input": examples({"x": 2.0}, {"x": 4.0})})
    assert r["code"] == "OK", r
    assert r["response"]["result"] == {"classifications": [{"classes": [{"score": 3.0}]},
                                                           {"classes": [{"score": 4.0}]}]}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": str(VERSION), "signatureName": "classify_x_to_y"}


@pytest.mark.parametrize("signature, expected", [("regress_x_to_y", 3.0), ("regress_x_to_y2", 4.0)])
def test_regress(call, signature, expected):
    r = call("Regress", {"modelSpec": spec(signatureName=signature), "input": examples({"x": 2.0})})
    assert r["code"] == "OK", r
    assert r["response"]["result"] == {"regressions": [{"value": expected}]}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": str(VERSION), "signatureName": signature}


def task(signature, method, name=MODEL):
    return {"modelSpec": spec(name, signatureName=signature), "methodName": f"tensorflow/serving/{method}"}


def test_multi_inference(call):
    r = call("MultiInference", {"tasks": [task("regress_x_to_y", "regress"), task("classify_x_to_y", "classify")],
                                "input": examples({"x": 2.0})})
    assert r["code"] == "OK", r
    results = r["response"]["results"]
    assert results[0]["regressionResult"] == {"regressions": [{"value": 3.0}]}
    assert results[1]["classificationResult"] == {"classifications": [{"classes": [{"score": 3.0}]}]}
    assert results[0]["modelSpec"] == {"name": MODEL, "version": str(VERSION), "signatureName": "regress_x_to_y"}
    assert results[1]["modelSpec"] == {"name": MODEL, "version": str(VERSION), "signatureName": "classify_x_to_y"}


# --- gRPC: metadata and status -------------------------------------------------------------------


def test_get_model_metadata(call):
    r = call("GetModelMetadata", {"modelSpec": spec(), "metadataField": ["signature_def"]})
    assert r["code"] == "OK", r
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": str(VERSION)}
    any_value = r["response"]["metadata"]["signature_def"]
    assert any_value["@type"] == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sigs = any_value["signatureDef"]
    assert sorted(sigs) == ["classify_x2_to_y3", "classify_x_to_y", "regress_x2_to_y3", "regress_x_to_y",
                            "regress_x_to_y2", "serving_default"]
    assert sigs["serving_default"]["methodName"] == "tensorflow/serving/predict"
    assert sigs["serving_default"]["inputs"]["x"] == {"name": "x:0", "dtype": "DT_FLOAT",
                                                      "tensorShape": {"dim": [{"size": "-1"}, {"size": "1"}]}}


def test_get_model_status(call):
    for request in ({"modelSpec": spec()}, {"modelSpec": spec(version=VERSION)},
                    {"modelSpec": spec(versionLabel="stable")}):
        r = call("GetModelStatus", request)
        assert r["code"] == "OK", (request, r)
        assert r["response"] == {"model_version_status": [{"version": str(VERSION), "state": "AVAILABLE",
                                                         "status": {}}]}, r


# --- gRPC: labels ------------------------------------------------------------------------------


def test_predict_by_label(call):
    r = call("Predict", {"modelSpec": spec(versionLabel="stable")}, tensors=x_tensor([[4.0]]))
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[4.0]]}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": str(VERSION), "signatureName": "serving_default"}


def test_label_set_with_the_models_api_routes_grpc_and_rest(env, call, rest):
    from cloudml import serving
    from cloudml.models.v1 import models_service_pb2 as models_pb

    client = env.platform.client()
    model = client.call(serving.models_stub(client).SetLabel,
                        models_pb.SetLabelRequest(model=MODEL, label="canary", version=VERSION)).model
    assert model.labels["canary"] == VERSION
    # The gateway learns it from the registry it watches (a moment later).
    r = wait_until(lambda: (lambda r: r if r["code"] == "OK" else None)(
        call("Predict", {"modelSpec": spec(versionLabel="canary")}, tensors=x_tensor([[6.0]]))), 10, "label canary")
    assert r["arrays"] == {"y": [[5.0]]} and r["response"]["modelSpec"]["version"] == str(VERSION)
    # Each gateway watches the registry itself: the REST one may see the label a moment later.
    answer = wait_until(lambda: (lambda a: a if a[0] == 200 else None)(
        rest("POST", f"/v1/models/{MODEL}/labels/canary:predict", {"instances": [[6.0]]})), 10, "REST label")
    assert answer == (200, {"predictions": [[5.0]]})
    client.call(serving.models_stub(client).DeleteLabel, models_pb.DeleteLabelRequest(model=MODEL, label="canary"))
    wait_until(lambda: call("Predict", {"modelSpec": spec(versionLabel="canary")},
                            tensors=x_tensor([[6.0]]))["code"] == "INVALID_ARGUMENT", 10, "label canary gone")
    answer = wait_until(lambda: (lambda a: a if a[0] == 400 else None)(
        rest("POST", f"/v1/models/{MODEL}/labels/canary:predict", {"instances": [[6.0]]})), 10, "REST label gone")
    assert answer == (400, {"error": "Unrecognized servable version label: canary"})


# --- gRPC: errors, with TF Serving's codes and messages ----------------------------------------------


def test_predict_unknown_model(call):
    r = call("Predict", {"modelSpec": {"name": "unknown"}}, tensors=x_tensor([[1.0]]))
    assert_error(r, "NOT_FOUND", "Servable not found for request: Latest(unknown)")
    # After TF Serving's words, the gateway names the tenant the name was looked up in.
    assert r["details"] == ("Servable not found for request: Latest(unknown) (cloudml: no model 'unknown' in "
                            "tenant 'admin' that you may call; see `cloudml models list`)"), r


def test_rest_unknown_model_and_version_name_the_tenant(rest):
    status, body = rest("POST", "/v1/models/unknown:predict", {"instances": [[1.0]]})
    assert status == 404 and body == {"error": "Servable not found for request: Latest(unknown) (cloudml: no model "
                                               "'unknown' in tenant 'admin' that you may call; see `cloudml models "
                                               "list`)"}, body
    status, body = rest("POST", f"/v1/models/{MODEL}/versions/999:predict", {"instances": [[1.0]]})
    assert status == 404 and body["error"].endswith(
        f"(cloudml: version 999 of model '{MODEL}' in tenant 'admin' is not serving; see "
        f"`cloudml models describe {MODEL}`)"), body


def test_predict_unknown_version(call):
    r = call("Predict", {"modelSpec": spec(version=999)}, tensors=x_tensor([[1.0]]))
    assert_error(r, "NOT_FOUND", f"Servable not found for request: Specific({MODEL}, 999)")


def test_predict_unknown_label(call):
    r = call("Predict", {"modelSpec": spec(versionLabel="nope")}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT", "Unrecognized servable version label: nope")


def test_predict_unknown_signature(call):
    r = call("Predict", {"modelSpec": spec(signatureName="nope")}, tensors=x_tensor([[1.0]]))
    assert_error(r, "FAILED_PRECONDITION", 'Serving signature key "nope" not found.')


def test_predict_bad_input_name(call):
    r = call("Predict", {"modelSpec": spec()}, tensors={"z": {"value": [[1.0]], "dtype": "float32"}})
    assert_error(r, "INVALID_ARGUMENT",
                 "Signature input alias: x(feed name: x:0) not found in request and no default value provided. "
                 "Inputs expected to be in the request {z}, or default input alias set: ")


def test_predict_bad_dtype(call):
    r = call("Predict", {"modelSpec": spec()}, tensors=x_tensor([["a"]], "string"))
    assert_error(r, "INVALID_ARGUMENT", "Expects arg[0] to be float but string is provided")
    r = call("Predict", {"modelSpec": spec()}, tensors=x_tensor([[1]], "int32"))
    assert_error(r, "INVALID_ARGUMENT", "Expects arg[0] to be float but int32 is provided")


def test_predict_empty_request(call):
    r = call("Predict", {"modelSpec": spec()})
    assert_error(r, "INVALID_ARGUMENT",
                 "input size does not match signature: 0!=1 len({}) != len({x}). Sent extra: {}. "
                 "Missing but required: {x}.")


def test_predict_missing_model_spec(call):
    assert_error(call("Predict", {}, tensors=x_tensor([[1.0]])), "INVALID_ARGUMENT", "Missing ModelSpec")


def test_predict_model_spec_without_a_name(call):
    r = call("Predict", {"modelSpec": {"signatureName": "serving_default"}}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT", "ModelSpec has no name specified.")


@pytest.mark.parametrize("method, request_, code, details", [
    ("Classify", {"modelSpec": spec(signatureName="nope"), "input": examples({"x": 2.0})},
     "INVALID_ARGUMENT", "No signature was found with the name: nope"),
    ("Classify", {"modelSpec": spec(signatureName="classify_x_to_y")}, "INVALID_ARGUMENT", "Input is empty."),
    ("Classify", {"modelSpec": {"name": "nope", "signatureName": "classify_x_to_y"}, "input": examples({"x": 2.0})},
     "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    ("Regress", {"modelSpec": spec(signatureName="nope"), "input": examples({"x": 2.0})},
     "INVALID_ARGUMENT", "No signature was found with the name: nope"),
    ("Regress", {"modelSpec": spec(signatureName="regress_x_to_y", version=7), "input": examples({"x": 2.0})},
     "NOT_FOUND", f"Servable not found for request: Specific({MODEL}, 7)"),
    ("MultiInference", {"tasks": [task("regress_x_to_y", "regress"), task("regress_x_to_y", "regress")],
                        "input": examples({"x": 2.0})},
     "INVALID_ARGUMENT", "Duplicate evaluation of signature: regress_x_to_y"),
    ("MultiInference", {"tasks": [task("regress_x_to_y", "regress"), task("regress_x_to_y2", "regress", "other")],
                        "input": examples({"x": 2.0})},
     "INVALID_ARGUMENT", "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    ("MultiInference", {"tasks": [task("regress_x_to_y", "regress", "other")], "input": examples({"x": 2.0})},
     "NOT_FOUND", "Servable not found for request: Latest(other)"),
    ("MultiInference", {"tasks": [task("regress_x_to_y", "regress")]}, "INVALID_ARGUMENT", "Input is empty."),
    ("GetModelMetadata", {"modelSpec": spec()}, "INVALID_ARGUMENT",
     "GetModelMetadataRequest must specify at least one metadata_field"),
    ("GetModelMetadata", {"modelSpec": {"name": "nope"}, "metadataField": ["signature_def"]},
     "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    ("GetModelStatus", {"modelSpec": spec(version=7)}, "NOT_FOUND", f"Could not find version 7 of model {MODEL}"),
    ("GetModelStatus", {"modelSpec": {"name": "nope"}}, "NOT_FOUND", "Could not find any versions of model nope"),
    ("GetModelStatus", {}, "INVALID_ARGUMENT", "Missing ModelSpec"),
    ("HandleReloadConfigRequest", {}, "UNIMPLEMENTED", None),
], ids=lambda v: v if isinstance(v, str) and v.isupper() else None)
def test_other_api_errors(call, method, request_, code, details):
    assert_error(call(method, request_), code, details)


def test_get_model_status_with_a_nameless_model_spec(call):
    # TF Serving (get_model_status_impl.cc): "Missing ModelSpec" only when the
    # field is absent; a present one without a name finds no versions.
    r = call("GetModelStatus", {"modelSpec": {}})
    assert_error(r, "NOT_FOUND", "Could not find any versions of model ")


def test_multi_inference_without_tasks(call):
    r = call("MultiInference", {"tasks": [], "input": examples({"x": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", "ModelSpec has no name specified.")


# --- REST ---------------------------------------------------------------------------------------------


def test_rest_predict_row_and_columnar(rest):
    assert rest("POST", f"/v1/models/{MODEL}:predict", {"instances": [1.0, 2.0, 5.0]}) == (
        200, {"predictions": [2.5, 3.0, 4.5]})
    assert rest("POST", f"/v1/models/{MODEL}/versions/{VERSION}:predict",
                {"signature_name": "serving_default", "instances": [[1.0], [2.0]]}) == (
        200, {"predictions": [[2.5], [3.0]]})
    assert rest("POST", f"/v1/models/{MODEL}:predict", {"inputs": {"x": [[1.0], [2.0]]}}) == (
        200, {"outputs": [[2.5], [3.0]]})
    assert rest("POST", f"/v1/models/{MODEL}:predict", {"inputs": [[4.0]]}) == (200, {"outputs": [[4.0]]})


def test_rest_predict_by_label(rest):
    assert rest("POST", f"/v1/models/{MODEL}/labels/stable:predict", {"instances": [[2.0]]}) == (
        200, {"predictions": [[3.0]]})


def test_rest_classify_and_regress(rest):
    status, body = rest("POST", f"/v1/models/{MODEL}:classify",
                        {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}, {"x": 4.0}]})
    assert (status, body) == (200, {"results": [[["", 3.0]], [["", 4.0]]]})
    status, body = rest("POST", f"/v1/models/{MODEL}/versions/{VERSION}:regress",
                        {"signature_name": "regress_x_to_y2", "examples": [{"x": 2.0}]})
    assert (status, body) == (200, {"results": [4.0]})
    status, body = rest("POST", f"/v1/models/{MODEL}/labels/stable:regress",
                        {"signature_name": "regress_x_to_y", "context": {"x": 4.0}, "examples": [{"x2": 1.0}]})
    assert (status, body) == (200, {"results": [4.0]})


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/{VERSION}",
                                  f"/v1/models/{MODEL}/labels/stable"])
def test_rest_model_status(rest, path):
    status, body = rest("GET", path)
    assert status == 200, body
    assert body == {"model_version_status": [{"version": str(VERSION), "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}/metadata", f"/v1/models/{MODEL}/versions/{VERSION}/metadata"])
def test_rest_model_metadata(rest, path):
    status, body = rest("GET", path)
    assert status == 200, body
    assert body["model_spec"] == {"name": MODEL, "signature_name": "", "version": str(VERSION)}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert sorted(sigs) == ["classify_x2_to_y3", "classify_x_to_y", "regress_x2_to_y3", "regress_x_to_y",
                            "regress_x_to_y2", "serving_default"]
    default = sigs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["x"]["dtype"] == "DT_FLOAT" and default["inputs"]["x"]["name"] == "x:0"
    assert default["outputs"]["y"]["name"] == "y:0"


@pytest.mark.parametrize("method, path, body, http, error", [
    # unknown model / version / label
    ("POST", "/v1/models/unknown:predict", {"instances": [[1.0]]}, 404,
     "Servable not found for request: Latest(unknown)"),
    ("POST", f"/v1/models/{MODEL}/versions/999:predict", {"instances": [[1.0]]}, 404,
     f"Servable not found for request: Specific({MODEL}, 999)"),
    ("POST", f"/v1/models/{MODEL}/labels/nope:predict", {"instances": [[1.0]]}, 400,
     "Unrecognized servable version label: nope"),
    ("GET", "/v1/models/unknown", None, 404, "Could not find any versions of model unknown"),
    ("GET", f"/v1/models/{MODEL}/versions/7", None, 404, f"Could not find version 7 of model {MODEL}"),
    ("GET", f"/v1/models/{MODEL}/labels/nope", None, 400, "Unrecognized servable version label: nope"),
    ("GET", "/v1/models/unknown/metadata", None, 404, "Servable not found for request: Latest(unknown)"),
    ("POST", "/v1/models/unknown:classify", {"examples": [{"x": 1.0}]}, 404,
     "Servable not found for request: Latest(unknown)"),
    # unknown signature
    ("POST", f"/v1/models/{MODEL}:predict", {"signature_name": "nope", "instances": [[1.0]]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", f"/v1/models/{MODEL}:regress", {"signature_name": "nope", "examples": [{"x": 1.0}]}, 400,
     "No signature was found with the name: nope"),
    # bad input name, bad dtype
    ("POST", f"/v1/models/{MODEL}:predict", {"inputs": {"z": [[1.0]]}}, 400,
     "Missing named input: x in 'inputs' object."),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": ["a"]}, 400,
     "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: \"a\" Type: String "
     "is not of expected type: float"),
    # empty request
    ("POST", f"/v1/models/{MODEL}:predict", {}, 400, "Missing 'inputs' or 'instances' key"),
    ("POST", f"/v1/models/{MODEL}:predict", b"", 400, "JSON Parse error: The document is empty"),
    ("POST", f"/v1/models/{MODEL}:classify", {"signature_name": "classify_x_to_y"}, 400, None),
])
def test_rest_errors(rest, method, path, body, http, error):
    status, answer = rest(method, path, body)
    assert status == http, (status, answer)
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    if error is not None:
        assert tfs_text(answer["error"]) == error


# --- tenancy: public and private models -------------------------------------------------------------


QUALIFIED_PUBLIC = f"{PUBLIC_TENANT}.{PUBLIC_MODEL}"
QUALIFIED_PRIVATE = f"admin.{MODEL}"


def test_public_model_without_a_token_by_tenant_dot_model(call, rest):
    r = call("Predict", {"modelSpec": spec(QUALIFIED_PUBLIC)}, tensors=x_tensor([[2.0]]), token=None)
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[3.0]]}
    assert r["response"]["modelSpec"]["version"] == "1"
    r = call("GetModelStatus", {"modelSpec": spec(QUALIFIED_PUBLIC)}, token=None)
    assert r["code"] == "OK" and r["response"]["model_version_status"][0]["state"] == "AVAILABLE", r
    assert rest("POST", f"/v1/models/{QUALIFIED_PUBLIC}:predict", {"instances": [[2.0]]}, token=None) == (
        200, {"predictions": [[3.0]]})
    status, body = rest("GET", f"/v1/models/{QUALIFIED_PUBLIC}", token=None)
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE", body


def test_public_model_by_its_owner_plainly_and_by_other_tenants_qualified(env, call):
    r = call("Predict", {"modelSpec": spec(PUBLIC_MODEL)}, tensors=x_tensor([[2.0]]), token=env.public_token)
    assert r["code"] == "OK" and r["arrays"] == {"y": [[3.0]]}, r
    r = call("Predict", {"modelSpec": spec(QUALIFIED_PUBLIC)}, tensors=x_tensor([[2.0]]))  # as admin
    assert r["code"] == "OK", r
    # The plain name resolves in the caller's own tenant, where it does not exist.
    r = call("Predict", {"modelSpec": spec(PUBLIC_MODEL)}, tensors=x_tensor([[2.0]]))
    assert_error(r, "NOT_FOUND", f"Servable not found for request: Latest({PUBLIC_MODEL})")


def test_private_model_of_another_tenant_is_not_found(env, call, rest):
    other = env.public_token
    for name in (MODEL, QUALIFIED_PRIVATE):
        r = call("Predict", {"modelSpec": spec(name)}, tensors=x_tensor([[2.0]]), token=other)
        assert_error(r, "NOT_FOUND", f"Servable not found for request: Latest({name})")
        r = call("Predict", {"modelSpec": spec(name, version=VERSION)}, tensors=x_tensor([[2.0]]), token=other)
        assert_error(r, "NOT_FOUND", f"Servable not found for request: Specific({name}, {VERSION})")
        r = call("GetModelStatus", {"modelSpec": spec(name)}, token=other)
        assert_error(r, "NOT_FOUND", f"Could not find any versions of model {name}")
        r = call("GetModelMetadata", {"modelSpec": spec(name), "metadataField": ["signature_def"]}, token=other)
        assert_error(r, "NOT_FOUND", f"Servable not found for request: Latest({name})")
        status, body = rest("POST", f"/v1/models/{name}:predict", {"instances": [[2.0]]}, token=other)
        assert status == 404 and tfs_text(body["error"]) == f"Servable not found for request: Latest({name})"
    # Exactly as a model that does not exist at all.
    missing = call("Predict", {"modelSpec": spec("admin.nope")}, tensors=x_tensor([[2.0]]), token=other)
    assert_error(missing, "NOT_FOUND", "Servable not found for request: Latest(admin.nope)")
    # Without a token, by its qualified name: NOT_FOUND too.
    r = call("Predict", {"modelSpec": spec(QUALIFIED_PRIVATE)}, tensors=x_tensor([[2.0]]), token=None)
    assert_error(r, "NOT_FOUND", f"Servable not found for request: Latest({QUALIFIED_PRIVATE})")
    assert rest("GET", f"/v1/models/{QUALIFIED_PRIVATE}", token=None) == (
        404, {"error": f"Could not find any versions of model {QUALIFIED_PRIVATE}"})
    # Its owner reaches it by either name.
    r = call("Predict", {"modelSpec": spec(QUALIFIED_PRIVATE)}, tensors=x_tensor([[2.0]]))
    assert r["code"] == "OK" and r["arrays"] == {"y": [[3.0]]}, r


def test_plain_name_without_a_token_is_unauthenticated(call, rest):
    r = call("Predict", {"modelSpec": spec()}, tensors=x_tensor([[2.0]]), token=None)
    assert r["code"] == "UNAUTHENTICATED", r
    status, body = rest("POST", f"/v1/models/{MODEL}:predict", {"instances": [[2.0]]}, token=None)
    assert status == 401 and "error" in body, body


# --- naming ------------------------------------------------------------------------------------------


def test_tf_serving_style_model_name_is_accepted(env):
    """TF Serving's own test model is `half_plus_two`, and TF Serving clients
    name models like that; the models API must accept the name so that such
    clients work unmodified (the `<tenant>.<model>` form stays unambiguous:
    neither part may hold a dot)."""
    from cloudml import serving
    from cloudml.models.v1 import models_service_pb2 as models_pb

    client = env.platform.client()
    stub = serving.models_stub(client)
    model = client.call(stub.CreateModel, models_pb.CreateModelRequest(name="my_model_2")).model
    assert model.name == "my_model_2"
    client.call(stub.DeleteModel, models_pb.DeleteModelRequest(name="my_model_2"))
