"""services/gateway/tfs_json/: TF Serving's REST JSON without TensorFlow.

Cases follow TF Serving's own tests (tensorflow_serving/util/json_tensor_test.cc,
model_servers/http_rest_api_handler_test.cc) and its REST API doc: row and
columnar requests, named and unnamed inputs, b64, bad JSON, mixed formats,
dtype mismatches, ragged lists, responses and their exact layout.
Pure: no TensorFlow (tests/conformance/test_tfs_json_vs_tensorflow.py checks
the codec against real TensorFlow in a subprocess).
"""
from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from cloudml.tfs.tensorflow.core.framework import tensor_pb2, types_pb2
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    regression_pb2,
)
from services.gateway import tfs_json as tj
from services.gateway.tfs_json import text as tj_text
from services.gateway.tfs_json import values as tj_values

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def sig(**inputs: str) -> meta_graph_pb2.SignatureDef:
    s = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for name, dt in inputs.items():
        s.inputs[name].dtype = types_pb2.DataType.Value(dt)
        s.inputs[name].name = f"{name}:0"
    return s


def sigmap(**inputs: str) -> dict:
    return {"serving_default": sig(**inputs)}


def parse(body, **inputs):
    return tj.parse_predict_request(body, sigmap(**inputs))


def arr(t: tensor_pb2.TensorProto) -> np.ndarray:
    return tj.tensor_to_ndarray(t)


def err(body, source=None, **inputs) -> tj.JsonError:
    with pytest.raises(tj.JsonError) as info:
        tj.parse_predict_request(body, source if source is not None else sigmap(**inputs))
    return info.value


def tensor(dtype: str, shape, field=None, values=(), content: bytes | None = None):
    t = tensor_pb2.TensorProto(dtype=types_pb2.DataType.Value(dtype))
    for d in shape:
        t.tensor_shape.dim.add().size = d
    if content is not None:
        t.tensor_content = content
    elif field:
        getattr(t, field).extend(values)
    return t


def response(**tensors) -> predict_pb2.PredictResponse:
    r = predict_pb2.PredictResponse()
    for name, t in tensors.items():
        r.outputs[name].CopyFrom(t)
    return r


def loads(b: bytes):
    return json.loads(b)


# ---------------------------------------------------------------------------
# Predict requests: row format
# ---------------------------------------------------------------------------

def test_single_unnamed_tensor():
    p = parse(b'{"instances": [[1,2],[3,4],[5,6]]}', default="DT_INT32")
    assert p.row_format is True
    t = p.request.inputs["default"]
    assert t.dtype == types_pb2.DT_INT32
    assert [d.size for d in t.tensor_shape.dim] == [3, 2]
    np.testing.assert_array_equal(arr(t), [[1, 2], [3, 4], [5, 6]])
    assert arr(t).dtype == np.int32


def test_mixed_ints_and_decimals_for_float_and_double():
    t = parse('{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}', x="DT_FLOAT").request.inputs["x"]
    assert arr(t).dtype == np.float32
    np.testing.assert_array_equal(arr(t), np.array([1, 2, 3, 4, 5.003, 0.007, 0], np.float32))
    t = parse('{"instances": [1.0, 2, 3, 4, 0.662, 0, 0.0]}', x="DT_DOUBLE").request.inputs["x"]
    assert arr(t).dtype == np.float64
    np.testing.assert_array_equal(arr(t), [1, 2, 3, 4, 0.662, 0, 0])


def test_signature_name_and_model_spec():
    p = tj.parse_predict_request(
        b'{"signature_name": "predict_images", "instances": [[1,2]]}',
        {"predict_images": sig(images="DT_INT32")}, model_name="mnist", version=7)
    spec = p.request.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("mnist", 7, "predict_images")
    assert not spec.version_label
    assert [d.size for d in p.request.inputs["images"].tensor_shape.dim] == [1, 2]
    p = tj.parse_predict_request(b'{"instances": [1]}', sigmap(x="DT_INT32"),
                                 model_name="m", version_label="stable")
    assert p.request.model_spec.version_label == "stable"
    assert not p.request.model_spec.HasField("version")
    assert p.request.model_spec.signature_name == ""


def test_both_version_and_label_rejected():
    with pytest.raises(tj.JsonError, match=r"Both model version \(1\) and model version label \(a\)"):
        tj.parse_predict_request(b'{"instances": [1]}', sigmap(x="DT_INT32"), version=1, version_label="a")


def test_signature_sources():
    body = b'{"signature_name": "other", "instances": [1.5]}'
    other = sig(y="DT_FLOAT")
    calls = []

    def lookup(name):
        calls.append(name)
        return {"other": other, "serving_default": other}.get(name)

    assert "y" in tj.predict_request_from_json(body, lookup).inputs
    assert calls == ["other"]
    tj.predict_request_from_json(b'{"instances": [1.5]}', lookup)
    assert calls[-1] == "serving_default"
    # A single SignatureDef is used as is.
    assert "y" in tj.predict_request_from_json(body, other).inputs
    # A GetModelMetadataResponse, or its SignatureDefMap.
    md = get_model_metadata_pb2.GetModelMetadataResponse()
    sdm = get_model_metadata_pb2.SignatureDefMap()
    sdm.signature_def["other"].CopyFrom(other)
    md.metadata["signature_def"].Pack(sdm)
    assert "y" in tj.predict_request_from_json(body, md).inputs
    assert "y" in tj.predict_request_from_json(body, sdm).inputs
    assert "y" in tj.predict_request_from_json(body, sdm.signature_def).inputs
    assert set(tj.signature_map_from_metadata(md)) == {"other"}


