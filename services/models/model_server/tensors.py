"""TensorProto <-> numpy on the hot path, without `tf.make_ndarray`.

Decoding follows TensorFlow's `Tensor::FromProto`:

- `tensor_content` holds the raw little-endian values (read with
  `np.frombuffer`, no copy); its size must match the shape exactly.
- Otherwise the typed `*_val` field is used: with fewer values than the shape
  holds, the last value repeats (so `float_val: [0]` with shape [3] is three
  zeros); with none, the tensor is all zeros; extra values are ignored.
- A bad dtype, a negative dimension, a `tensor_content` of the wrong size,
  or a shape that holds more than `max_bytes` (2 GiB, TensorFlow's own
  TensorProto limit, unless the caller passes its smaller one) is a parse
  error (the caller answers "tensor parsing error: <alias>"). The size is
  checked before anything is allocated: `float_val: [0]` with shape [2^40]
  must not reach `np.empty`.

Encoding builds serialized TensorProto bytes directly. Two layouts:

- `field` (TF Serving's default, `AsProtoField`): values in the typed field.
  float/double/complex/bool are packed fields whose payload is the raw
  little-endian array, so they are written without a per-value loop; the
  varint-encoded integer types go through the protobuf runtime.
- `content` (`AsProtoTensorContent`): raw bytes in `tensor_content`.

Stock clients read both (`tf.make_ndarray`); code that reads
`outputs["y"].float_val` directly needs `field`.
"""
from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

try:  # TensorFlow depends on ml_dtypes; bfloat16 has no numpy builtin.
    import ml_dtypes

    _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BFLOAT16 = None

DT_FLOAT = types_pb2.DT_FLOAT
DT_STRING = types_pb2.DT_STRING

#: DataType -> numpy dtype (little-endian, as TensorFlow stores them).
NP_DTYPES: dict[int, np.dtype] = {
    types_pb2.DT_FLOAT: np.dtype("<f4"),
    types_pb2.DT_DOUBLE: np.dtype("<f8"),
    types_pb2.DT_INT32: np.dtype("<i4"),
    types_pb2.DT_UINT8: np.dtype("u1"),
    types_pb2.DT_INT16: np.dtype("<i2"),
    types_pb2.DT_INT8: np.dtype("i1"),
    types_pb2.DT_STRING: np.dtype(object),
    types_pb2.DT_COMPLEX64: np.dtype("<c8"),
    types_pb2.DT_INT64: np.dtype("<i8"),
    types_pb2.DT_BOOL: np.dtype(bool),
    types_pb2.DT_UINT16: np.dtype("<u2"),
    types_pb2.DT_COMPLEX128: np.dtype("<c16"),
    types_pb2.DT_HALF: np.dtype("<f2"),
    types_pb2.DT_UINT32: np.dtype("<u4"),
    types_pb2.DT_UINT64: np.dtype("<u8"),
}
if _BFLOAT16 is not None:
    NP_DTYPES[types_pb2.DT_BFLOAT16] = _BFLOAT16

#: numpy dtype -> DataType, for outputs.
TF_DTYPES: dict[np.dtype, int] = {dt: enum for enum, dt in NP_DTYPES.items()}

#: TensorFlow's DataTypeString, used in its error messages ("float", not "float32").
DTYPE_NAMES: dict[int, str] = {
    types_pb2.DT_INVALID: "INVALID",
    types_pb2.DT_FLOAT: "float",
    types_pb2.DT_DOUBLE: "double",
    types_pb2.DT_INT32: "int32",
    types_pb2.DT_UINT8: "uint8",
    types_pb2.DT_INT16: "int16",
    types_pb2.DT_INT8: "int8",
    types_pb2.DT_STRING: "string",
    types_pb2.DT_COMPLEX64: "complex64",
    types_pb2.DT_INT64: "int64",
    types_pb2.DT_BOOL: "bool",
    types_pb2.DT_QINT8: "qint8",
    types_pb2.DT_QUINT8: "quint8",
    types_pb2.DT_QINT32: "qint32",
    types_pb2.DT_BFLOAT16: "bfloat16",
    types_pb2.DT_QINT16: "qint16",
    types_pb2.DT_QUINT16: "quint16",
    types_pb2.DT_UINT16: "uint16",
    types_pb2.DT_COMPLEX128: "complex128",
    types_pb2.DT_HALF: "half",
    types_pb2.DT_RESOURCE: "resource",
    types_pb2.DT_VARIANT: "variant",
    types_pb2.DT_UINT32: "uint32",
    types_pb2.DT_UINT64: "uint64",
}


def dtype_name(dtype: int) -> str:
    return DTYPE_NAMES.get(dtype, types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype))


class TensorParseError(ValueError):
    """The TensorProto does not describe a valid tensor."""


