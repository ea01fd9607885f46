"""Tensor protos -> numpy (typed fields or tensor_content)."""
from __future__ import annotations

import numpy as np

from cloudml.tfs.tensorflow.core.framework import tensor_pb2

from services.gateway.tfs_json.dtypes import (DT_BFLOAT16, DT_BOOL, DT_COMPLEX128, DT_COMPLEX64, DT_DOUBLE,
    DT_FLOAT, DT_HALF, DT_INT16, DT_INT32, DT_INT64, DT_INT8, DT_STRING, DT_UINT16, DT_UINT32, DT_UINT64,
    DT_UINT8)
from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.text import _dtype_string, _shape_str
from services.gateway.tfs_json.values import _CONTENT_DTYPE


_TYPED_FIELD = {
    DT_FLOAT: ("float_val", np.float32),
    DT_DOUBLE: ("double_val", np.float64),
    DT_INT32: ("int_val", np.int32),
    DT_UINT8: ("int_val", np.uint8),
    DT_INT16: ("int_val", np.int16),
    DT_INT8: ("int_val", np.int8),
    DT_UINT16: ("int_val", np.uint16),
    DT_INT64: ("int64_val", np.int64),
    DT_BOOL: ("bool_val", np.bool_),
    DT_UINT32: ("uint32_val", np.uint32),
    DT_UINT64: ("uint64_val", np.uint64),
    DT_HALF: ("half_val", np.uint16),
    DT_BFLOAT16: ("half_val", np.uint16),
    DT_COMPLEX64: ("scomplex_val", np.float32),
    DT_COMPLEX128: ("dcomplex_val", np.float64),
}
_WIRE_DTYPE = dict(_CONTENT_DTYPE)
_WIRE_DTYPE.update({DT_UINT16: np.dtype("<u2"), DT_COMPLEX64: np.dtype("<c8"),
                    DT_COMPLEX128: np.dtype("<c16")})


def tensor_to_ndarray(t: tensor_pb2.TensorProto) -> np.ndarray:
    """A TensorProto's values as numpy (tensor_content or typed fields, with
    TF's fill rules: a short typed field repeats its last value, an empty one
    means zeros). DT_HALF -> float16, DT_BFLOAT16 -> float32, DT_STRING ->
    object array of bytes."""
    shape = [d.size for d in t.tensor_shape.dim]
    if any(s < 0 for s in shape):
        raise JsonError(f"Tensor has an unknown dimension: {_shape_str(shape)}")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dtype = t.dtype
    if dtype == DT_STRING:
        vals = list(t.string_val)
        out = np.empty(n, dtype=object)
        if vals:
            k = min(len(vals), n)
            out[:k] = vals[:k]
            out[k:] = vals[k - 1] if k else b""
        else:
            out[:] = b""
        return out.reshape(shape)
    if dtype not in _TYPED_FIELD:
        raise JsonError(f"Failed to write JSON value for tensor type: {_dtype_string(dtype)}")
    wire = _WIRE_DTYPE[dtype]
    if t.tensor_content:
        if len(t.tensor_content) != n * wire.itemsize:
            raise JsonError(f"Tensor content size {len(t.tensor_content)} does not match shape "
                            f"{_shape_str(shape)} of type {_dtype_string(dtype)}")
        a = np.frombuffer(t.tensor_content, dtype=wire)
    else:
        field, npdt = _TYPED_FIELD[dtype]
        raw = getattr(t, field)
        per = 2 if dtype in (DT_COMPLEX64, DT_COMPLEX128) else 1
        vals = np.array(raw, dtype=npdt) if len(raw) else np.zeros(0, dtype=npdt)
        if per == 2:
            vals = vals[: (len(vals) // 2) * 2].view(wire) if len(vals) else np.zeros(0, dtype=wire)
        elif dtype in (DT_HALF, DT_BFLOAT16):
            vals = vals.astype("<u2")
        else:
            vals = vals.astype(wire, copy=False)
        if len(vals) >= n:
            a = vals[:n]
        elif len(vals) == 0:
            a = np.zeros(n, dtype=vals.dtype)
        else:
            a = np.concatenate([vals, np.repeat(vals[-1:], n - len(vals))])
    if dtype == DT_HALF:
        a = a.view("<f2")
    elif dtype == DT_BFLOAT16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.reshape(shape)