def test_two_step_parse_for_async_callers():
    # TF Serving reports JSON and signature_name errors before looking up the model.
    with pytest.raises(tj.JsonError, match="The document is empty"):
        tj.load_request_json(b"")
    with pytest.raises(tj.JsonError, match="'signature_name' key must be a string value."):
        tj.load_request_json(b'{"signature_name": 1, "instances": [1]}')
    doc, name = tj.load_request_json(b'{"instances": [1.5]}')
    assert name == "serving_default"
    doc, name = tj.load_request_json(b'{"signature_name": "s", "instances": [1.5]}')
    assert name == "s"
    p = tj.parse_predict_request(doc, {"s": sig(x="DT_FLOAT")}, model_name="m")
    assert p.request.model_spec.signature_name == "s" and p.row_format


def test_unknown_signature_and_empty_input_map():
    e = err(b'{"signature_name": "nope", "instances": [1]}', x="DT_FLOAT")
    assert e.message == 'Serving signature name: "nope" not found in signature def'
    assert e.http_status == 400
    e = err(b'{"instances": [1]}', lambda name: None)
    assert e.message == 'Serving signature name: "serving_default" not found in signature def'
    e = err(b'{"instances": [1]}', {"serving_default": meta_graph_pb2.SignatureDef()})
    assert e.message == "Failed to get input map for signature: DEFAULT"
    e = err(b'{"signature_name": "s", "instances": [1]}', {"s": meta_graph_pb2.SignatureDef()})
    assert e.message == "Failed to get input map for signature: s"


def test_base64_scalars_and_lists():
    t = parse(b'{"instances": [ { "b64" : "aGVsbG8=" }, { "b64": "d29ybGQ=" } ]}',
              default="DT_STRING").request.inputs["default"]
    assert t.dtype == types_pb2.DT_STRING
    assert list(t.string_val) == [b"hello", b"world"]
    assert [d.size for d in t.tensor_shape.dim] == [2]
    t = parse(b'{"instances": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}',
              default="DT_STRING").request.inputs["default"]
    assert [d.size for d in t.tensor_shape.dim] == [2, 1]
    assert list(t.string_val) == [b"hello", b"world"]


def test_single_named_tensor_base64():
    t = parse(b'{"instances": [{"default": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}]}',
              default="DT_STRING").request.inputs["default"]
    assert [d.size for d in t.tensor_shape.dim] == [1, 2, 1]
    assert list(t.string_val) == [b"hello", b"world"]


def test_binary_b64_roundtrip_and_raw_utf8_strings():
    raw = bytes(range(256))
    body = json.dumps({"instances": [{"b64": base64.b64encode(raw).decode()}, "h\u00e9llo \u2603"]})
    t = parse(body, s="DT_STRING").request.inputs["s"]
    assert list(t.string_val) == [raw, "h\u00e9llo \u2603".encode()]
    # Unpadded base64 is accepted (absl::Base64Unescape).
    t = parse(b'{"instances": [{"b64": "aGVsbG8"}]}', s="DT_STRING").request.inputs["s"]
    assert list(t.string_val) == [b"hello"]
    # Invalid UTF-8 inside a JSON string goes through byte for byte, as rapidjson does.
    t = parse(b'{"instances": ["a\xff\xfeb"]}', s="DT_STRING").request.inputs["s"]
    assert list(t.string_val) == [b"a\xff\xfeb"]


def test_multiple_named_tensors_row_format():
    p = parse(b"""{
      "instances": [
        {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"],
         "float_tensor": [1.0, NaN], "dbl_tensor": [NaN]},
        {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"],
         "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}
      ]}""", int_tensor="DT_INT32", str_tensor="DT_STRING", float_tensor="DT_FLOAT",
              dbl_tensor="DT_DOUBLE")
    inputs = p.request.inputs
    assert set(inputs) == {"int_tensor", "str_tensor", "float_tensor", "dbl_tensor"}
    np.testing.assert_array_equal(arr(inputs["int_tensor"]),
                                  [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]])
    assert [d.size for d in inputs["str_tensor"].tensor_shape.dim] == [2, 2]
    assert list(inputs["str_tensor"].string_val) == [b"foo", b"bar", b"baz", b"bat"]
    f = arr(inputs["float_tensor"])
    assert f.shape == (2, 2) and f[0, 0] == 1 and math.isnan(f[0, 1]) and f[1, 1] == np.inf
    d = arr(inputs["dbl_tensor"])
    assert d.shape == (2, 1) and math.isnan(d[0, 0]) and d[1, 0] == 2.0


def test_doc_example_named_instances():
    # api_rest.md: two instances with three named inputs each.
    p = parse(b"""{"instances": [
        {"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
        {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]}]}""",
              tag="DT_STRING", signal="DT_INT64", sensor="DT_FLOAT")
    assert [d.size for d in p.request.inputs["sensor"].tensor_shape.dim] == [2, 2, 2]
    np.testing.assert_array_equal(arr(p.request.inputs["signal"]), [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]])
    assert arr(p.request.inputs["signal"]).dtype == np.int64


def test_row_objects_with_a_single_input():
    t = parse(b'{"instances": [{"x": 1.5}, {"x": 2.5}]}', x="DT_FLOAT").request.inputs["x"]
    np.testing.assert_array_equal(arr(t), np.array([1.5, 2.5], np.float32))


def test_scalar_and_empty_rows():
    t = parse(b'{"instances": [[], []]}', x="DT_FLOAT").request.inputs["x"]
    assert [d.size for d in t.tensor_shape.dim] == [2, 0]
    assert arr(t).shape == (2, 0)


# ---------------------------------------------------------------------------
# Predict requests: columnar format
# ---------------------------------------------------------------------------

def test_single_tensor_columnar_named_and_unnamed():
    for body in (b'{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]]}}',
                 b'{"inputs": [[[1,2],[3,4],[5,6]]]}'):
        p = parse(body, int_tensor="DT_INT32")
        assert p.row_format is False
        t = p.request.inputs["int_tensor"]
        assert [d.size for d in t.tensor_shape.dim] == [1, 3, 2]
        np.testing.assert_array_equal(arr(t).ravel(), [1, 2, 3, 4, 5, 6])