class TensorTooLarge(TensorParseError):
    """The TensorProto's shape decodes to more bytes than allowed."""


# --- decoding ------------------------------------------------------------------------

# DataType -> (typed field, numpy dtype of the field's values, values per element)
_FIELDS: dict[int, tuple[str, np.dtype | None, int]] = {
    types_pb2.DT_FLOAT: ("float_val", np.dtype("<f4"), 1),
    types_pb2.DT_DOUBLE: ("double_val", np.dtype("<f8"), 1),
    types_pb2.DT_INT32: ("int_val", None, 1),
    types_pb2.DT_UINT8: ("int_val", None, 1),
    types_pb2.DT_INT16: ("int_val", None, 1),
    types_pb2.DT_INT8: ("int_val", None, 1),
    types_pb2.DT_UINT16: ("int_val", None, 1),
    types_pb2.DT_INT64: ("int64_val", None, 1),
    types_pb2.DT_BOOL: ("bool_val", None, 1),
    types_pb2.DT_STRING: ("string_val", None, 1),
    types_pb2.DT_COMPLEX64: ("scomplex_val", np.dtype("<f4"), 2),
    types_pb2.DT_COMPLEX128: ("dcomplex_val", np.dtype("<f8"), 2),
    types_pb2.DT_HALF: ("half_val", np.dtype("<u2"), 1),
    types_pb2.DT_BFLOAT16: ("half_val", np.dtype("<u2"), 1),
    types_pb2.DT_UINT32: ("uint32_val", None, 1),
    types_pb2.DT_UINT64: ("uint64_val", None, 1),
}


#: TensorFlow refuses TensorProtos over 2 GiB; no decoded tensor may be larger either.
MAX_TENSOR_BYTES = 2 * 1024 ** 3


def checked_shape(tp: tensor_pb2.TensorProto, max_bytes: int = MAX_TENSOR_BYTES) -> tuple[tuple[int, ...], int]:
    """(shape, element count) of a TensorProto; raises TensorParseError for an
    unknown rank, a negative dimension, or a tensor of more than `max_bytes`
    once decoded (an object pointer per element for strings; at least a byte
    per element for dtypes without a numpy type)."""
    shape_proto = tp.tensor_shape
    if shape_proto.unknown_rank:
        raise TensorParseError("unknown rank")
    shape = tuple(d.size for d in shape_proto.dim)
    np_dtype = NP_DTYPES.get(tp.dtype)
    itemsize = max(1, np_dtype.itemsize if np_dtype is not None else 1)
    n = 1
    for d in shape:
        if d < 0:
            raise TensorParseError("negative dimension")
        n *= d
    if n * itemsize > max_bytes:  # Python ints: no overflow
        raise TensorTooLarge(f"shape {list(shape)} holds {n * itemsize} bytes, more than the limit of {max_bytes}")
    return shape, n


def to_ndarray(tp: tensor_pb2.TensorProto, max_bytes: int = MAX_TENSOR_BYTES) -> np.ndarray:
    """Decodes a TensorProto; raises TensorParseError when TensorFlow would
    refuse it or it would decode to more than `max_bytes`."""
    dtype = tp.dtype
    shape, n = checked_shape(tp, max_bytes)
    np_dtype = NP_DTYPES.get(dtype)
    if np_dtype is None:
        return _fallback(tp)
    content = tp.tensor_content
    if dtype != DT_STRING and content:
        if len(content) != n * np_dtype.itemsize:
            raise TensorParseError("tensor_content size does not match the shape")
        return np.frombuffer(content, dtype=np_dtype).reshape(shape)
    field, field_dtype, per_element = _FIELDS[dtype]
    values = getattr(tp, field)
    count = len(values) // per_element
    if dtype == DT_STRING:
        out = np.empty(n, dtype=object)
        if count >= n:
            out[:] = list(values[:n]) if n else []
        elif count:
            out[:count] = list(values)
            out[count:] = values[count - 1]
        else:
            out[:] = b""
        return out.reshape(shape)
    if field_dtype is not None:
        # fromiter: no intermediate list of Python floats (np.array would
        # build one, ~30 bytes per value; 10^7 floats cost ~300 MB more).
        arr = np.fromiter(values, dtype=field_dtype, count=len(values))
        if per_element == 2:
            arr = arr.view(np_dtype)  # (re, im) pairs -> complex
        elif field_dtype != np_dtype:
            arr = arr.view(np_dtype)  # half / bfloat16 bit patterns
    else:
        arr = np.array(values).astype(np_dtype, copy=False) if count else np.zeros(0, np_dtype)
    if count == n:
        return arr.reshape(shape)
    if count > n:
        return arr[:n].reshape(shape)
    out = np.empty(n, dtype=np_dtype)
    if count:
        out[:count] = arr
        out[count:] = arr[count - 1]
    else:
        out[:] = 0
    return out.reshape(shape)


