"""The model-server replica against TF Serving's behaviour, with the stock client.

Each server is a real `python -m services.models.model_server` process; the
calls are made with the official `tensorflow_serving.apis` stubs and
`tf.make_tensor_proto`, exactly as a user's client would. The expected codes
and messages are TF Serving's (`predict_util.cc`, `saved_model/util.cc`,
`classifier.cc`, `regressor.cc`, `multi_inference.cc`, `util.cc`,
`get_model_metadata_impl.cc`, `get_model_status_impl.cc`, `server_core.cc`,
and their tests).

The pytest process never imports TensorFlow or `tensorflow_serving`: other
test modules import the project's own TF Serving protos (`cloudml.tfs`),
which define the same protobuf symbols. The stock client therefore runs in a
helper process, tests/conformance/model_server_probe.py (`--probe`), which
reads JSON commands on stdin (build the test models, make a call, make
concurrent calls, check imports) and answers each with one JSON line. The
server processes are tests/conformance/model_server_replicas.py's.

Servers (started together once per module, in parallel):
  hpt       half_plus_two v123 with a warmup file
  batching  half_plus_two with server-side batching and tensor_content outputs
  keras     a Keras 3 model written with tf.saved_model.save (TF2 export)
  module    a tf.Module TF2 export
  broken    a SavedModel directory whose saved_model.pb is garbage
  unix      half_plus_two with batching (so its native front) on Unix sockets,
            as the models service starts replicas
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import tempfile
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from services.common import native
from tests.conformance import model_server_probe
from tests.conformance.model_server_replicas import ENV, MODEL, ROOT, VERSION, health, module_servers
from tests.conformance.stock_client import Probe, assert_error, examples, x_tensor


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model_server"))


@pytest.fixture(scope="module")
def probe(workdir):
    p = Probe(model_server_probe.__file__, os.path.join(workdir, "probe.log"), env=ENV, cwd=ROOT)
    yield p
    p.close()


@pytest.fixture(scope="module")
def models(probe, workdir):
    return probe.send(cmd="build", dir=os.path.join(workdir, "models"))


@pytest.fixture(scope="module")
def socket_dir():
    """A short directory for the unix server's sockets (pytest's are too long for a socket path)."""
    path = tempfile.mkdtemp(prefix="cml-ms-", dir="/tmp")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


@pytest.fixture(scope="module")
def servers(models, workdir, socket_dir):
    """Every server of the module, started at once (their TensorFlow imports overlap)."""
    started = module_servers(models, workdir, socket_dir)
    for server in started.values():
        server.start()
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def hpt(servers):
    return servers["hpt"].wait_serving()


@pytest.fixture(scope="module")
def call(probe, hpt):
    """call(method, request=..., tensors=..., examples=..., address=...) on the hpt server."""

    def _call(method, request=None, *, address=None, **extra):
        return probe.send(cmd="call", address=address or hpt.address, method=method, request=request or {}, **extra)

    return _call


def spec(**fields):
    return {"name": MODEL, **fields}


# --- the process --------------------------------------------------------------------------


def test_model_server_imports_only_official_tf_serving_modules(probe):
    modules = probe.send(cmd="imports")["modules"]
    assert "services.models.model_server.server" in modules
    # No etcd client at all: the models service publishes the replica's endpoint.
    assert not [m for m in modules if m.split(".")[0] == "aetcd" or m == "services.common.etcd"]
    assert not [m for m in modules if m.startswith("cloudml.tfs")]
    assert "services.common.server" not in modules


def test_tensor_codec_matches_tensorflow(probe):
    assert probe.send(cmd="codec")["failures"] == []


def test_port_file_and_health(hpt):
    info = hpt.read_port_file()
    assert info["grpc"] == int(info["address"].rsplit(":", 1)[1])
    assert info["pid"] == hpt.proc.pid
    assert info["address"].startswith("127.0.0.1:")
    for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        assert health(hpt.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_warmup_replayed_before_serving(hpt):
    log = hpt.log()
    finished = log.index("Finished reading warmup data")
    assert "Number of warmup records read: 3." in log
    assert finished < log.index("health: SERVING")
    metrics = hpt.metrics()
    assert metrics["cloudml_model_server_warmup_requests_total"] == 3
    assert metrics["cloudml_model_server_tf_runs_total"] >= 3


def test_broken_model_exits_non_zero_with_the_error_in_the_port_file(servers):
    broken = servers["broken"]
    code = broken.proc.wait(90)
    assert code != 0
    info = broken.read_port_file()
    assert info and info["error"], info
    assert "Wire format was corrupt" in info["error"]
    assert info["code"] == grpc.StatusCode.DATA_LOSS.value[0]
    assert "Loading servable: {name: broken version: 1} failed" in broken.log()


# --- Predict -------------------------------------------------------------------------------


def test_predict_default_signature(call):
    r = call("Predict", {"modelSpec": spec()}, tensors=x_tensor([[1.0], [2.0], [5.0]]))
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[2.5], [3.0], [4.5]]}
    # TF Serving's default serialization (AsProtoField): float_val, not tensor_content.
    assert r["layout"] == {"y": "float_val"}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": "123", "signatureName": "serving_default"}


def test_predict_with_output_filter_and_explicit_version(call):
    r = call("Predict", {"modelSpec": spec(version=VERSION), "outputFilter": ["y"]}, tensors=x_tensor([[2.0]]))
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[3.0]]}
    assert r["response"]["modelSpec"]["version"] == "123"


def test_predict_typed_field_with_one_value_fills_the_shape(call):
    request = {"modelSpec": spec(), "inputs": {"x": {
        "dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": "3"}, {"size": "1"}]}, "floatVal": [4.0]}}}
    r = call("Predict", request)
    assert r["arrays"] == {"y": [[4.0], [4.0], [4.0]]}


def test_predict_output_filter_unknown_alias(call):
    r = call("Predict", {"modelSpec": spec(), "outputFilter": ["z"]}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT",
                 "output tensor alias not found in signature: z Outputs expected to be in the set {y}.")


def test_predict_output_filter_duplicate_alias(call):
    r = call("Predict", {"modelSpec": spec(), "outputFilter": ["y", "y"]}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT", "duplicate output tensor alias: y")


def test_predict_unknown_model_returns_not_found(call):
    r = call("Predict", {"modelSpec": {"name": "unknown"}}, tensors=x_tensor([[1.0]]))
    assert_error(r, "NOT_FOUND", "Servable not found for request: Latest(unknown)")


def test_predict_unknown_version_returns_not_found(call):
    r = call("Predict", {"modelSpec": spec(version=999)}, tensors=x_tensor([[1.0]]))
    assert_error(r, "NOT_FOUND", f"Servable not found for request: Specific({MODEL}, 999)")


def test_predict_unknown_label_returns_invalid_argument(call):
    r = call("Predict", {"modelSpec": spec(versionLabel="canary")}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT", "Unrecognized servable version label: canary")


def test_predict_routed_by_the_gateway(call, hpt):
    """Gateways call the Python server itself (the native front drops callers' x-cloudml-* headers)."""
    routed = [["x-cloudml-resolved-version", str(VERSION)]]
    r = call("Predict", {"modelSpec": spec(versionLabel="stable")}, tensors=x_tensor([[2.0]]), metadata=routed,
             address=hpt.server_address)
    assert r["code"] == "OK", r
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": "123", "signatureName": "serving_default"}
    stale = [["x-cloudml-resolved-version", "124"]]
    r = call("Predict", {"modelSpec": spec()}, tensors=x_tensor([[2.0]]), metadata=stale, address=hpt.server_address)
    assert_error(r, "NOT_FOUND", f"Servable not found for request: Specific({MODEL}, 124)")


def test_predict_unknown_signature_returns_failed_precondition(call):
    r = call("Predict", {"modelSpec": spec(signatureName="nope")}, tensors=x_tensor([[1.0]]))
    assert_error(r, "FAILED_PRECONDITION", 'Serving signature key "nope" not found.')


def test_predict_bad_input_name(call):
    r = call("Predict", {"modelSpec": spec()}, tensors={"z": {"value": [[1.0]], "dtype": "float32"}})
    assert_error(r, "INVALID_ARGUMENT",
                 "Signature input alias: x(feed name: x:0) not found in request and no default value provided. "
                 "Inputs expected to be in the request {z}, or default input alias set: ")


def test_predict_extra_input(call):
    tensors = {**x_tensor([[1.0]]), "z": {"value": [[1.0]], "dtype": "float32"}}
    r = call("Predict", {"modelSpec": spec()}, tensors=tensors)
    assert_error(r, "INVALID_ARGUMENT",
                 "input size does not match signature: 2!=1 len({x,z}) != len({x}). Sent extra: {z}. "
                 "Missing but required: {}.")


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


def test_predict_missing_model_spec_or_name(call):
    assert_error(call("Predict", {}, tensors=x_tensor([[1.0]])), "INVALID_ARGUMENT", "Missing ModelSpec")
    r = call("Predict", {"modelSpec": {"signatureName": "serving_default"}}, tensors=x_tensor([[1.0]]))
    assert_error(r, "INVALID_ARGUMENT", "ModelSpec has no name specified.")


def test_predict_runs_regress_and_classify_signatures(call):
    # Predict accepts any signature (TF Serving's method-name check is off by default).
    r = call("Predict", {"modelSpec": spec(signatureName="regress_x2_to_y3")},
             tensors={"inputs": {"value": [[2.0]], "dtype": "float32"}})
    assert r["arrays"] == {"outputs": [[4.0]]}
    assert r["response"]["modelSpec"]["signatureName"] == "regress_x2_to_y3"
    r = call("Predict", {"modelSpec": spec(signatureName="classify_x_to_y")}, examples={"inputs": [{"x": 2.0}]})
    assert r["arrays"] == {"scores": [[3.0]]}


# --- Classify / Regress / MultiInference -----------------------------------------------------------


def test_classify(call):
    r = call("Classify", {"modelSpec": spec(signatureName="classify_x_to_y"), "input": examples({"x": 2.0}, {"x": 4.0})})
    assert r["code"] == "OK", r
    assert r["response"]["result"] == {"classifications": [{"classes": [{"score": 3.0}]},
                                                           {"classes": [{"score": 4.0}]}]}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": "123", "signatureName": "classify_x_to_y"}


def test_classify_with_context(call):
    inp = {"exampleListWithContext": {
        "context": {"features": {"feature": {"x": {"floatList": {"value": [10.0]}}}}},
        "examples": [{"features": {"feature": {"x2": {"floatList": {"value": [1.0]}}}}}],
    }}
    r = call("Classify", {"modelSpec": spec(signatureName="classify_x_to_y"), "input": inp})
    assert r["response"]["result"]["classifications"] == [{"classes": [{"score": 7.0}]}]


def test_classify_float_input_signature_fails_like_the_session(call):
    r = call("Classify", {"modelSpec": spec(signatureName="classify_x2_to_y3"), "input": examples({"x2": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", "Expects arg[0] to be float but string is provided")


def test_classify_default_signature_is_not_a_classification_signature(call):
    r = call("Classify", {"modelSpec": spec(), "input": examples({"x": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", startswith="No classification inputs found in SignatureDef: ")


def test_classify_unknown_signature(call):
    r = call("Classify", {"modelSpec": spec(signatureName="nope"), "input": examples({"x": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", "No signature was found with the name: nope")


def test_classify_empty_input(call):
    r = call("Classify", {"modelSpec": spec(signatureName="classify_x_to_y")})
    assert_error(r, "INVALID_ARGUMENT", "Input is empty.")


def test_classify_missing_feature_is_the_model_error(call):
    r = call("Classify", {"modelSpec": spec(signatureName="classify_x_to_y"), "input": examples({"x2": 2.0})})
    assert_error(r, "INVALID_ARGUMENT")
    assert "Feature: x (data type: float) is required but could not be found." in r["details"]


def test_classify_unknown_model(call):
    r = call("Classify", {"modelSpec": {"name": "nope", "signatureName": "classify_x_to_y"},
                          "input": examples({"x": 2.0})})
    assert_error(r, "NOT_FOUND", "Servable not found for request: Latest(nope)")


@pytest.mark.parametrize("signature, expected", [("regress_x_to_y", 3.0), ("regress_x_to_y2", 4.0)])
def test_regress(call, signature, expected):
    r = call("Regress", {"modelSpec": spec(signatureName=signature), "input": examples({"x": 2.0})})
    assert r["code"] == "OK", r
    assert r["response"]["result"] == {"regressions": [{"value": expected}]}
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": "123", "signatureName": signature}


def test_regress_x2_to_y3_takes_a_float_tensor_not_examples(call):
    r = call("Regress", {"modelSpec": spec(signatureName="regress_x2_to_y3"), "input": examples({"x2": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", "Expects arg[0] to be float but string is provided")


def test_regress_on_a_classification_signature(call):
    r = call("Regress", {"modelSpec": spec(signatureName="classify_x_to_y"), "input": examples({"x": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", startswith="No regression outputs found in SignatureDef: ")


def test_regress_unknown_signature(call):
    r = call("Regress", {"modelSpec": spec(signatureName="nope"), "input": examples({"x": 2.0})})
    assert_error(r, "INVALID_ARGUMENT", "No signature was found with the name: nope")


def task(signature, method):
    return {"modelSpec": spec(signatureName=signature), "methodName": f"tensorflow/serving/{method}"}


def test_multi_inference_regress_and_classify(call):
    r = call("MultiInference", {"tasks": [task("regress_x_to_y", "regress"), task("classify_x_to_y", "classify")],
                                "input": examples({"x": 2.0})})
    assert r["code"] == "OK", r
    results = r["response"]["results"]
    assert results[0]["regressionResult"] == {"regressions": [{"value": 3.0}]}
    assert results[1]["classificationResult"] == {"classifications": [{"classes": [{"score": 3.0}]}]}
    assert results[0]["modelSpec"] == {"name": MODEL, "version": "123", "signatureName": "regress_x_to_y"}
    assert results[1]["modelSpec"] == {"name": MODEL, "version": "123", "signatureName": "classify_x_to_y"}


def test_multi_inference_two_regressions(call):
    r = call("MultiInference", {"tasks": [task("regress_x_to_y", "regress"), task("regress_x_to_y2", "regress")],
                                "input": examples({"x": 2.0})})
    assert [x["regressionResult"]["regressions"][0]["value"] for x in r["response"]["results"]] == [3.0, 4.0]


@pytest.mark.parametrize("tasks, code, details", [
    ([task("regress_x_to_y", "regress"), task("regress_x_to_y", "regress")],
     "INVALID_ARGUMENT", "Duplicate evaluation of signature: regress_x_to_y"),
    ([task("serving_default", "predict")],
     "UNIMPLEMENTED", "Unsupported signature method_name: tensorflow/serving/predict"),
    ([task("nope", "regress")], "INVALID_ARGUMENT", "Requested signature not found in model graph: nope"),
    ([task("regress_x_to_y", "regress"), {**task("regress_x_to_y2", "regress"),
                                          "modelSpec": {"name": "other", "signatureName": "regress_x_to_y2"}}],
     "INVALID_ARGUMENT", "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    ([{**task("regress_x_to_y", "regress"), "modelSpec": {"name": "other"}}],
     "NOT_FOUND", "Servable not found for request: Latest(other)"),
    ([], "INVALID_ARGUMENT", "ModelSpec has no name specified."),
])
def test_multi_inference_errors(call, tasks, code, details):
    r = call("MultiInference", {"tasks": tasks, "input": examples({"x": 2.0})})
    assert_error(r, code, details)


def test_multi_inference_empty_input(call):
    r = call("MultiInference", {"tasks": [task("regress_x_to_y", "regress")]})
    assert_error(r, "INVALID_ARGUMENT", "Input is empty.")


# --- metadata and status -----------------------------------------------------------------------


def test_get_model_metadata(call):
    r = call("GetModelMetadata", {"modelSpec": spec(), "metadataField": ["signature_def"]})
    assert r["code"] == "OK", r
    assert r["response"]["modelSpec"] == {"name": MODEL, "version": "123"}
    any_value = r["response"]["metadata"]["signature_def"]
    assert any_value["@type"] == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sigs = any_value["signatureDef"]
    assert sorted(sigs) == ["classify_x2_to_y3", "classify_x_to_y", "regress_x2_to_y3", "regress_x_to_y",
                            "regress_x_to_y2", "serving_default"]
    default = sigs["serving_default"]
    assert default["methodName"] == "tensorflow/serving/predict"
    assert default["inputs"]["x"] == {"name": "x:0", "dtype": "DT_FLOAT",
                                      "tensorShape": {"dim": [{"size": "-1"}, {"size": "1"}]}}
    assert default["outputs"]["y"]["name"] == "y:0"
    assert sigs["classify_x_to_y"]["methodName"] == "tensorflow/serving/classify"
    assert sigs["regress_x_to_y"]["inputs"]["inputs"]["dtype"] == "DT_STRING"


def test_get_model_metadata_errors(call):
    assert_error(call("GetModelMetadata", {"modelSpec": spec()}), "INVALID_ARGUMENT",
                 "GetModelMetadataRequest must specify at least one metadata_field")
    assert_error(call("GetModelMetadata", {"modelSpec": spec(), "metadataField": ["graph"]}), "INVALID_ARGUMENT")
    assert_error(call("GetModelMetadata", {"modelSpec": {"name": "nope"}, "metadataField": ["signature_def"]}),
                 "NOT_FOUND", "Servable not found for request: Latest(nope)")


def test_get_model_status(call):
    for request in ({"modelSpec": spec()}, {"modelSpec": spec(version=VERSION)}):
        r = call("GetModelStatus", request)
        assert r["code"] == "OK", r
        assert r["response"] == {"model_version_status": [{"version": "123", "state": "AVAILABLE", "status": {}}]}


def test_get_model_status_errors(call):
    assert_error(call("GetModelStatus", {"modelSpec": spec(version=7)}), "NOT_FOUND",
                 f"Could not find version 7 of model {MODEL}")
    assert_error(call("GetModelStatus", {"modelSpec": {"name": "nope"}}), "NOT_FOUND",
                 "Could not find any versions of model nope")
    assert_error(call("GetModelStatus", {}), "INVALID_ARGUMENT", "Missing ModelSpec")


def test_reload_config_is_unimplemented(call):
    assert_error(call("HandleReloadConfigRequest", {}), "UNIMPLEMENTED")


# --- batching ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching(servers):
    return servers["batching"].wait_serving()


def test_batching_runs_concurrent_requests_in_fewer_calls(probe, batching):
    before = batching.metrics()
    calls = []
    expected = []
    for i in range(32):
        rows = [[float(i * 10 + r)] for r in range(1 + i % 2)]
        calls.append({"address": batching.address, "method": "Predict", "request": {"modelSpec": spec()},
                      "tensors": x_tensor(rows)})
        expected.append({"y": [[0.5 * v[0] + 2.0] for v in rows]})
    results = probe.send(cmd="concurrent", calls=calls)
    assert [r["code"] for r in results] == ["OK"] * 32, results
    assert [r["arrays"] for r in results] == expected
    assert all(r["layout"] == {"y": "tensor_content"} for r in results)  # --tensor-content
    after = batching.metrics()
    runs = after["cloudml_model_server_tf_runs_total"] - before["cloudml_model_server_tf_runs_total"]
    batches = after["cloudml_model_server_batches_total"] - before["cloudml_model_server_batches_total"]
    assert 1 <= runs <= 8, (runs, batches)
    assert batches == runs


def test_batching_queue_full_returns_unavailable(probe, batching):
    # Eight different input shapes: eight batch keys, while at most 4 batches may wait.
    calls = [{"address": batching.address, "method": "Predict", "request": {"modelSpec": spec()},
              "tensors": x_tensor([[1.0] * width])} for width in range(1, 9)]
    results = probe.send(cmd="concurrent", calls=calls)
    codes = [r["code"] for r in results]
    assert "UNAVAILABLE" in codes, codes
    refused = [r for r in results if r["code"] == "UNAVAILABLE"]
    assert refused[0]["details"] == "The batch scheduling queue to which this task was submitted is full"
    for width, r in zip(range(1, 9), results):
        if r["code"] == "OK":
            assert r["arrays"] == {"y": [[2.5] * width]}


def test_sigterm_drains_in_flight_requests(probe, batching):
    # A request waits in an open batch (150 ms timeout) when SIGTERM arrives:
    # it still gets its answer, then the process exits 0.
    results = {}
    thread = threading.Thread(target=lambda: results.update(probe.send(
        cmd="call", address=batching.address, method="Predict", request={"modelSpec": spec()},
        tensors=x_tensor([[6.0]]))))
    thread.start()
    deadline = time.monotonic() + 10
    while batching.metrics()["cloudml_model_server_inflight_requests"] < 1:
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.005)
    batching.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert results["code"] == "OK", results
    assert results["arrays"] == {"y": [[5.0]]}
    assert batching.proc.wait(20) == 0


# --- TF2 exports ---------------------------------------------------------------------------------


def test_tf2_keras_saved_model(probe, servers, models):
    keras = servers["keras"].wait_serving()
    r = probe.send(cmd="call", address=keras.address, method="Predict", request={"modelSpec": {"name": "keras"}},
                   tensors={models["keras_alias"]: {"value": models["keras_input"], "dtype": "float32"}})
    assert r["code"] == "OK", r
    (alias, values), = r["arrays"].items()
    assert values == models["keras_expected"]
    assert r["response"]["modelSpec"] == {"name": "keras", "version": "1", "signatureName": "serving_default"}
    meta = probe.send(cmd="call", address=keras.address, method="GetModelMetadata",
                      request={"modelSpec": {"name": "keras"}, "metadataField": ["signature_def"]})
    sigs = meta["response"]["metadata"]["signature_def"]["signatureDef"]
    assert sigs["serving_default"]["inputs"][models["keras_alias"]]["dtype"] == "DT_FLOAT"
    assert "__saved_model_init_op" in sigs  # as TF Serving lists a TF2 export's signatures
    r = probe.send(cmd="call", address=keras.address, method="Predict", request={"modelSpec": {"name": "keras"}},
                   tensors={models["keras_alias"]: {"value": [[1, 2, 3]], "dtype": "int64"}})
    assert_error(r, "INVALID_ARGUMENT", "Expects arg[0] to be float but int64 is provided")


@pytest.fixture(scope="module")
def module_server(servers):
    return servers["module"].wait_serving()


def test_tf2_module_saved_model(probe, module_server):
    r = probe.send(cmd="call", address=module_server.address, method="Predict",
                   request={"modelSpec": {"name": "affine"}, "outputFilter": ["y"]},
                   tensors=x_tensor([[1.0, 1.0], [3.0, 1.0]]))
    assert r["code"] == "OK", r
    assert r["arrays"] == {"y": [[2.0], [6.0]]}
    r = probe.send(cmd="call", address=module_server.address, method="Predict",
                   request={"modelSpec": {"name": "affine"}}, tensors=x_tensor([[1.0, 5.0]]))
    assert r["arrays"] == {"y": [[-2.0]], "argmax": [1]}


# --- no etcd; Unix sockets; what the models service reads ------------------------------------


def test_model_server_takes_no_etcd_flag():
    """Replicas are tenant code: they never reach etcd (the models service publishes their endpoints)."""
    result = subprocess.run([sys.executable, "-m", "services.models.model_server", "--model-name", "m",
                             "--version", "1", "--base-path", "/nonexistent", "--etcd", "127.0.0.1:2379"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unrecognized arguments: --etcd" in result.stderr


def test_port_file_holds_what_the_endpoint_record_publishes(hpt):
    info = hpt.read_port_file()
    assert info["coalesce_max"] == 0  # batching off: never coalesce
    assert info["max_request_bytes"] > 0


def _tcp_listeners(pid: int) -> list:
    found = []
    process = psutil.Process(pid)
    for proc in (process, *process.children(recursive=True)):
        found += [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    return found


def test_unix_socket_replica_and_its_front_open_no_tcp_port(probe, servers, socket_dir):
    unix = servers["unix"].wait_serving()
    info = unix.read_port_file()
    assert info["address"] == f"unix:{socket_dir}/r.sock" and "grpc" not in info
    assert info["metrics"] == f"unix:{socket_dir}/r.metrics.sock"
    assert info["coalesce_max"] == 8 * 2  # max_batch_size x batch threads
    if native.built():  # the front owns the public socket, the Python server the one beside it
        assert info["replica_address"] == f"unix:{socket_dir}/r.server.sock"
        assert [p.name() for p in psutil.Process(unix.proc.pid).children()] == ["cloudml-dataplane"]
    for address in {info["address"], info.get("replica_address", info["address"])}:
        r = probe.send(cmd="call", address=address, method="Predict", request={"modelSpec": spec()},
                       tensors=x_tensor([[4.0]]))
        assert r["code"] == "OK" and r["arrays"] == {"y": [[4.0]]}, r
    assert _tcp_listeners(unix.proc.pid) == []
    # Metrics over HTTP on the socket.
    http = subprocess.run(["curl", "-sf", "--unix-socket", f"{socket_dir}/r.metrics.sock", "http://r/metrics"],
                          capture_output=True, text=True, timeout=10)
    assert "cloudml_model_server_inflight_requests" in http.stdout, http.stderr


def test_sigterm_turns_health_not_serving_drains_and_exits_zero(servers, socket_dir):
    unix = servers["unix"].wait_serving()
    address = unix.read_port_file().get("replica_address", unix.address)
    unix.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while health(address) != health_pb2.HealthCheckResponse.NOT_SERVING:  # for --drain-delay 1
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.02)
    assert unix.proc.wait(20) == 0
    assert not [n for n in os.listdir(socket_dir) if n != "r.metrics.sock"]  # gRPC removes its sockets