def test_multiple_named_tensors_columnar():
    p = parse(b"""{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"],
                             "bin_tensor": { "b64" : "aGVsbG8=" }, "extra": 1}}""",
              int_tensor="DT_INT32", str_tensor="DT_STRING", bin_tensor="DT_STRING")
    inputs = p.request.inputs
    assert set(inputs) == {"int_tensor", "str_tensor", "bin_tensor"}  # extra keys ignored, as TF Serving
    assert [d.size for d in inputs["int_tensor"].tensor_shape.dim] == [1, 3, 2]
    assert list(inputs["str_tensor"].string_val) == [b"foo", b"bar"]
    assert len(inputs["bin_tensor"].tensor_shape.dim) == 0
    assert list(inputs["bin_tensor"].string_val) == [b"hello"]


def test_columnar_scalar_and_varying_batch():
    p = parse(b'{"inputs": {"a": 3.5, "b": [[1], [2], [3]]}}', a="DT_FLOAT", b="DT_INT64")
    assert arr(p.request.inputs["a"]).shape == ()
    assert arr(p.request.inputs["a"]) == np.float32(3.5)
    assert arr(p.request.inputs["b"]).shape == (3, 1)


def test_columnar_errors():
    e = err(b'{"inputs": {"a": [1]}}', a="DT_FLOAT", b="DT_FLOAT")
    assert e.message == "Missing named input: b in 'inputs' object."
    e = err(b'{"inputs": [1, 2]}', a="DT_FLOAT", b="DT_FLOAT")
    assert e.message == ("inputs is a plain value/list, but expecting an object as multiple input "
                         "tensors required as per tensorinfo_map")
    e = err(b'{"inputs": [[1, 2], [3]]}', a="DT_FLOAT")
    assert e.message == "Encountered list at unexpected size: 1 at level: 1 expected size: 2"
    e = err(b'{"inputs": [[1, 2], 3]}', a="DT_FLOAT")
    assert e.message == "JSON Value: 3 found at incorrect level: 2 in the JSON DOM. Expected at level: 2"
    e = err(b'{"inputs": [1, [2]]}', a="DT_FLOAT")
    assert e.message == "Encountered list at unexpected level: 1 expected < 1"
    e = err(b'{"inputs": {"a": ["x"]}}', a="DT_INT32")
    assert e.message == 'JSON Value: "x" Type: String is not of expected type: int32'


# ---------------------------------------------------------------------------
# Predict request errors (TF Serving's messages)
# ---------------------------------------------------------------------------

def test_bad_json_and_document_errors():
    assert err(b"", x="DT_FLOAT").message == "JSON Parse error: The document is empty"
    assert err(b"   ", x="DT_FLOAT").message.startswith("JSON Parse error: The document is empty.")
    assert err(b"instances = [1, 2]", x="DT_FLOAT").message == "JSON Parse error: Invalid value. at offset: 0"
    assert err(b'{"instances": [1 2]}', x="DT_FLOAT").message == (
        "JSON Parse error: Missing a comma or ']' after an array element. at offset: 17")
    assert err(b'{"instances": [1] "x": 2}', x="DT_FLOAT").message.startswith(
        "JSON Parse error: Missing a comma or '}' after an object member.")
    assert err(b'{"instances" [1]}', x="DT_FLOAT").message.startswith(
        "JSON Parse error: Missing a colon after a name of object member.")
    assert err(b'{"instances": [1]} x', x="DT_FLOAT").message.startswith(
        "JSON Parse error: The document root must not be followed by other values.")
    assert err(b'[1, 2]', x="DT_FLOAT").message == "JSON Value: [\n    1,\n    2\n] Is not object"
    assert err(b'{"x": 1}', x="DT_FLOAT").message == "Missing 'inputs' or 'instances' key"
    e = err(b'{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', default="DT_INT32")
    assert "'signature_name' key must be a string value." in e.message
    assert e.code == "INVALID_ARGUMENT" and e.http_status == 400


def test_mixing_instances_and_inputs():
    e = err(b'{"instances": [[1,2]], "inputs": [[1,2]]}', default="DT_INT32")
    assert e.message == (
        'JSON Value: {\n    "instances": [\n        [\n            1,\n            2\n        ]\n    ],\n'
        '    "inputs": [\n        [\n            1,\n            2\n        ]\n    ]\n} '
        "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ")


def test_instances_not_a_list_or_empty():
    assert err(b'{"instances": {"a": 1}}', a="DT_INT32").message == (
        'JSON Value: {\n    "instances": {\n        "a": 1\n    }\n} Excepting \'instances\' to be an list/array')
    assert err(b'{"instances": []}', a="DT_INT32").message == (
        'JSON Value: {\n    "instances": []\n} No values in \'instances\' array')


def test_ragged_rows():
    e = err(b'{"instances": [[1,2],[3,4],[5,6,7]]}', default="DT_INT32")
    assert e.message == ("Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: "
                         "Expecting tensor size: 2 but got: 3")
    e = err(b'{"instances": [[1,2],[3,4],[[5,6]]]}', default="DT_INT32")
    assert e.message == ("Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: "
                         "Expecting shape [2] but got: [1,2]")
    e = err(b'{"instances": [1, [1]]}', default="DT_INT32")
    assert "Expecting shape [] but got: [1]" in e.message
    e = err(b'{"instances": [[[1,2],[3]]]}', default="DT_INT32")
    assert e.message.endswith("Encountered list at unexpected size: 1 at level: 1 expected size: 2")


