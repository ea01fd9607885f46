"""services/gateway/tfs_json/predict_request.py (and parse.py, values.py,
signatures.py): Predict requests in TF Serving's REST JSON, without TensorFlow.

Cases follow TF Serving's own tests (tensorflow_serving/util/json_tensor_test.cc,
model_servers/http_rest_api_handler_test.cc) and its REST API doc: row and
columnar requests, named and unnamed inputs, b64, bad JSON, mixed formats,
dtype mismatches, ragged lists, with TF Serving's error messages.
"""
from __future__ import annotations

import base64
import json
import math
import sys

import numpy as np
import pytest

from cloudml.tfs.tensorflow.core.framework import types_pb2
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2
from services.gateway import tfs_json as tj
from services.gateway.tfs_json import values as tj_values

from tests.unit.tfs_json_helpers import arr, err, parse, sig, sigmap


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