def _fallback(tp: tensor_pb2.TensorProto) -> np.ndarray:
    """Rare dtypes (quantized, float8, ...) through TensorFlow's own decoder."""
    if tp.dtype in (types_pb2.DT_INVALID, types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT) or tp.dtype >= 100:
        raise TensorParseError(f"unsupported dtype {dtype_name(tp.dtype)}")
    import tensorflow as tf  # noqa: PLC0415 - already loaded in this process; kept off the fast path

    try:
        return tf.make_ndarray(tp)
    except Exception as err:  # noqa: BLE001
        raise TensorParseError(str(err)) from err


# --- encoding ------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return _varint(tag) + _varint(len(payload)) + payload


_SHAPE_CACHE: dict[tuple[int, ...], bytes] = {}


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    """A serialized TensorShapeProto field (tag 2), cached per shape."""
    cached = _SHAPE_CACHE.get(shape)
    if cached is None:
        dims = b"".join(_len_field(0x12, b"\x08" + _varint(d) if d else b"") for d in shape)
        cached = _len_field(0x12, dims)
        if len(_SHAPE_CACHE) < 4096:
            _SHAPE_CACHE[shape] = cached
    return cached


# DataType -> (tag of the packed field whose payload is the raw array) for `field` mode.
_RAW_PACKED_TAG = {
    types_pb2.DT_FLOAT: 0x2A,  # float_val = 5
    types_pb2.DT_DOUBLE: 0x32,  # double_val = 6
    types_pb2.DT_COMPLEX64: 0x4A,  # scomplex_val = 9
    types_pb2.DT_COMPLEX128: 0x62,  # dcomplex_val = 12
    types_pb2.DT_BOOL: 0x5A,  # bool_val = 11: one byte per value, 0 or 1
}


def dtype_of(arr: np.ndarray) -> int:
    dt = TF_DTYPES.get(arr.dtype)
    if dt is None:
        if arr.dtype.kind in ("S", "U", "O"):
            return DT_STRING
        raise TypeError(f"no TensorFlow dtype for numpy {arr.dtype}")
    return dt


def tensor_bytes(arr: np.ndarray, content: bool = False) -> bytes:
    """Serialized TensorProto for `arr` (`content`: tensor_content, else typed fields)."""
    dtype = dtype_of(arr)
    head = b"\x08" + _varint(dtype) + _shape_bytes(arr.shape)
    if arr.size == 0:
        return head
    if dtype == DT_STRING:
        parts = [head]
        for value in arr.reshape(-1):
            if isinstance(value, str):
                value = value.encode()
            parts.append(b"\x42" + _varint(len(value)) + value)  # string_val = 8
        return b"".join(parts)
    if content:
        return head + _len_field(0x22, np.ascontiguousarray(arr).tobytes())  # tensor_content = 4
    tag = _RAW_PACKED_TAG.get(dtype)
    if tag is not None:
        raw = np.ascontiguousarray(arr)
        if dtype == types_pb2.DT_BOOL:
            raw = raw.view(np.uint8)
        return head + _len_field(tag, raw.tobytes())
    # Varint-encoded fields: let the protobuf runtime do it.
    tp = tensor_pb2.TensorProto()
    field = _FIELDS[dtype][0]
    flat = arr.reshape(-1)
    if dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        flat = flat.view(np.uint16)
    getattr(tp, field).extend(flat.tolist())
    return head + tp.SerializeToString()


# --- whole PredictResponse bytes ---------------------------------------------------------


def model_spec_bytes(name: str, version: int | None, signature_name: str | None) -> bytes:
    """A serialized tensorflow.serving.ModelSpec."""
    out = _len_field(0x0A, name.encode())
    if version is not None:
        out += _len_field(0x12, (b"\x08" + _varint(version & 0xFFFFFFFFFFFFFFFF)) if version else b"")
    if signature_name:
        out += _len_field(0x1A, signature_name.encode())
    return out


def predict_response_bytes(outputs: list[tuple[str, bytes]], model_spec: bytes) -> bytes:
    """A serialized PredictResponse from (alias, TensorProto bytes) pairs.
    model_spec (field 2) comes first: field order is free in the wire format,
    and the gateway's data plane reads the served version from the first
    bytes of a response (services/common/native/dataplane/)."""
    parts = [_len_field(0x12, model_spec)]  # model_spec = 2
    for alias, tensor in outputs:
        entry = _len_field(0x0A, alias.encode()) + _len_field(0x12, tensor)
        parts.append(_len_field(0x0A, entry))  # outputs = 1 (map entry)
    return b"".join(parts)