def test_dtype_mismatches():
    e = err(b'{"instances": [[1,2],["a", "b"]]}', default="DT_INT32")
    assert e.message == ("Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
                         'JSON Value: "a" Type: String is not of expected type: int32')
    e = err(b'{ "instances": ["x", "y"] }', x="DT_FLOAT")
    assert "not of expected type: float" in e.message
    assert "Type: Number is not of expected type: int32" in err(b'{"instances": [1.0]}', x="DT_INT32").message
    assert "JSON Value: 1.5 Type: Number" in err(b'{"instances": [1.5]}', x="DT_INT64").message
    assert "Type: True is not of expected type: int32" in err(b'{"instances": [true]}', x="DT_INT32").message
    assert "Type: Number is not of expected type: bool" in err(b'{"instances": [1]}', x="DT_BOOL").message
    assert "Type: False is not of expected type: float" in err(b'{"instances": [false]}', x="DT_FLOAT").message
    assert "Type: Null is not of expected type: string" in err(b'{"instances": [null]}', x="DT_STRING").message
    assert "Type: Number is not of expected type: int32" in err(b'{"instances": [2147483648]}', x="DT_INT32").message
    assert "is not of expected type: uint32" in err(b'{"instances": [-1]}', x="DT_UINT32").message
    e = err(b'{"instances": [{"b64": "aGk="}]}', x="DT_FLOAT")
    assert e.message == ('Failed to process element: 0 of \'instances\' list. Error: INVALID_ARGUMENT: '
                         'JSON Value: {\n    "b64": "aGk="\n} Type: Object is not of expected type: float')


def test_lossy_numbers():
    e = err(json.dumps({"instances": [sys.float_info.max]}), x="DT_FLOAT")
    assert ("Cannot convert JSON value: 1.7976931348623157e+308 to float without loss of precision."
            in e.message)
    assert "loss of precision" in err(b'{"instances": [16777217]}', x="DT_FLOAT").message
    assert "loss of precision" in err(b'{"instances": [16777216]}', x="DT_FLOAT").message  # (1<<24)-1 is the bound
    assert "loss of precision" in err(b'{"instances": [9007199254740993]}', x="DT_DOUBLE").message
    t = parse(b'{"instances": [16777215, -16777215, 3.4e38]}', x="DT_FLOAT").request.inputs["x"]
    assert arr(t)[0] == 16777215


def test_named_instance_errors():
    two = dict(int_tensor="DT_INT32", str_tensor="DT_STRING")
    e = err(b"""{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},
                               {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}""", **two)
    assert e.message == ("Failed to process element: 1 key: int_tensor of 'instances' list. Error: "
                         "INVALID_ARGUMENT: Expecting shape [3,2] but got: [1,3,2]")
    e = err(b"""{"instances": [{"int_tensor": [[1,2],[3,4],[5,6],[7,8]], "str_tensor": ["foo", "bar"]},
                               {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"]}]}""", **two)
    assert "Expecting tensor size: 8 but got: 6" in e.message
    e = err(b"""{"instances": [{"int_tensor": [[1,2]], "str_tensor": ["foo"]}, [1, 20, 30]]}""", **two)
    assert e.message == "Expecting object but got list at item 1 of input list"
    e = err(b'{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}', str_tensor="DT_STRING")
    assert e.message == "Expecting value/list but got object at item 1 of input list"
    e = err(b'{"instances": [1, 2]}', **two)
    assert e.message == ("instances is a plain list, but expecting list of objects as multiple input "
                         "tensors required as per tensorinfo_map")
    e = err(b'{"instances": [{"int_tensor": [1], "bogus": ["a"]}]}', **two)
    assert e.message == ("Failed to process element: 0 key: bogus of 'instances' list. Error: "
                         "INVALID_ARGUMENT: JSON object: does not have named input: bogus")
    e = err(b'{"instances": [{"int_tensor": [1]}]}', **two)
    assert e.message == ("Failed to process element: 0 of 'instances' list. JSON object: "
                         '{\n    "int_tensor": [\n        1\n    ]\n} keys must be equal to: int_tensor,str_tensor')


def test_base64_errors():
    e = err(b'{"instances": [{"b64": "!!!"}]}', s="DT_STRING")
    assert e.message.endswith("Error: INVALID_ARGUMENT: Unable to base64 decode")
    e = err(b'{"inputs": [{"b64": "aGk=", "x": 1}]}', s="DT_STRING")
    assert e.message == ('JSON Value: {\n    "b64": "aGk=",\n    "x": 1\n} '
                         "not formatted correctly for base64 data")


def test_nan_and_infinity_tokens():
    # rapidjson's kParseNanAndInfFlag also reads Inf and -Inf.
    t = parse(b'{"instances": [NaN, Infinity, -Infinity, Inf, -Inf]}', x="DT_FLOAT").request.inputs["x"]
    a = arr(t)
    assert math.isnan(a[0]) and list(a[1:]) == [np.inf, -np.inf, np.inf, -np.inf]


def test_unsupported_input_dtype_is_unimplemented():
    e = err(b'{"inputs": [1]}', x="DT_COMPLEX64")
    assert e.message == "Conversion of JSON Value: 1 to type: complex64"
    assert e.code == "UNIMPLEMENTED" and e.http_status == 501
    # Wrapped in the row-format message, the outer code is INVALID_ARGUMENT.
    e = err(b'{"instances": [1]}', x="DT_COMPLEX64")
    assert e.message == ("Failed to process element: 0 of 'instances' list. Error: UNIMPLEMENTED: "
                         "Conversion of JSON Value: 1 to type: complex64")
    assert e.code == "INVALID_ARGUMENT"
    # No values, no conversion: an empty tensor of that type is fine.
    assert arr(parse(b'{"inputs": []}', x="DT_COMPLEX64").request.inputs["x"]).shape == (0,)


