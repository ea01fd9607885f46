"""services/gateway/tfs_json/classify.py: Classify and Regress requests
(tf.Examples, with and without context) and their results in TF Serving's
REST JSON, without TensorFlow.
"""
from __future__ import annotations

import json
import math
import sys

import pytest

from cloudml.tfs.tensorflow_serving.apis import classification_pb2, regression_pb2
from services.gateway import tfs_json as tj

from tests.unit.tfs_json_helpers import loads


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
