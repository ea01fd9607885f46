"""Classify and Regress: tf.Example requests and their results."""
from __future__ import annotations

from typing import Any

import numpy as np

from cloudml.tfs.tensorflow.core.example import example_pb2
from cloudml.tfs.tensorflow_serving.apis import classification_pb2, regression_pb2

from services.gateway.tfs_json.dtypes import FLOAT_MAX_INT, FLT_MAX, INT64_MAX
from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.parse import _decode_b64_object, _is_b64_object, _parse_json, _str_bytes
from services.gateway.tfs_json.predict_request import fill_model_spec, _fill_signature_name, _format_error
from services.gateway.tfs_json.strings import _encode_out, _jstr
from services.gateway.tfs_json.text import _as_double, _float_tokens, _jtype, _num_kind, _write_decimal
from services.gateway.tfs_json.values import _lossless, _lossy_error


_KIND_NAME = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}


def _example_from_json(val: Any, example: example_pb2.Example) -> None:
    """json_tensor.cc MakeExampleFromJsonObject."""
    if type(val) is not dict:
        raise JsonError(f"Example must be JSON object but got JSON {_jtype(val)}")
    fmap = example.features.feature
    for name, content in val.items():
        kind: str | None = None
        values: list = []

        def incompatible() -> JsonError:
            return JsonError(f"Unexpected element type in feature: {name} "
                             f"expecting type: {_KIND_NAME[kind]}")

        for v in (content if type(content) is list else (content,)):
            t = type(v)
            if v is None or t is list or (t is dict and not _is_b64_object(v)):
                raise JsonError(f"Feature: {name} has element with unexpected JSON type: {_jtype(v)}")
            if t is bool:
                if kind not in (None, "int64_list"):
                    raise incompatible()
                kind = "int64_list"
                values.append(1 if v else 0)
            elif t is dict or t is str:
                if kind not in (None, "bytes_list"):
                    raise incompatible()
                kind = "bytes_list"
                values.append(_decode_b64_object(v) if t is dict else _str_bytes(v))
            elif _num_kind(v) == "double":
                if kind not in (None, "float_list"):
                    raise incompatible()
                if not _lossless(v, FLOAT_MAX_INT, FLT_MAX):
                    raise _lossy_error(v, "float")
                kind = "float_list"
                values.append(_as_double(v))
            else:
                if kind not in (None, "int64_list"):
                    raise incompatible()
                if v > INT64_MAX:
                    raise JsonError(f"Feature: {name} has uint64 element. Only int64 is supported.")
                kind = "int64_list"
                values.append(v)
        feature = fmap[name]
        feature.Clear()
        if kind is not None:
            getattr(feature, kind).value.extend(values)


def _fill_classify_regress(body: Any, request: Any) -> None:
    """json_tensor.cc FillClassifyRegressRequestFromJson."""
    doc = _parse_json(body)
    _fill_signature_name(doc, request.model_spec)
    has_context = "context" in doc
    if has_context:
        _example_from_json(doc["context"], request.input.example_list_with_context.context)
    if "examples" not in doc:
        raise _format_error(doc, "When method is classify, key 'examples' is expected and was not found")
    examples = doc["examples"]
    if type(examples) is not list:
        raise _format_error(doc, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise _format_error(doc, "'examples' value is an empty array")
    target = (request.input.example_list_with_context.examples if has_context
              else request.input.example_list.examples)
    for ex in examples:
        _example_from_json(ex, target.add())


def classification_request_from_json(body: bytes | str, *, model_name: str = "",
                                     version: int | None = None,
                                     version_label: str | None = None
                                     ) -> classification_pb2.ClassificationRequest:
    """A REST classify body -> ClassificationRequest (tf.Examples)."""
    request = classification_pb2.ClassificationRequest()
    fill_model_spec(request.model_spec, model_name, version, version_label)
    _fill_classify_regress(body, request)
    return request


def regression_request_from_json(body: bytes | str, *, model_name: str = "",
                                 version: int | None = None,
                                 version_label: str | None = None) -> regression_pb2.RegressionRequest:
    """A REST regress body -> RegressionRequest (tf.Examples)."""
    request = regression_pb2.RegressionRequest()
    fill_model_spec(request.model_spec, model_name, version, version_label)
    _fill_classify_regress(body, request)
    return request


def _f32_token(x: float) -> str:
    return _write_decimal(float(np.float32(x)), double=False)


def classification_response_to_json(response: Any) -> bytes:
    """ClassificationResponse (or ClassificationResult) -> {"results": [[[label, score], ...], ...]}."""
    result = response.result if hasattr(response, "result") else response
    if not len(result.classifications):
        raise JsonError("Cannot convert empty ClassificationResults to JSON")
    rows = []
    for c in result.classifications:
        rows.append("[" + ", ".join("[" + _jstr(cl.label) + ", " + _f32_token(cl.score) + "]"
                                    for cl in c.classes) + "]")
    return _encode_out('{\n    "results": [' + ", ".join(rows) + "\n    ]\n}")


def regression_response_to_json(response: Any) -> bytes:
    """RegressionResponse (or RegressionResult) -> {"results": [v, ...]}."""
    result = response.result if hasattr(response, "result") else response
    if not len(result.regressions):
        raise JsonError("Cannot convert empty RegressionResults to JSON")
    toks = _float_tokens(np.array([r.value for r in result.regressions], dtype=np.float32), double=False)
    return _encode_out('{\n    "results": [' + ", ".join(toks) + "]\n}")