def test_integer_dtypes():
    p = parse(b'{"inputs": {"i8": [-128, 127], "u8": [0, 255], "i16": [-3], "u32": [4294967295], '
              b'"i64": [-9223372036854775808, 9223372036854775807], "u64": [18446744073709551615], '
              b'"b": [true, false]}}',
              i8="DT_INT8", u8="DT_UINT8", i16="DT_INT16", u32="DT_UINT32", i64="DT_INT64",
              u64="DT_UINT64", b="DT_BOOL")
    got = {k: arr(v) for k, v in p.request.inputs.items()}
    assert got["i8"].dtype == np.int8 and list(got["i8"]) == [-128, 127]
    assert got["u8"].dtype == np.uint8 and list(got["u8"]) == [0, 255]
    assert list(got["i16"]) == [-3]
    assert list(got["u32"]) == [4294967295]
    assert list(got["i64"]) == [-(1 << 63), (1 << 63) - 1]
    assert got["u64"].dtype == np.uint64 and int(got["u64"][0]) == (1 << 64) - 1
    assert got["b"].dtype == np.bool_ and list(got["b"]) == [True, False]
    # Out of the narrow range but an int32: TF Serving puts it in int_val and
    # TF truncates; tensor_content carries the same truncated value.
    assert list(arr(parse(b'{"instances": [300]}', x="DT_UINT8").request.inputs["x"])) == [44]


def test_half_and_bfloat16_inputs():
    t = parse(b'{"instances": [1.5, -2, 65504]}', x="DT_HALF").request.inputs["x"]
    a = arr(t)
    assert a.dtype == np.float16 and list(a) == [1.5, -2, 65504]
    t = parse(b'{"instances": [1.5, 3.140625, -0.0]}', x="DT_BFLOAT16").request.inputs["x"]
    assert list(arr(t)) == [1.5, 3.140625, 0.0]
    # Round to nearest even: 1 + 2**-8 is halfway between two bfloat16 values.
    t = parse(json.dumps({"instances": [1 + 2 ** -8, 1 + 3 * 2 ** -8]}), x="DT_BFLOAT16").request.inputs["x"]
    assert list(arr(t)) == [1.0, 1 + 2 ** -6]


def test_fast_and_slow_paths_agree():
    rng = np.random.default_rng(0)
    cases = [
        ("DT_FLOAT", rng.standard_normal((4, 3, 2)).tolist()),
        ("DT_FLOAT", [[1, 2.5], [3, -4]]),
        ("DT_DOUBLE", rng.standard_normal((5,)).tolist()),
        ("DT_INT32", rng.integers(-1000, 1000, (3, 4)).tolist()),
        ("DT_INT64", [[1 << 40, -(1 << 40)]]),
        ("DT_BOOL", [[True, False], [False, True]]),
        ("DT_STRING", [["a", {"b64": "aGk="}], ["\u00e9", "d"]]),
        ("DT_UINT64", [1, 2, (1 << 64) - 1]),
    ]
    for dt, value in cases:
        dtype = types_pb2.DataType.Value(dt)
        fast_shape, fast_vals = tj_values._tensor_values(value, dtype)
        slow_shape, slow_vals = tj_values._fill_slow(value, dtype)
        assert fast_shape == slow_shape
        a = tj_values._make_tensor(dtype, fast_shape, fast_vals)
        b = tj_values._make_tensor(dtype, slow_shape, slow_vals)
        assert a.SerializeToString() == b.SerializeToString(), dt


def test_no_signature_infers_dtypes():
    p = tj.parse_predict_request(b'{"inputs": {"a": [1, 2], "b": [1.5], "c": ["x"], "d": [true]}}', None)
    dt = {k: v.dtype for k, v in p.request.inputs.items()}
    assert dt == {"a": types_pb2.DT_INT32, "b": types_pb2.DT_FLOAT, "c": types_pb2.DT_STRING,
                  "d": types_pb2.DT_BOOL}
    p = tj.parse_predict_request(b'{"instances": [{"x": [1.0]}, {"x": [2.0]}]}', None)
    assert arr(p.request.inputs["x"]).shape == (2, 1)
    with pytest.raises(tj.JsonError, match="Failed to get input map for signature: DEFAULT"):
        tj.parse_predict_request(b'{"instances": [1.0]}', None)


# ---------------------------------------------------------------------------
# Predict responses
# ---------------------------------------------------------------------------

INT_2x3x2 = tensor("DT_INT32", [2, 3, 2], "int_val", [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])


def test_single_tensor_response_row_and_columnar():
    r = response(int_tensor=INT_2x3x2)
    assert loads(tj.predict_response_to_json(r, True)) == {
        "predictions": [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]]}
    assert loads(tj.predict_response_to_json(r, False)) == {
        "outputs": [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]]}
    r = response(int_tensor=tensor("DT_INT32", [5], "int_val", [1, 2, 3, 4, 5]))
    assert loads(tj.predict_response_to_json(r, True)) == {"predictions": [1, 2, 3, 4, 5]}
    assert loads(tj.predict_response_to_json(r, False)) == {"outputs": [1, 2, 3, 4, 5]}


