"""TF Serving's REST JSON, without TensorFlow.

A pure codec between TF Serving's REST bodies and the project's own
wire-compatible TF Serving protos (`cloudml.tfs.*`). It never imports
TensorFlow or `tensorflow_serving` (both define the same protobuf symbols as
our copies, so they must never share a process with them); numpy does the
tensor work.

It mirrors TF Serving 2.x (`tensorflow_serving/util/json_tensor.cc`,
`model_servers/http_rest_api_handler.cc`, `http_rest_api_util.cc`,
`http_server.cc`):

* Predict requests: row format (`{"instances": [...]}`, a list of values, or
  of objects for named inputs) and columnar format (`{"inputs": value}` or
  `{"inputs": {name: value}}`), optional `"signature_name"`. dtypes come from
  the signature's `TensorInfo`s (so the caller passes the signatures it got
  from GetModelMetadata); shapes come from the JSON nesting. `{"b64": ...}`
  for DT_STRING. Errors are raised as `JsonError` carrying TF Serving's
  message (and gRPC code, INVALID_ARGUMENT unless said otherwise).
* Predict responses: `{"predictions": ...}` (row) or `{"outputs": ...}`
  (columnar), one unnamed tensor collapsed, several as objects; DT_STRING
  outputs whose name ends in `_bytes` as `{"b64": ...}`; floats printed as TF
  Serving prints them (six significant digits when that round-trips, else
  full precision, `.0` on whole numbers, NaN/Infinity/-Infinity tokens),
  laid out byte-for-byte like TF Serving's rapidjson PrettyWriter.
* Classify/Regress requests (`examples`, optional `context`) to tf.Examples;
  their results to `{"results": ...}`.
* Model status and metadata responses as TF Serving prints them.
* gRPC code -> HTTP status, as TF Serving maps them.

Deliberate differences from TF Serving (documented, all on the lenient side):
DT_HALF and DT_BFLOAT16 inputs are accepted as JSON numbers (TF Serving
answers UNIMPLEMENTED); numeric request tensors are encoded in
`tensor_content` (TF Serving uses the typed `*_val` fields; the values are the
same, and TF decodes both); responses are decoded from either encoding.


Modules, one per part of the codec:

    dtypes.py            TF dtype enum values and the numeric limits TF Serving's JSON checks use.
    errors.py            Errors and their HTTP status, as TF Serving maps gRPC codes.
    strings.py           JSON string literals and bytes, as rapidjson writes them.
    text.py              JSON text helpers: rapidjson's writer, as TF Serving configures it.
    parse.py             Parsing request bodies as TF Serving's rapidjson reads them.
    values.py            JSON values -> tensor values (dtype checks, shapes, tensor_content).
    signatures.py        Signatures: where a request's dtypes come from.
    predict_request.py   Predict requests: row and columnar formats -> PredictRequest.
    ndarray.py           Tensor protos -> numpy (typed fields or tensor_content).
    predict_response.py  Tensors -> JSON text, laid out like TF Serving's PrettyWriter.
    classify.py          Classify and Regress: tf.Example requests and their results.
    model_status.py      Model status and metadata responses as TF Serving prints them.
"""
from __future__ import annotations

import importlib

from services.gateway.tfs_json.errors import JsonError, error_json, http_status_for_grpc

# Everything else loads numpy (~11 MB resident), so it is imported on first
# use (PEP 562): a gateway whose REST predict calls the native data plane
# converts (every call but a token's first) does not carry it until then.
_LAZY = {
    "DEFAULT_SIGNATURE": "dtypes",
    "signature_map_from_metadata": "signatures",
    "ParsedPredict": "predict_request",
    "predict_request_from_json": "predict_request",
    "parse_predict_request": "predict_request",
    "load_request_json": "predict_request",
    "fill_model_spec": "predict_request",
    "tensor_to_ndarray": "ndarray",
    "predict_response_to_json": "predict_response",
    "tensors_to_json": "predict_response",
    "classification_request_from_json": "classify",
    "regression_request_from_json": "classify",
    "classification_response_to_json": "classify",
    "regression_response_to_json": "classify",
    "model_status_to_json": "model_status",
    "model_metadata_to_json": "model_status",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "JsonError",
    "error_json",
    "http_status_for_grpc",
    *_LAZY,
]
