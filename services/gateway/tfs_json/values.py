"""JSON values -> tensor values (dtype checks, shapes, tensor_content)."""
from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np

from cloudml.tfs.tensorflow.core.framework import tensor_pb2

from services.gateway.tfs_json.dtypes import (DOUBLE_MAX_INT, DT_BFLOAT16, DT_BOOL, DT_DOUBLE, DT_FLOAT,
    DT_HALF, DT_INT16, DT_INT32, DT_INT64, DT_INT8, DT_STRING, DT_UINT32, DT_UINT64, DT_UINT8, FLOAT_MAX_INT,
    FLT_MAX, INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, UINT32_MAX, UINT64_MAX)
from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.parse import _b64decode, _decode_b64_object, _is_b64_object, _str_bytes
from services.gateway.tfs_json.text import _as_double, _dtype_string, _jtype, _num_kind, _vts


# dtypes whose request values go to tensor_content, and their wire layout.
_CONTENT_DTYPE = {
    DT_FLOAT: np.dtype("<f4"),
    DT_DOUBLE: np.dtype("<f8"),
    DT_INT32: np.dtype("<i4"),
    DT_UINT8: np.dtype("u1"),
    DT_INT16: np.dtype("<i2"),
    DT_INT8: np.dtype("i1"),
    DT_INT64: np.dtype("<i8"),
    DT_BOOL: np.dtype("?"),
    DT_UINT32: np.dtype("<u4"),
    DT_UINT64: np.dtype("<u8"),
    DT_HALF: np.dtype("<f2"),
    DT_BFLOAT16: np.dtype("<u2"),
}
_FLOATISH = (DT_FLOAT, DT_HALF, DT_BFLOAT16)
_SMALL_INTS = (DT_INT32, DT_INT16, DT_INT8, DT_UINT8)


def _lossless(v: Any, max_int: int, max_abs: float) -> bool:
    """json_tensor.cc IsLosslessDecimal<T>."""
    d = _as_double(v)
    if not math.isfinite(d):
        return True
    if _num_kind(v) == "int":
        return abs(v) <= max_int
    return -max_abs <= d <= max_abs


def _type_error(v: Any, dtype: int) -> JsonError:
    return JsonError(f"JSON Value: {_vts(v)} Type: {_jtype(v)} "
                     f"is not of expected type: {_dtype_string(dtype)}")


def _lossy_error(v: Any, target: str) -> JsonError:
    return JsonError(f"Cannot convert JSON value: {_vts(v)} to {target} without loss of precision.")


def _convert_scalar(v: Any, dtype: int) -> Any:
    """json_tensor.cc AddValueToTensor for one (non-object) JSON value."""
    t = type(v)
    is_number = t is not bool and (t is int or t is float)
    if dtype in _FLOATISH:
        if not is_number:
            raise _type_error(v, dtype)
        if not _lossless(v, FLOAT_MAX_INT, FLT_MAX):
            raise _lossy_error(v, "float")
        return _as_double(v)
    if dtype == DT_DOUBLE:
        if not is_number:
            raise _type_error(v, dtype)
        if not _lossless(v, DOUBLE_MAX_INT, float("inf")):
            raise _lossy_error(v, "double")
        return _as_double(v)
    if dtype in _SMALL_INTS:
        if t is not int or not INT32_MIN <= v <= INT32_MAX:
            raise _type_error(v, dtype)
        return v
    if dtype == DT_STRING:
        if t is not str:
            raise _type_error(v, dtype)
        return _str_bytes(v)
    if dtype == DT_INT64:
        if t is not int or not INT64_MIN <= v <= INT64_MAX:
            raise _type_error(v, dtype)
        return v
    if dtype == DT_BOOL:
        if t is not bool:
            raise _type_error(v, dtype)
        return v
    if dtype == DT_UINT32:
        if t is not int or not 0 <= v <= UINT32_MAX:
            raise _type_error(v, dtype)
        return v
    if dtype == DT_UINT64:
        if t is not int or not 0 <= v <= UINT64_MAX:
            raise _type_error(v, dtype)
        return v
    raise JsonError(f"Conversion of JSON Value: {_vts(v)} to type: {_dtype_string(dtype)}",
                    "UNIMPLEMENTED")


def _dense_shape(v: Any) -> list[int]:
    """json_tensor.cc GetDenseTensorShape: follow the first elements."""
    shape = []
    while type(v) is list:
        shape.append(len(v))
        if not v:
            break
        v = v[0]
    return shape