def test_response_layout_matches_tf_serving_bytes():
    # The half_plus_two answer as TF Serving's rapidjson PrettyWriter lays it out.
    y = tensor("DT_FLOAT", [3], "float_val", [2.5, 3.0, 4.5])
    assert tj.predict_response_to_json(response(y=y), True) == (
        b'{\n    "predictions": [2.5, 3.0, 4.5\n    ]\n}')
    assert tj.predict_response_to_json(response(y=y), False) == (
        b'{\n    "outputs": [\n        2.5,\n        3.0,\n        4.5\n    ]\n}')
    y2 = tensor("DT_FLOAT", [2, 2], "float_val", [2.5, 3.0, 3.5, 4.0])
    assert tj.predict_response_to_json(response(y=y2), True) == (
        b'{\n    "predictions": [[2.5, 3.0], [3.5, 4.0]\n    ]\n}')
    r = response(a=tensor("DT_INT64", [2], "int64_val", [1, 2]),
                 b=tensor("DT_FLOAT", [2, 1], "float_val", [0.5, 1.5]))
    assert tj.predict_response_to_json(r, True) == (
        b'{\n    "predictions": [\n'
        b'        {\n            "a": 1,\n            "b": [0.5]\n        },\n'
        b'        {\n            "a": 2,\n            "b": [1.5]\n        }\n    ]\n}')
    assert tj.predict_response_to_json(r, False) == (
        b'{\n    "outputs": {\n        "a": [\n            1,\n            2\n        ],\n'
        b'        "b": [\n            [\n                0.5\n            ],\n'
        b'            [\n                1.5\n            ]\n        ]\n    }\n}')
    # A scalar output in columnar format; an empty batch.
    assert tj.predict_response_to_json(response(s=tensor("DT_DOUBLE", [], "double_val", [7])), False) == (
        b'{\n    "outputs": 7.0\n}')
    assert tj.predict_response_to_json(response(e=tensor("DT_FLOAT", [0, 3])), True) == (
        b'{\n    "predictions": []\n}')


