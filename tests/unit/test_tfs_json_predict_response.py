"""services/gateway/tfs_json/predict_response.py (and ndarray.py, text.py):
Predict responses as TF Serving's REST API writes them, byte for byte,
without TensorFlow.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cloudml.tfs.tensorflow_serving.apis import predict_pb2
from services.gateway import tfs_json as tj
from services.gateway.tfs_json import text as tj_text

from tests.unit.tfs_json_helpers import loads, parse, response, tensor


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