def _fill_slow(val: Any, dtype: int) -> tuple[list[int], list]:
    """json_tensor.cc FillTensorProto, value by value: exact error messages."""
    shape = _dense_shape(val)
    rank = len(shape)
    out: list = []

    def rec(v: Any, level: int) -> None:
        if type(v) is not list:
            if level != rank:
                raise JsonError(f"JSON Value: {_vts(v)} found at incorrect level: {level + 1} "
                                f"in the JSON DOM. Expected at level: {rank}")
            if type(v) is dict:
                if dtype != DT_STRING:
                    raise _type_error(v, dtype)
                out.append(_decode_b64_object(v))
            else:
                out.append(_convert_scalar(v, dtype))
            return
        if level >= rank:
            raise JsonError(f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(v) != shape[level]:
            raise JsonError(f"Encountered list at unexpected size: {len(v)} at level: {level} "
                            f"expected size: {shape[level]}")
        for x in v:
            rec(x, level + 1)

    rec(val, 0)
    return shape, out


def _fast_leaves(val: Any) -> tuple[list[int], list] | None:
    """Shape and flat leaves of a perfectly regular nested list, else None."""
    shape = _dense_shape(val)
    leaves = [val]
    for d in shape:
        if not leaves:
            break
        if set(map(type, leaves)) != {list} or set(map(len, leaves)) != {d}:
            return None
        leaves = list(chain.from_iterable(leaves))
    return shape, leaves


def _fast_values(leaves: list, dtype: int) -> Any:
    """Bulk conversion of regular leaves; None whenever anything is unusual
    (the caller then redoes the work value by value for the exact error)."""
    if dtype == DT_STRING:
        types = set(map(type, leaves))
        try:
            if types <= {str}:
                return [s.encode("utf-8", "surrogateescape") for s in leaves]
            if types <= {str, dict}:
                out = []
                for x in leaves:
                    if type(x) is str:
                        out.append(x.encode("utf-8", "surrogateescape"))
                    else:
                        if not _is_b64_object(x):
                            return None
                        b = _b64decode(x["b64"])
                        if b is None:
                            return None
                        out.append(b)
                return out
        except UnicodeEncodeError:
            return None
        return None
    npdt = _CONTENT_DTYPE.get(dtype)
    if npdt is None:
        return None
    if not leaves:
        return np.zeros(0, dtype=np.float64 if dtype in _FLOATISH or dtype == DT_DOUBLE else np.int64)
    types = set(map(type, leaves))
    try:
        if dtype in _FLOATISH or dtype == DT_DOUBLE:
            if not types <= {float, int}:
                return None
            a = np.array(leaves, dtype=np.float64)
            max_int = DOUBLE_MAX_INT if dtype == DT_DOUBLE else FLOAT_MAX_INT
            if int in types:
                # An int is taken only if the float holds it exactly.
                if float in types:
                    is_int = np.fromiter((type(x) is int for x in leaves), dtype=bool, count=len(leaves))
                    if np.any(np.abs(a[is_int]) > max_int):
                        return None
                elif np.any(np.abs(a) > max_int):
                    return None
            if dtype != DT_DOUBLE:
                with np.errstate(invalid="ignore"):
                    if np.any(np.abs(a[np.isfinite(a)]) > FLT_MAX):
                        return None
            return a
        if dtype == DT_BOOL:
            return np.array(leaves, dtype=bool) if types == {bool} else None
        if types != {int}:
            return None
        if dtype == DT_UINT64:
            return np.array(leaves, dtype=np.uint64)
        a = np.array(leaves, dtype=np.int64)
        if dtype in _SMALL_INTS:
            lo, hi = INT32_MIN, INT32_MAX
        elif dtype == DT_UINT32:
            lo, hi = 0, UINT32_MAX
        else:
            return a
        if a.min() < lo or a.max() > hi:
            return None
        return a
    except (OverflowError, ValueError, TypeError):
        return None


def _to_content(values: Any, dtype: int) -> bytes:
    """Converted values -> tensor_content bytes (TF's casts for narrow ints)."""
    npdt = _CONTENT_DTYPE[dtype]
    if dtype == DT_BFLOAT16:
        return _float_to_bf16_bits(np.asarray(values, dtype=np.float64).astype(np.float32)).tobytes()
    if dtype in _FLOATISH or dtype == DT_DOUBLE:
        return np.asarray(values, dtype=np.float64).astype(npdt).tobytes()
    if dtype == DT_BOOL:
        return np.asarray(values, dtype=bool).tobytes()
    if dtype == DT_UINT64:
        return np.asarray(values, dtype=np.uint64).astype(npdt).tobytes()
    return np.asarray(values, dtype=np.int64).astype(npdt).tobytes()


def _float_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (as TF/Eigen)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded.astype("<u2")


def _make_tensor(dtype: int, shape: list[int], values: Any) -> tensor_pb2.TensorProto:
    t = tensor_pb2.TensorProto(dtype=dtype)
    dims = t.tensor_shape.dim
    for s in shape:
        dims.add().size = s
    if dtype == DT_STRING:
        t.string_val.extend(values)
    elif dtype in _CONTENT_DTYPE:
        t.tensor_content = _to_content(values, dtype)
    # Other dtypes only get here with no values (an empty JSON list).
    return t


def _tensor_values(val: Any, dtype: int) -> tuple[list[int], Any]:
    """(shape, values) for one tensor's JSON value, TF Serving's rules."""
    fast = _fast_leaves(val)
    if fast is not None:
        shape, leaves = fast
        conv = _fast_values(leaves, dtype)
        if conv is not None:
            return shape, conv
    return _fill_slow(val, dtype)
