"""services/gateway/tfs_json/model_status.py: model status and metadata
responses as TF Serving's REST API prints them, without TensorFlow.
"""
from __future__ import annotations

import pytest

from cloudml.tfs.tensorflow.core.framework import types_pb2
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2
from services.gateway import tfs_json as tj

from tests.unit.tfs_json_helpers import loads


# ---------------------------------------------------------------------------
# Model status and metadata
# ---------------------------------------------------------------------------

def test_model_status_json():
    r = get_model_status_pb2.GetModelStatusResponse()
    v = r.model_version_status.add(version=123, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    v.status.SetInParent()
    # Byte for byte the answer in TF Serving's REST API doc.
    assert tj.model_status_to_json(r) == (
        b'{\n "model_version_status": [\n  {\n   "version": "123",\n   "state": "AVAILABLE",\n'
        b'   "status": {\n    "error_code": "OK",\n    "error_message": ""\n   }\n  }\n ]\n}\n')
    r = get_model_status_pb2.GetModelStatusResponse()
    v = r.model_version_status.add(version=2, state=get_model_status_pb2.ModelVersionStatus.END)
    v.status.error_code = 3
    v.status.error_message = "Could not load: bad \"model\""
    assert loads(tj.model_status_to_json(r)) == {"model_version_status": [
        {"version": "2", "state": "END",
         "status": {"error_code": "INVALID_ARGUMENT", "error_message": 'Could not load: bad "model"'}}]}


def _tensor_info(name, dtype, dims=None):
    ti = meta_graph_pb2.TensorInfo(name=name, dtype=types_pb2.DataType.Value(dtype))
    if dims is None:
        ti.tensor_shape.unknown_rank = True
    else:
        for d in dims:
            ti.tensor_shape.dim.add(size=d)
    return ti


def test_model_metadata_json_matches_tf_serving_testdata():
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.name = "saved_model_half_plus_two_2_versions"
    resp.model_spec.version.value = 123
    sdm = get_model_metadata_pb2.SignatureDefMap()
    sd = sdm.signature_def["serving_default"]
    sd.method_name = "tensorflow/serving/predict"
    sd.inputs["x"].CopyFrom(_tensor_info("x:0", "DT_FLOAT", [-1, 1]))
    sd.outputs["y"].CopyFrom(_tensor_info("y:0", "DT_FLOAT", [-1, 1]))
    sd = sdm.signature_def["classify_x_to_y"]
    sd.method_name = "tensorflow/serving/classify"
    sd.inputs["inputs"].CopyFrom(_tensor_info("tf_example:0", "DT_STRING"))
    sd.outputs["scores"].CopyFrom(_tensor_info("y:0", "DT_FLOAT", [-1, 1]))
    resp.metadata["signature_def"].Pack(sdm)
    dim = [{"size": "-1", "name": ""}, {"size": "1", "name": ""}]
    # From tensorflow_serving/servables/tensorflow/testdata/saved_model_half_plus_two_2_versions_metadata.json
    expected = {
        "model_spec": {"name": "saved_model_half_plus_two_2_versions", "signature_name": "", "version": "123"},
        "metadata": {"signature_def": {"signature_def": {
            "serving_default": {
                "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dim, "unknown_rank": False},
                                 "name": "x:0"}},
                "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dim, "unknown_rank": False},
                                  "name": "y:0"}},
                "method_name": "tensorflow/serving/predict", "defaults": {}},
            "classify_x_to_y": {
                "inputs": {"inputs": {"dtype": "DT_STRING", "tensor_shape": {"dim": [], "unknown_rank": True},
                                      "name": "tf_example:0"}},
                "outputs": {"scores": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dim, "unknown_rank": False},
                                       "name": "y:0"}},
                "method_name": "tensorflow/serving/classify", "defaults": {}},
        }}},
    }
    assert loads(tj.model_metadata_to_json(resp)) == expected


def test_model_metadata_errors():
    with pytest.raises(tj.JsonError, match="Failed to find 'signature_def' key") as info:
        tj.model_metadata_to_json(get_model_metadata_pb2.GetModelMetadataResponse())
    assert info.value.code == "INTERNAL" and info.value.http_status == 500
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.metadata["signature_def"].Pack(get_model_status_pb2.GetModelStatusResponse())
    with pytest.raises(tj.JsonError, match="Failed to unpack 'Any' object to 'SignatureDefMap'."):
        tj.model_metadata_to_json(resp)
