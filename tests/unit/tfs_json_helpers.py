"""Helpers of the tests of services/gateway/tfs_json/ (tests/unit/test_tfs_json*.py):
signatures, parsing, tensors and responses built in one line.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cloudml.tfs.tensorflow.core.framework import tensor_pb2, types_pb2
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2
from services.gateway import tfs_json as tj


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