def test_bytes_tensor_response():
    t = tensor("DT_STRING", [2, 2], "string_val", [b"hello", b"world", b"tf", b"serving"])
    assert loads(tj.predict_response_to_json(response(str_tensor_bytes=t), True)) == {
        "predictions": [[{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
                        [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}
    # rapidjson writes objects across lines even inside single-line arrays.
    one = tensor("DT_STRING", [1], "string_val", [b"hi"])
    assert tj.predict_response_to_json(response(out_bytes=one), True) == (
        b'{\n    "predictions": [{\n            "b64": "aGk="\n        }\n    ]\n}')
    # Without the suffix, DT_STRING is written as a string (raw bytes, unvalidated).
    t = tensor("DT_STRING", [3], "string_val", ["h\u00e9".encode(), b"a\x01\"b", b"\xff"])
    out = tj.predict_response_to_json(response(s=t), True)
    assert out == b'{\n    "predictions": ["h\xc3\xa9", "a\\u0001\\"b", "\xff"\n    ]\n}'


def test_float_formatting_like_tf_serving():
    t = tensor("DT_FLOAT", [2, 3], "float_val", [9000000, 999999, 0.5, 0.0003, 0.00003, 555557.5])
    out = tj.predict_response_to_json(response(float_tensor=t), True)
    assert out == b'{\n    "predictions": [[9e+06, 999999.0, 0.5], [0.0003, 3e-05, 555557.5]\n    ]\n}'
    t = tensor("DT_FLOAT", [2, 2], "float_val", [float("nan"), float("inf"), 3, float("-inf")])
    out = tj.predict_response_to_json(response(float_tensor=t), True)
    assert out == b'{\n    "predictions": [[NaN, Infinity], [3.0, -Infinity]\n    ]\n}'
    # Six digits when they round-trip, else max_digits10.
    t = tensor("DT_FLOAT", [4], "float_val", [1 / 3, 0.1, 16777216, -0.0])
    assert tj.predict_response_to_json(response(f=t), True) == (
        b'{\n    "predictions": [0.333333343, 0.1, 16777216.0, -0.0\n    ]\n}')
    t = tensor("DT_DOUBLE", [3], "double_val", [1 / 3, 0.1, 1e100])
    assert tj.predict_response_to_json(response(d=t), True) == (
        b'{\n    "predictions": [0.33333333333333331, 0.1, 1e+100\n    ]\n}')


def test_float_tokens_are_exact():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.standard_normal(2000).astype(np.float32),
                        (rng.standard_normal(500) * 1e30).astype(np.float32),
                        np.array([1e-45, 3.4028235e38, 1.17549435e-38, 0.1, 100, 1e6, 123456], np.float32)])
    toks = tj_text._float_tokens(a, double=False)
    assert [np.float32(float(x)) for x in toks] == a.tolist()
    assert toks == [tj_text._write_decimal(float(x), double=False) for x in a]
    d = rng.standard_normal(500) * 10.0 ** rng.integers(-300, 300, 500)
    toks = tj_text._float_tokens(d, double=True)
    assert [float(x) for x in toks] == d.tolist()
    assert toks == [tj_text._write_decimal(float(x), double=True) for x in d]


def test_tensor_content_and_typed_fields_decode_alike():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    typed = tensor("DT_FLOAT", [3, 4], "float_val", a.ravel().tolist())
    packed = tensor("DT_FLOAT", [3, 4], content=a.tobytes())
    assert tj.predict_response_to_json(response(y=typed), True) == tj.predict_response_to_json(response(y=packed), True)
    # TF's fill rules for short typed fields.
    assert loads(tj.predict_response_to_json(response(y=tensor("DT_INT32", [3], "int_val", [7])), False)) == {
        "outputs": [7, 7, 7]}
    assert loads(tj.predict_response_to_json(response(y=tensor("DT_INT32", [2])), False)) == {"outputs": [0, 0]}
    for dt, npdt in (("DT_INT8", "i1"), ("DT_UINT8", "u1"), ("DT_INT16", "<i2"), ("DT_INT64", "<i8"),
                     ("DT_UINT32", "<u4"), ("DT_UINT64", "<u8"), ("DT_DOUBLE", "<f8"), ("DT_BOOL", "?")):
        v = np.array([0, 1, 2, 3], dtype=npdt).reshape(2, 2)
        out = loads(tj.predict_response_to_json(response(y=tensor(dt, [2, 2], content=v.tobytes())), False))
        assert out == {"outputs": v.tolist()}, dt


def test_half_and_bfloat16_outputs():
    h = np.array([1.5, -0.25, 65504], np.float16)
    typed = tensor("DT_HALF", [3], "half_val", h.view(np.uint16).tolist())
    packed = tensor("DT_HALF", [3], content=h.tobytes())
    for t in (typed, packed):
        assert tj.predict_response_to_json(response(y=t), True) == (
            b'{\n    "predictions": [1.5, -0.25, 65504.0\n    ]\n}')
    bf = np.array([0x3FC0, 0x4049], np.uint16)  # 1.5, 3.140625
    for t in (tensor("DT_BFLOAT16", [2], "half_val", bf.tolist()), tensor("DT_BFLOAT16", [2], content=bf.tobytes())):
        assert loads(tj.predict_response_to_json(response(y=t), True)) == {"predictions": [1.5, 3.140625]}


def test_response_errors():
    with pytest.raises(tj.JsonError, match="Cannot convert empty tensor map to JSON"):
        tj.predict_response_to_json(predict_pb2.PredictResponse(), True)
    with pytest.raises(tj.JsonError, match="Failed to write JSON value for tensor type: complex64"):
        tj.predict_response_to_json(response(t=tensor("DT_COMPLEX64", [2], "scomplex_val", [1, 2, 3, 4])), True)
    with pytest.raises(tj.JsonError, match="Tensor name: tensor has no shape information "):
        tj.predict_response_to_json(response(tensor=tensor("DT_INT32", [], "int_val", [1])), True)
    r = response(int_tensor=tensor("DT_INT32", [2, 3], "int_val", [1, 2, 3, 4, 5, 6]),
                 str_tensor=tensor("DT_STRING", [1, 3], "string_val", [b"foo", b"bar", b"baz"]))
    with pytest.raises(tj.JsonError, match="has inconsistent batch size: 1 expecting: 2"):
        tj.predict_response_to_json(r, True)
    # Columnar does not need a common batch size.
    assert loads(tj.predict_response_to_json(r, False))["outputs"]["str_tensor"] == [["foo", "bar", "baz"]]


def test_multiple_named_outputs():
    r = response(
        int_tensor=INT_2x3x2,
        str_tensor=tensor("DT_STRING", [2, 2], "string_val", [b"foo", b"bar", b"baz", b"bat"]),
        float_tensor=tensor("DT_FLOAT", [2, 1], "float_val", [1.0, 2.0]),
        double_scalar_tensor=tensor("DT_DOUBLE", [2], "double_val", [8.0, 9.0]),
        str_tensor_bytes=tensor("DT_STRING", [2, 2], "string_val", [b"hello", b"world", b"tf", b"serving"]),
    )
    assert loads(tj.predict_response_to_json(r, True)) == {"predictions": [
        {"double_scalar_tensor": 8.0, "float_tensor": [1.0], "int_tensor": [[1, 2], [3, 4], [5, 6]],
         "str_tensor": ["foo", "bar"], "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]},
        {"double_scalar_tensor": 9.0, "float_tensor": [2.0], "int_tensor": [[7, 8], [9, 0], [1, 2]],
         "str_tensor": ["baz", "bat"], "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]}]}
    assert loads(tj.predict_response_to_json(r, False)) == {"outputs": {
        "double_scalar_tensor": [8.0, 9.0],
        "float_tensor": [[1.0], [2.0]],
        "int_tensor": [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]],
        "str_tensor": [["foo", "bar"], ["baz", "bat"]],
        "str_tensor_bytes": [[{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
                             [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}}


def test_request_to_response_roundtrip():
    body = {"instances": np.random.default_rng(2).standard_normal((8, 5)).astype(np.float32).tolist()}
    p = parse(json.dumps(body), x="DT_FLOAT")
    r = response(y=p.request.inputs["x"])
    got = np.array(loads(tj.predict_response_to_json(r, p.row_format))["predictions"], dtype=np.float32)
    np.testing.assert_array_equal(got, np.array(body["instances"], dtype=np.float32))


# ---------------------------------------------------------------------------
# Classify / Regress
# ---------------------------------------------------------------------------

def feature_dict(example) -> dict:
    out = {}
    for name, f in example.features.feature.items():
        kind = f.WhichOneof("kind")
        out[name] = (kind, list(getattr(f, kind).value)) if kind else (None, [])
    return out


@pytest.mark.parametrize("fn", [tj.classification_request_from_json, tj.regression_request_from_json])
def test_classify_regress_request_no_context(fn):
    req = fn(b"""{"examples": [{"names": [ "foo", "bar" ], "ratings": [ 8.0, 9.0 ], "age": 20},
                               {"names": [ "baz" ], "ratings": 6.0}]}""", model_name="m", version=3)
    assert req.model_spec.name == "m" and req.model_spec.version.value == 3
    assert req.input.WhichOneof("kind") == "example_list"
    ex = req.input.example_list.examples
    assert feature_dict(ex[0]) == {"names": ("bytes_list", [b"foo", b"bar"]),
                                   "ratings": ("float_list", [8.0, 9.0]), "age": ("int64_list", [20])}
    assert feature_dict(ex[1]) == {"names": ("bytes_list", [b"baz"]), "ratings": ("float_list", [6.0])}


@pytest.mark.parametrize("fn", [tj.classification_request_from_json, tj.regression_request_from_json])
def test_classify_regress_request_with_context_and_signature(fn):
    req = fn(b"""{
      "signature_name": "custom_signture",
      "context": {"query": "pizza", "location": [ "sfo" ]},
      "examples": [
        {"names": [ "foo", "bar" ], "ratings": [ 8.0, 9.0, NaN, Infinity ], "age": 20},
        {"names": [ "baz", { "b64": "aGVsbG8=" } ], "ratings": 6.0, "intboolmix": [ 1, true, false ]},
        {"names": "bar", "ratings": -Infinity, "empty": []}
      ]}""")
    assert req.model_spec.signature_name == "custom_signture"
    ewc = req.input.example_list_with_context
    assert feature_dict(ewc.context) == {"query": ("bytes_list", [b"pizza"]), "location": ("bytes_list", [b"sfo"])}
    e0, e1, e2 = ewc.examples
    r = feature_dict(e0)["ratings"][1]
    assert r[:2] == [8.0, 9.0] and math.isnan(r[2]) and r[3] == math.inf
    assert feature_dict(e1) == {"names": ("bytes_list", [b"baz", b"hello"]), "ratings": ("float_list", [6.0]),
                                "intboolmix": ("int64_list", [1, 1, 0])}
    assert feature_dict(e2) == {"names": ("bytes_list", [b"bar"]), "ratings": ("float_list", [-math.inf]),
                                "empty": (None, [])}


@pytest.mark.parametrize("fn", [tj.classification_request_from_json, tj.regression_request_from_json])
def test_classify_regress_request_errors(fn):
    def message(body):
        with pytest.raises(tj.JsonError) as info:
            fn(body)
        return info.value.message

    assert "'signature_name' key must be a string" in message(
        b'{"signature_name": [ "hello" ], "examples": [ { "names": [ "foo", "bar" ] } ]}')
    assert "Example must be JSON object but got JSON Array" == message(b'{"context": [ { "names": [ "foo" ] } ]}')
    assert message(b'{"examples": { "names": [ "foo", "bar" ] }}').endswith(
        "Expecting 'examples' value to be an list/array")
    assert message(b'{"examples": []}').endswith("'examples' value is an empty array")
    assert message(b'{"context": {}}').endswith("When method is classify, key 'examples' is expected and was not found")
    assert message(b'{"examples": [ [ { "names": [ "foo", "bar" ] } ] ]}') == (
        "Example must be JSON object but got JSON Array")
    assert message(b'{"examples": [ { "names": [ 10, null ] } ]}') == (
        "Feature: names has element with unexpected JSON type: Null")
    assert message(b'{"examples": [ { "names": [ 10, 10.0 ] } ]}') == (
        "Unexpected element type in feature: names expecting type: int64")
    assert message(b'{"examples": [ { "names": [ "a", 1.5 ] } ]}') == (
        "Unexpected element type in feature: names expecting type: bytes")
    assert message(b'{"examples": [ { "names": [ 10, { "test": 10 } ] } ]}') == (
        "Feature: names has element with unexpected JSON type: Object")
    assert message(b'{"examples": [ { "names": [ [10], 20 ] } ]}') == (
        "Feature: names has element with unexpected JSON type: Array")
    assert message(b'{"examples": [ { "names": [ 20, 18446744073709551603 ] } ]}') == (
        "Feature: names has uint64 element. Only int64 is supported.")
    assert "loss of precision" in message(json.dumps({"examples": [{"names": sys.float_info.max}]}))
    assert message(b'{"examples": [ { "img": { "b64": "%%%" } } ]}') == "Unable to base64 decode"


def test_classification_and_regression_results():
    resp = classification_pb2.ClassificationResponse()
    for labels, scores in ((["car", "bike", "bus"], [0.2, 0.7, 0.1]), (["car", "bike", "bus"], [0.7, 0.1, 0.2])):
        c = resp.result.classifications.add()
        for label, score in zip(labels, scores):
            c.classes.add(label=label, score=score)
    out = tj.classification_response_to_json(resp)
    assert out == (b'{\n    "results": [[["car", 0.2], ["bike", 0.7], ["bus", 0.1]], '
                   b'[["car", 0.7], ["bike", 0.1], ["bus", 0.2]]\n    ]\n}')
    assert tj.classification_response_to_json(resp.result) == out
    c = classification_pb2.ClassificationResponse()
    c.result.classifications.add().classes.add(label="", score=12)
    assert loads(tj.classification_response_to_json(c)) == {"results": [[["", 12.0]]]}

    resp = regression_pb2.RegressionResponse()
    for v in (0.2, 0.9, 1.0):
        resp.result.regressions.add(value=v)
    assert tj.regression_response_to_json(resp) == b'{\n    "results": [0.2, 0.9, 1.0]\n}'
    resp = regression_pb2.RegressionResponse()
    for v in (0.2, math.inf, 1.0, -math.inf, math.nan):
        resp.result.regressions.add(value=v)
    assert tj.regression_response_to_json(resp) == b'{\n    "results": [0.2, Infinity, 1.0, -Infinity, NaN]\n}'

    with pytest.raises(tj.JsonError, match="Cannot convert empty ClassificationResults to JSON"):
        tj.classification_response_to_json(classification_pb2.ClassificationResponse())
    with pytest.raises(tj.JsonError, match="Cannot convert empty RegressionResults to JSON"):
        tj.regression_response_to_json(regression_pb2.RegressionResponse())


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


# ---------------------------------------------------------------------------
# Errors and HTTP status
# ---------------------------------------------------------------------------

def test_http_status_for_grpc():
    expected = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
                "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
                "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
                "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
                "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
    for name, status in expected.items():
        assert tj.http_status_for_grpc(name) == status
        assert tj.http_status_for_grpc(name.lower()) == status
        assert tj.http_status_for_grpc("StatusCode." + name) == status
    assert tj.http_status_for_grpc(5) == 404
    assert tj.http_status_for_grpc("WHATEVER") == 500
    import grpc
    assert tj.http_status_for_grpc(grpc.StatusCode.NOT_FOUND) == 404
    assert tj.http_status_for_grpc(grpc.StatusCode.UNAVAILABLE) == 503


def test_error_json_layout():
    assert tj.error_json('Servable not found for request: Latest(half)') == (
        b'{\n    "error": "Servable not found for request: Latest(half)"\n}')
    e = tj.JsonError('a "quoted"\nline')
    assert loads(e.to_json()) == {"error": 'a "quoted"\nline'}
    assert isinstance(e, ValueError) and str(e) == 'a "quoted"\nline'


def test_module_does_not_import_tensorflow():
    code = ("import sys; import services.gateway.tfs_json as m; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tensorflow_serving')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
