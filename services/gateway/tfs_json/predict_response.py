"""Tensors -> JSON text, laid out like TF Serving's PrettyWriter."""
from __future__ import annotations

import base64
from typing import Callable, Mapping

import numpy as np

from cloudml.tfs.tensorflow.core.framework import tensor_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2

from services.gateway.tfs_json.dtypes import (DT_BFLOAT16, DT_BOOL, DT_DOUBLE, DT_FLOAT, DT_HALF, DT_INT16,
    DT_INT32, DT_INT64, DT_INT8, DT_STRING, DT_UINT32, DT_UINT64, DT_UINT8)
from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.ndarray import tensor_to_ndarray
from services.gateway.tfs_json.strings import _bytes_to_text, _encode_out, _jstr
from services.gateway.tfs_json.text import _dtype_string, _float_tokens


_IND = "    "


def _leaf_tokens(name: str, t: tensor_pb2.TensorProto, depth: int) -> tuple[list[int], list[str]]:
    """Shape and flat value tokens; `depth` = open containers around a leaf
    (a b64 object's layout depends on it)."""
    shape = [d.size for d in t.tensor_shape.dim]
    dtype = t.dtype
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n == 0:  # TF Serving checks the type per value written: none here.
        return shape, []
    if dtype == DT_STRING:
        a = tensor_to_ndarray(t).ravel().tolist()
        if name.endswith("_bytes"):
            pre = '{\n' + _IND * (depth + 1) + '"b64": "'
            post = '"\n' + _IND * depth + "}"
            return shape, [pre + base64.b64encode(b).decode("ascii") + post for b in a]
        return shape, [_jstr(_bytes_to_text(b)) for b in a]
    if dtype in (DT_FLOAT, DT_HALF, DT_BFLOAT16):
        return shape, _float_tokens(tensor_to_ndarray(t).astype(np.float32), double=False)
    if dtype == DT_DOUBLE:
        return shape, _float_tokens(tensor_to_ndarray(t), double=True)
    if dtype in (DT_INT32, DT_INT16, DT_INT8, DT_UINT8, DT_INT64, DT_UINT32, DT_UINT64):
        return shape, list(map(str, tensor_to_ndarray(t).ravel().tolist()))
    if dtype == DT_BOOL:
        return shape, ["true" if x else "false" for x in tensor_to_ndarray(t).ravel().tolist()]
    raise JsonError(f"Failed to write JSON value for tensor type: {_dtype_string(dtype)}")


def _nest(tokens: list[str], dims: list[int], stop: int, group: Callable[[int, list[str]], str]) -> list[str]:
    """Fold flat tokens into arrays from the innermost dim up to `stop`
    (exclusive), one group() call per array."""
    for level in range(len(dims) - 1, stop - 1, -1):
        d = dims[level]
        outer = 1
        for x in dims[:level]:
            outer *= x
        if d == 0:
            tokens = [group(level, [])] * outer
        else:
            tokens = [group(level, tokens[i:i + d]) for i in range(0, outer * d, d)]
    return tokens


def _single_line(level: int, chunk: list[str]) -> str:
    return "[" + ", ".join(chunk) + "]"


def _pretty_group(base: int) -> Callable[[int, list[str]], str]:
    def group(level: int, chunk: list[str]) -> str:
        if not chunk:
            return "[]"
        depth = base + level
        inner = ",\n" + _IND * (depth + 1)
        return "[\n" + _IND * (depth + 1) + inner.join(chunk) + "\n" + _IND * depth + "]"
    return group


def tensors_to_json(outputs: Mapping[str, tensor_pb2.TensorProto], row_format: bool) -> bytes:
    """json_tensor.cc MakeJsonFromTensors over a name -> TensorProto map."""
    if not outputs:
        raise JsonError("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    multi = len(names) > 1
    if row_format:
        batch = -1
        for name in names:
            dims = outputs[name].tensor_shape.dim
            if not len(dims):
                raise JsonError(f"Tensor name: {name} has no shape information ")
            cur = dims[0].size
            if batch >= 0 and batch != cur:
                raise JsonError(f"Tensor name: {name} has inconsistent batch size: {cur} "
                                f"expecting: {batch}")
            batch = cur
        items_by_name = {}
        for name in names:
            t = outputs[name]
            rank = len(t.tensor_shape.dim)
            shape, toks = _leaf_tokens(name, t, depth=rank + (2 if multi else 1))
            items_by_name[name] = _nest(toks, shape, 1, _single_line)
        parts = ['{\n    "predictions": [']
        if not multi:
            parts.append(", ".join(items_by_name[names[0]]))
        else:
            keys = [_jstr(n) + ": " for n in names]
            for i in range(batch):
                parts.append(("" if i == 0 else ",") + "\n        {")
                parts.append(",".join("\n            " + k + items_by_name[n][i]
                                      for k, n in zip(keys, names)))
                parts.append("\n        }")
        parts.append("\n    ]" if batch > 0 else "]")
        parts.append("\n}")
        return _encode_out("".join(parts))

    def value(name: str, base: int) -> str:
        t = outputs[name]
        rank = len(t.tensor_shape.dim)
        shape, toks = _leaf_tokens(name, t, depth=base + rank)
        return _nest(toks, shape, 0, _pretty_group(base))[0] if rank else toks[0]

    if not multi:
        body = value(names[0], 1)
    else:
        body = "{" + ",".join("\n        " + _jstr(n) + ": " + value(n, 2) for n in names) + "\n    }"
    return _encode_out('{\n    "outputs": ' + body + "\n}")


def predict_response_to_json(response: predict_pb2.PredictResponse, row_format: bool) -> bytes:
    """A PredictResponse as TF Serving's REST answer ("predictions" for a row
    request, "outputs" for a columnar one)."""
    return tensors_to_json(response.outputs, row_format)
