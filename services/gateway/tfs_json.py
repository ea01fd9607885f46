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
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from itertools import chain
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from cloudml.tfs.tensorflow.core.example import example_pb2
from cloudml.tfs.tensorflow.core.framework import tensor_pb2, types_pb2
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    regression_pb2,
)
from cloudml.tfs.xla.tsl.protobuf import error_codes_pb2

__all__ = [
    "JsonError",
    "ParsedPredict",
    "DEFAULT_SIGNATURE",
    "predict_request_from_json",
    "parse_predict_request",
    "load_request_json",
    "predict_response_to_json",
    "tensors_to_json",
    "tensor_to_ndarray",
    "classification_request_from_json",
    "regression_request_from_json",
    "classification_response_to_json",
    "regression_response_to_json",
    "model_status_to_json",
    "model_metadata_to_json",
    "signature_map_from_metadata",
    "fill_model_spec",
    "error_json",
    "http_status_for_grpc",
]

DEFAULT_SIGNATURE = "serving_default"

DT = types_pb2.DataType
_DT_FLOAT = DT.Value("DT_FLOAT")
_DT_DOUBLE = DT.Value("DT_DOUBLE")
_DT_INT32 = DT.Value("DT_INT32")
_DT_UINT8 = DT.Value("DT_UINT8")
_DT_INT16 = DT.Value("DT_INT16")
_DT_INT8 = DT.Value("DT_INT8")
_DT_STRING = DT.Value("DT_STRING")
_DT_INT64 = DT.Value("DT_INT64")
_DT_BOOL = DT.Value("DT_BOOL")
_DT_BFLOAT16 = DT.Value("DT_BFLOAT16")
_DT_UINT16 = DT.Value("DT_UINT16")
_DT_HALF = DT.Value("DT_HALF")
_DT_UINT32 = DT.Value("DT_UINT32")
_DT_UINT64 = DT.Value("DT_UINT64")
_DT_COMPLEX64 = DT.Value("DT_COMPLEX64")
_DT_COMPLEX128 = DT.Value("DT_COMPLEX128")

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1
_FLT_MAX = float(np.finfo(np.float32).max)
_FLOAT_MAX_INT = (1 << 24) - 1   # IsLosslessDecimal<float>: (1 << digits) - 1
_DOUBLE_MAX_INT = (1 << 53) - 1
_RJ_FLOAT_RANGE = 3.4028234e38   # rapidjson's Value::IsFloat() bound

# ---------------------------------------------------------------------------
# Errors and HTTP status
# ---------------------------------------------------------------------------

_HTTP_FOR_GRPC = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
_GRPC_NAMES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
]


def http_status_for_grpc(code: Any) -> int:
    """HTTP status TF Serving answers for a gRPC status code.

    `code` is a name ("NOT_FOUND", case-insensitive, "StatusCode.NOT_FOUND"
    too), a `grpc.StatusCode`, or the numeric code. Unknown codes give 500.
    """
    if isinstance(code, bool):
        return 500
    if isinstance(code, int):
        name = _GRPC_NAMES[code] if 0 <= code < len(_GRPC_NAMES) else ""
    else:
        name = getattr(code, "name", code)
        if not isinstance(name, str):
            return 500
        name = name.rsplit(".", 1)[-1].upper()
    return _HTTP_FOR_GRPC.get(name, 500)


class JsonError(ValueError):
    """A request/response could not be converted; TF Serving's message.

    `code` is the gRPC status code name TF Serving returns (INVALID_ARGUMENT
    for nearly everything, UNIMPLEMENTED for an input dtype JSON cannot
    express, INTERNAL for an unusable metadata response); `http_status` the
    HTTP status it maps to; `to_json()` the body TF Serving sends.
    """

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def http_status(self) -> int:
        return http_status_for_grpc(self.code)

    def status_string(self) -> str:
        # absl::Status::ToString(), used when TF Serving nests an error.
        return f"{self.code}: {self.message}"

    def to_json(self) -> bytes:
        return error_json(self.message)

    def __str__(self) -> str:
        return self.message


def error_json(message: str) -> bytes:
    """`{"error": message}` laid out as TF Serving writes it."""
    return _encode_out('{\n    "error": ' + _jstr(message) + "\n}")


# ---------------------------------------------------------------------------
# JSON text helpers (rapidjson's writer, as TF Serving configures it)
# ---------------------------------------------------------------------------

_ESCAPES = {i: "\\u%04X" % i for i in range(32)}
_ESCAPES.update({8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r", 34: '\\"', 92: "\\\\"})


def _jstr(s: str) -> str:
    """A JSON string literal as rapidjson writes it (raw UTF-8, \\u00XX upper)."""
    out = json.dumps(s, ensure_ascii=False)
    if "\\u00" in out:
        out = '"' + s.translate(_ESCAPES) + '"'
    return out


def _encode_out(text: str) -> bytes:
    # Strings decoded from raw bytes with surrogateescape go back out as the
    # same bytes, as TF Serving writes DT_STRING bytes unvalidated.
    return text.encode("utf-8", "surrogateescape")


def _bytes_to_text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _write_decimal(val: float, double: bool) -> str:
    """json_tensor.cc WriteDecimal: %g (6 digits), full precision if that does
    not round-trip, '.0' appended to whole numbers, NaN/Infinity tokens."""
    if math.isfinite(val):
        s = "%.6g" % val
        back = float(s)
        if not double:
            back = float(np.float32(back))
        if back != val:
            s = ("%.17g" if double else "%.9g") % val
        if "." not in s and "e" not in s:
            s += ".0"
        return s
    if val != val:
        return "NaN"
    return "-Infinity" if val < 0 else "Infinity"


def _float_tokens(a: np.ndarray, double: bool) -> list[str]:
    """Vectorised _write_decimal over a flat float32/float64 array."""
    a = np.ascontiguousarray(a, dtype=np.float64 if double else np.float32).ravel()
    if a.size == 0:
        return []
    vals = a.tolist()
    a64 = a.astype(np.float64, copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Estimate which values survive six significant digits; each such
        # candidate is then checked exactly (parse back) before it is used.
        exp10 = np.floor(np.log10(np.abs(a64)))
        scale = np.power(10.0, 5.0 - exp10)
        est = np.round(a64 * scale) / scale
        est = est.astype(a.dtype)
        # Over-inclusion is harmless (candidates are verified below).
        cand = (est == a) | (a == 0) | ~np.isfinite(est)
    finite = np.isfinite(a)
    cand &= finite
    full = "%.17g" if double else "%.9g"
    toks = list(map(full.__mod__, vals))
    idx = np.flatnonzero(cand)
    if idx.size:
        six = ["%.6g" % vals[i] for i in idx.tolist()]
        back = np.array(six, dtype=np.float64)
        if not double:
            back = back.astype(np.float32)
        ok = back == a[idx]
        for j, i in enumerate(idx.tolist()):
            if ok[j]:
                toks[i] = six[j]
    toks = [t if ("." in t or "e" in t) else t + ".0" for t in toks]
    if not finite.all():
        for i in np.flatnonzero(~finite).tolist():
            v = vals[i]
            toks[i] = "NaN" if v != v else ("-Infinity" if v < 0 else "Infinity")
    return toks


def _rj_double(d: float) -> str:
    """rapidjson Writer::Double (Grisu shortest digits + Prettify)."""
    if d == 0:
        return "-0.0" if math.copysign(1.0, d) < 0 else "0.0"
    sign = "-" if d < 0 else ""
    r = repr(abs(d))
    mant, _, exp = r.partition("e")
    ip, _, fp = mant.partition(".")
    k = (int(exp) if exp else 0) - len(fp)
    digits = (ip + fp).lstrip("0")
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits = stripped
    n = len(digits)
    kk = n + k
    if 0 <= k and kk <= 21:
        out = digits + "0" * k + ".0"
    elif 0 < kk <= 21:
        out = digits[:kk] + "." + digits[kk:]
    elif -6 < kk <= 0:
        out = "0." + "0" * (-kk) + digits
    elif n == 1:
        out = digits + "e" + str(kk - 1)
    else:
        out = digits[0] + "." + digits[1:] + "e" + str(kk - 1)
    return sign + out


class _Stop(Exception):
    pass


def _num_kind(v: Any) -> str:
    """How rapidjson would hold a parsed JSON number: 'int' or 'double'."""
    if type(v) is int:
        return "int" if _INT64_MIN <= v <= _UINT64_MAX else "double"
    return "double"


def _as_double(v: Any) -> float:
    try:
        return float(v)
    except OverflowError:
        raise JsonError("JSON Parse error: Number too big to be stored in double.") from None


def _pretty(v: Any) -> str:
    """rapidjson PrettyWriter (default format) over a parsed JSON value.

    Like rapidjson, writing stops at a non-finite number inside a container
    (the writer refuses NaN/Inf there), leaving what was written so far."""
    buf: list[str] = []
    try:
        _pw(v, buf, 0)
    except _Stop:
        pass
    return "".join(buf)


def _pw(v: Any, buf: list[str], level: int) -> None:
    t = type(v)
    if t is dict:
        if not v:
            buf.append("{}")
            return
        buf.append("{")
        ind = "    " * (level + 1)
        first = True
        for k, x in v.items():
            buf.append(("\n" if first else ",\n") + ind + _jstr(k) + ": ")
            first = False
            _pw(x, buf, level + 1)
        buf.append("\n" + "    " * level + "}")
    elif t is list:
        if not v:
            buf.append("[]")
            return
        buf.append("[")
        ind = "    " * (level + 1)
        for i, x in enumerate(v):
            buf.append(("\n" if i == 0 else ",\n") + ind)
            _pw(x, buf, level + 1)
        buf.append("\n" + "    " * level + "]")
    elif t is str:
        buf.append(_jstr(v))
    elif t is bool:
        buf.append("true" if v else "false")
    elif v is None:
        buf.append("null")
    elif _num_kind(v) == "int":
        buf.append(str(v))
    else:
        d = _as_double(v)
        if not math.isfinite(d):
            raise _Stop
        buf.append(_rj_double(d))


def _vts(v: Any) -> str:
    """json_tensor.cc JsonValueToString (used in error messages)."""
    if type(v) is not bool and isinstance(v, (int, float)) and _num_kind(v) == "double":
        d = _as_double(v)
        if -_RJ_FLOAT_RANGE <= d <= _RJ_FLOAT_RANGE:
            return _write_decimal(float(np.float32(d)), double=False)
        return _write_decimal(d, double=True)
    return _pretty(v)


def _jtype(v: Any) -> str:
    if v is None:
        return "Null"
    if v is True:
        return "True"
    if v is False:
        return "False"
    if type(v) is dict:
        return "Object"
    if type(v) is list:
        return "Array"
    if type(v) is str:
        return "String"
    return "Number"


def _dtype_string(dtype: int) -> str:
    """tensorflow::DataTypeString."""
    try:
        name = DT.Name(dtype)
    except ValueError:
        return f"unknown dtype enum ({dtype})"
    if name == "DT_INVALID":
        return "INVALID"
    return name[3:].lower()


def _shape_str(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

_PY_TO_RJ = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid control character at": "Invalid encoding in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
    "Extra data": "The document root must not be followed by other values.",
}

# rapidjson (kParseNanAndInfFlag) also reads these; Python's json does not.
_EXTRA_TOKENS = (("-Infinity", None), ("Infinity", None), ("-Inf", "-Infinity"),
                 ("Inf", "Infinity"), ("-NaN", "NaN"))


def _innermost_container(text: str, pos: int) -> str:
    stack: list[str] = []
    in_str = esc = False
    for ch in text[:pos]:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def _parse_error(text: str, err: json.JSONDecodeError) -> JsonError:
    msg = err.msg
    if msg == "Expecting value" and not text[err.pos:].strip() and not text.strip():
        rj = "The document is empty."
    elif msg == "Expecting ',' delimiter":
        if _innermost_container(text, err.pos) == "{":
            rj = "Missing a comma or '}' after an object member."
        else:
            rj = "Missing a comma or ']' after an array element."
    else:
        rj = _PY_TO_RJ.get(msg, "Unspecific syntax error.")
    offset = len(text[:err.pos].encode("utf-8", "surrogateescape"))
    return JsonError(f"JSON Parse error: {rj} at offset: {offset}")


# A \uXXXX escape of a UTF-16 surrogate (preceded by an even number of
# backslashes), and a valid high+low pair.
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\u[dD][89a-fA-F][0-9a-fA-F]{2})")
_SURROGATE_PAIR = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _check_surrogate_escapes(text: str) -> None:
    """rapidjson refuses a lone surrogate escape ("\\ud800"); Python's json
    would make a string no encoder takes later."""
    if "\\u" not in text:
        return
    pos = 0
    while True:
        match = _SURROGATE_ESCAPE.search(text, pos)
        if match is None:
            return
        start = match.start(1)
        if _SURROGATE_PAIR.match(text, start):
            pos = start + 12
            continue
        offset = len(text[:start].encode("utf-8", "surrogateescape"))
        raise JsonError(f"JSON Parse error: The surrogate pair in string is invalid. at offset: {offset}")


def _parse_json(body: Any) -> Any:
    """json_tensor.cc ParseJson: rapidjson with NaN/Inf, object at the top."""
    if isinstance(body, dict):
        return body
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body)
        if not raw:
            raise JsonError("JSON Parse error: The document is empty")
        text = raw.decode("utf-8", "surrogateescape")
    elif isinstance(body, str):
        if not body:
            raise JsonError("JSON Parse error: The document is empty")
        text = body
    else:
        raise TypeError(f"JSON body must be bytes or str, not {type(body).__name__}")
    if text.startswith("\ufeff"):
        text = text[1:]
    _check_surrogate_escapes(text)
    for _ in range(100_000):
        try:
            doc = json.loads(text)
            break
        except json.JSONDecodeError as err:
            fixed = None
            if err.msg == "Expecting value":
                rest = text[err.pos:err.pos + 9]
                for token, repl in _EXTRA_TOKENS:
                    if rest.startswith(token):
                        if repl is not None:
                            fixed = text[:err.pos] + repl + text[err.pos + len(token):]
                        break
            if fixed is None:
                raise _parse_error(text, err) from None
            text = fixed
        except RecursionError:
            raise JsonError("JSON Parse error: Unspecific syntax error. at offset: 0") from None
    else:  # pragma: no cover - pathological input
        raise JsonError("JSON Parse error: Unspecific syntax error. at offset: 0")
    if type(doc) is not dict:
        raise JsonError(f"JSON Value: {_vts(doc)} Is not object")
    return doc


def _is_b64_object(v: Any) -> bool:
    return type(v) is dict and len(v) == 1 and type(v.get("b64")) is str


_B64_RE = re.compile(r"[A-Za-z0-9+/]*")


def _b64decode(s: str) -> bytes | None:
    """absl::Base64Unescape: standard alphabet, padding optional."""
    s = s.rstrip("=") if s.endswith("=") else s
    pad = len(s) % 4
    if pad == 1 or not _B64_RE.fullmatch(s):
        return None
    try:
        return base64.b64decode(s + "=" * ((4 - pad) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_b64_object(v: Any) -> bytes:
    if not _is_b64_object(v):
        raise JsonError(f"JSON Value: {_vts(v)} not formatted correctly for base64 data")
    out = _b64decode(v["b64"])
    if out is None:
        raise JsonError("Unable to base64 decode")
    return out


def _str_bytes(s: str) -> bytes:
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise JsonError("JSON Parse error: The surrogate pair in string is invalid.") from None


# ---------------------------------------------------------------------------
# JSON value -> tensor values
# ---------------------------------------------------------------------------

# dtypes whose request values go to tensor_content, and their wire layout.
_CONTENT_DTYPE = {
    _DT_FLOAT: np.dtype("<f4"),
    _DT_DOUBLE: np.dtype("<f8"),
    _DT_INT32: np.dtype("<i4"),
    _DT_UINT8: np.dtype("u1"),
    _DT_INT16: np.dtype("<i2"),
    _DT_INT8: np.dtype("i1"),
    _DT_INT64: np.dtype("<i8"),
    _DT_BOOL: np.dtype("?"),
    _DT_UINT32: np.dtype("<u4"),
    _DT_UINT64: np.dtype("<u8"),
    _DT_HALF: np.dtype("<f2"),
    _DT_BFLOAT16: np.dtype("<u2"),
}
_FLOATISH = (_DT_FLOAT, _DT_HALF, _DT_BFLOAT16)
_SMALL_INTS = (_DT_INT32, _DT_INT16, _DT_INT8, _DT_UINT8)


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
        if not _lossless(v, _FLOAT_MAX_INT, _FLT_MAX):
            raise _lossy_error(v, "float")
        return _as_double(v)
    if dtype == _DT_DOUBLE:
        if not is_number:
            raise _type_error(v, dtype)
        if not _lossless(v, _DOUBLE_MAX_INT, float("inf")):
            raise _lossy_error(v, "double")
        return _as_double(v)
    if dtype in _SMALL_INTS:
        if t is not int or not _INT32_MIN <= v <= _INT32_MAX:
            raise _type_error(v, dtype)
        return v
    if dtype == _DT_STRING:
        if t is not str:
            raise _type_error(v, dtype)
        return _str_bytes(v)
    if dtype == _DT_INT64:
        if t is not int or not _INT64_MIN <= v <= _INT64_MAX:
            raise _type_error(v, dtype)
        return v
    if dtype == _DT_BOOL:
        if t is not bool:
            raise _type_error(v, dtype)
        return v
    if dtype == _DT_UINT32:
        if t is not int or not 0 <= v <= _UINT32_MAX:
            raise _type_error(v, dtype)
        return v
    if dtype == _DT_UINT64:
        if t is not int or not 0 <= v <= _UINT64_MAX:
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
                if dtype != _DT_STRING:
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
    if dtype == _DT_STRING:
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
        return np.zeros(0, dtype=np.float64 if dtype in _FLOATISH or dtype == _DT_DOUBLE else np.int64)
    types = set(map(type, leaves))
    try:
        if dtype in _FLOATISH or dtype == _DT_DOUBLE:
            if not types <= {float, int}:
                return None
            a = np.array(leaves, dtype=np.float64)
            max_int = _DOUBLE_MAX_INT if dtype == _DT_DOUBLE else _FLOAT_MAX_INT
            if int in types:
                # An int is taken only if the float holds it exactly.
                if float in types:
                    is_int = np.fromiter((type(x) is int for x in leaves), dtype=bool, count=len(leaves))
                    if np.any(np.abs(a[is_int]) > max_int):
                        return None
                elif np.any(np.abs(a) > max_int):
                    return None
            if dtype != _DT_DOUBLE:
                with np.errstate(invalid="ignore"):
                    if np.any(np.abs(a[np.isfinite(a)]) > _FLT_MAX):
                        return None
            return a
        if dtype == _DT_BOOL:
            return np.array(leaves, dtype=bool) if types == {bool} else None
        if types != {int}:
            return None
        if dtype == _DT_UINT64:
            return np.array(leaves, dtype=np.uint64)
        a = np.array(leaves, dtype=np.int64)
        if dtype in _SMALL_INTS:
            lo, hi = _INT32_MIN, _INT32_MAX
        elif dtype == _DT_UINT32:
            lo, hi = 0, _UINT32_MAX
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
    if dtype == _DT_BFLOAT16:
        return _float_to_bf16_bits(np.asarray(values, dtype=np.float64).astype(np.float32)).tobytes()
    if dtype in _FLOATISH or dtype == _DT_DOUBLE:
        return np.asarray(values, dtype=np.float64).astype(npdt).tobytes()
    if dtype == _DT_BOOL:
        return np.asarray(values, dtype=bool).tobytes()
    if dtype == _DT_UINT64:
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
    if dtype == _DT_STRING:
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


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------

SignatureSource = Any  # SignatureDef | Mapping[str, SignatureDef] | Callable | ... | None


def signature_map_from_metadata(
        response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signatures in a GetModelMetadataResponse (its 'signature_def' Any)."""
    if "signature_def" not in response.metadata:
        raise JsonError("Failed to find 'signature_def' key in the GetModelMetadataResponse "
                        "metadata map.", "INTERNAL")
    sdm = get_model_metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(sdm):
        raise JsonError("Failed to unpack 'Any' object to 'SignatureDefMap'.", "INTERNAL")
    return dict(sdm.signature_def)


def _resolve_signature(source: SignatureSource, name: str) -> meta_graph_pb2.SignatureDef | None:
    """The SignatureDef TF Serving's GetInfoMap would pick, or None to infer."""
    if source is None:
        return None
    if isinstance(source, meta_graph_pb2.SignatureDef):
        return source
    if isinstance(source, get_model_metadata_pb2.GetModelMetadataResponse):
        source = signature_map_from_metadata(source)
    elif isinstance(source, get_model_metadata_pb2.SignatureDefMap):
        source = source.signature_def
    signame = name or DEFAULT_SIGNATURE
    if isinstance(source, Mapping) or hasattr(source, "keys"):
        sig = source[signame] if signame in source else None
    elif callable(source):
        sig = source(signame)
    else:
        raise TypeError(f"unsupported signature source: {type(source).__name__}")
    if sig is None:
        raise JsonError(f'Serving signature name: "{signame}" not found in signature def')
    return sig


def _infer_dtype(val: Any) -> int:
    """dtype for an input when no signature is given (beyond TF Serving)."""
    stack, kinds = [val], set()
    while stack:
        v = stack.pop()
        if type(v) is list:
            stack.extend(v)
        elif type(v) is dict or type(v) is str:
            kinds.add("str")
        elif type(v) is bool:
            kinds.add("bool")
        elif type(v) is int:
            kinds.add("int" if _INT32_MIN <= v <= _INT32_MAX else "int64")
        elif type(v) is float:
            kinds.add("float")
        else:
            kinds.add("other")
    if "str" in kinds:
        return _DT_STRING
    if kinds == {"bool"}:
        return _DT_BOOL
    if kinds and kinds <= {"int"}:
        return _DT_INT32
    if kinds and kinds <= {"int", "int64"}:
        return _DT_INT64
    return _DT_FLOAT


# ---------------------------------------------------------------------------
# Predict
# ---------------------------------------------------------------------------

class ParsedPredict(NamedTuple):
    request: predict_pb2.PredictRequest
    row_format: bool  # True: "instances" -> answer with "predictions"


def fill_model_spec(spec: Any, model_name: str = "", version: int | None = None,
                    version_label: str | None = None) -> None:
    """http_rest_api_util.cc FillModelSpecWithNameVersionAndLabel."""
    if version is not None and version_label is not None:
        raise JsonError(f"Both model version ({version}) and model version label "
                        f"({version_label}) cannot be supplied.")
    spec.name = model_name
    if version is not None:
        spec.version.value = int(version)
    if version_label is not None:
        spec.version_label = version_label


def _fill_signature_name(doc: dict, spec: Any) -> str:
    if "signature_name" in doc:
        name = doc["signature_name"]
        if type(name) is not str:
            raise JsonError(f"JSON Value: {_vts(doc)} not formatted correctly. "
                            "'signature_name' key must be a string value.")
        spec.signature_name = name
        return name
    return ""


def _format_error(doc: Any, message: str) -> JsonError:
    return JsonError(f"JSON Value: {_vts(doc)} {message}")


def load_request_json(body: bytes | str) -> tuple[dict, str]:
    """First step of a REST predict, before any model lookup (TF Serving
    reports these errors first): parse the body and check "signature_name".

    Returns (doc, signature name the body asks for, "serving_default" when
    none). Pass `doc` as the body of parse_predict_request once the
    signatures are at hand; it is not parsed again."""
    doc = _parse_json(body)
    name = _fill_signature_name(doc, _Spec())
    return doc, name or DEFAULT_SIGNATURE


class _Spec:
    signature_name = ""


def parse_predict_request(body: bytes | str | dict, signature: SignatureSource, *,
                          model_name: str = "", version: int | None = None,
                          version_label: str | None = None) -> ParsedPredict:
    """A REST predict body -> (PredictRequest, row_format).

    `signature` tells the dtypes of the inputs, as TF Serving reads them from
    the loaded model: a mapping of signature name -> SignatureDef (e.g.
    `signature_map_from_metadata(metadata_response)`, or the response itself,
    or a SignatureDefMap), or a callable(name) -> SignatureDef | None; the
    body's "signature_name" (default "serving_default") picks the entry. A
    single SignatureDef is used whatever the body names. None infers dtypes
    from the JSON values (named inputs only; not TF Serving behaviour).
    `body` may also be the doc returned by load_request_json.
    """
    doc = _parse_json(body)
    request = predict_pb2.PredictRequest()
    fill_model_spec(request.model_spec, model_name, version, version_label)
    signame = _fill_signature_name(doc, request.model_spec)
    sig = _resolve_signature(signature, signame)
    infomap = None if sig is None else {k: v.dtype for k, v in sig.inputs.items()}
    if infomap is not None and not infomap:
        raise JsonError(f"Failed to get input map for signature: {signame or 'DEFAULT'}")

    if "instances" in doc:
        if "inputs" in doc:
            raise _format_error(doc, "Not formatted correctly expecting only one of 'inputs' or "
                                     "'instances' keys to exist ")
        instances = doc["instances"]
        if type(instances) is not list:
            raise _format_error(doc, "Excepting 'instances' to be an list/array")
        if not instances:
            raise _format_error(doc, "No values in 'instances' array")
        if infomap is None:
            infomap = _infer_row_infomap(instances, signame)
        tensors = _row_tensors(instances, infomap)
        row = True
    elif "inputs" in doc:
        inputs = doc["inputs"]
        if infomap is None:
            infomap = _infer_columnar_infomap(inputs, signame)
        tensors = _columnar_tensors(inputs, infomap)
        row = False
    else:
        raise JsonError("Missing 'inputs' or 'instances' key")
    for name, tensor in tensors.items():
        request.inputs[name].CopyFrom(tensor)
    return ParsedPredict(request, row)


def predict_request_from_json(body: bytes | str | dict, signature: SignatureSource, *,
                              model_name: str = "", version: int | None = None,
                              version_label: str | None = None) -> predict_pb2.PredictRequest:
    """Like parse_predict_request, without the format flag."""
    return parse_predict_request(body, signature, model_name=model_name, version=version,
                                 version_label=version_label).request


def _infer_row_infomap(instances: list, signame: str) -> dict[str, int]:
    first = instances[0]
    if type(first) is not dict or _is_b64_object(first):
        raise JsonError(f"Failed to get input map for signature: {signame or 'DEFAULT'}")
    return {name: _infer_dtype([e.get(name) for e in instances if type(e) is dict and name in e])
            for name in first}


def _infer_columnar_infomap(inputs: Any, signame: str) -> dict[str, int]:
    if type(inputs) is not dict or _is_b64_object(inputs) or not inputs:
        raise JsonError(f"Failed to get input map for signature: {signame or 'DEFAULT'}")
    return {name: _infer_dtype(v) for name, v in inputs.items()}


def _is_element_object(v: Any) -> bool:
    return type(v) is dict and not _is_b64_object(v)


def _row_tensors(instances: list, infomap: dict[str, int]) -> dict[str, tensor_pb2.TensorProto]:
    """json_tensor.cc FillTensorMapFromInstancesList."""
    if type(instances[0]) is not dict and len(infomap) > 1:
        raise JsonError("instances is a plain list, but expecting list of objects as multiple "
                        "input tensors required as per tensorinfo_map")
    objects = _is_element_object(instances[0])
    names = set(infomap)
    n = len(instances)
    # Fast path: regular data converted in bulk; anything else is redone
    # element by element below, which yields TF Serving's exact error.
    if objects:
        if all(_is_element_object(e) and e.keys() == names for e in instances):
            out = {}
            for name in sorted(names):
                col = [e[name] for e in instances]
                fast = _fast_leaves(col)
                conv = _fast_values(fast[1], infomap[name]) if fast is not None else None
                if conv is None:
                    break
                out[name] = _make_tensor(infomap[name], fast[0], conv)
            else:
                return out
    elif not any(_is_element_object(e) for e in instances):
        name = min(infomap)
        fast = _fast_leaves(instances)
        if fast is not None:
            conv = _fast_values(fast[1], infomap[name])
            if conv is not None:
                return {name: _make_tensor(infomap[name], fast[0], conv)}

    sizes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    values: dict[str, list] = {}

    def add_item(item: Any, name: str) -> None:
        if name not in infomap:
            raise JsonError(f"JSON object: does not have named input: {name}")
        shape, vals = _fill_slow(item, infomap[name])
        if name not in sizes:
            sizes[name] = len(vals)
            shapes[name] = shape
        elif sizes[name] != len(vals):
            raise JsonError(f"Expecting tensor size: {sizes[name]} but got: {len(vals)}")
        elif shapes[name] != shape:
            raise JsonError(f"Expecting shape {_shape_str(shapes[name])} but got: {_shape_str(shape)}")
        values.setdefault(name, []).extend(vals)

    for i, elem in enumerate(instances):
        if objects:
            if not _is_element_object(elem):
                raise JsonError(f"Expecting object but got list at item {i} of input list")
            for name, item in elem.items():
                try:
                    add_item(item, name)
                except JsonError as e:
                    raise JsonError(f"Failed to process element: {i} key: {name} of 'instances' "
                                    f"list. Error: {e.status_string()}") from None
            if set(elem) != names:
                raise JsonError(f"Failed to process element: {i} of 'instances' list. JSON object: "
                                f"{_vts(elem)} keys must be equal to: {','.join(sorted(names))}")
        else:
            if _is_element_object(elem):
                raise JsonError(f"Expecting value/list but got object at item {i} of input list")
            try:
                add_item(elem, min(infomap))
            except JsonError as e:
                raise JsonError(f"Failed to process element: {i} of 'instances' list. "
                                f"Error: {e.status_string()}") from None
    return {name: _make_tensor(infomap[name], [n] + shapes[name], vals)
            for name, vals in values.items()}


def _columnar_tensors(inputs: Any, infomap: dict[str, int]) -> dict[str, tensor_pb2.TensorProto]:
    """json_tensor.cc FillTensorMapFromInputsMap."""
    if type(inputs) is not dict or _is_b64_object(inputs):
        if len(infomap) > 1:
            raise JsonError("inputs is a plain value/list, but expecting an object as multiple "
                            "input tensors required as per tensorinfo_map")
        name = next(iter(infomap))
        shape, vals = _tensor_values(inputs, infomap[name])
        return {name: _make_tensor(infomap[name], shape, vals)}
    out = {}
    for name in sorted(infomap):
        if name not in inputs:
            raise JsonError(f"Missing named input: {name} in 'inputs' object.")
        shape, vals = _tensor_values(inputs[name], infomap[name])
        out[name] = _make_tensor(infomap[name], shape, vals)
    return out


# ---------------------------------------------------------------------------
# Tensor protos -> numpy
# ---------------------------------------------------------------------------

_TYPED_FIELD = {
    _DT_FLOAT: ("float_val", np.float32),
    _DT_DOUBLE: ("double_val", np.float64),
    _DT_INT32: ("int_val", np.int32),
    _DT_UINT8: ("int_val", np.uint8),
    _DT_INT16: ("int_val", np.int16),
    _DT_INT8: ("int_val", np.int8),
    _DT_UINT16: ("int_val", np.uint16),
    _DT_INT64: ("int64_val", np.int64),
    _DT_BOOL: ("bool_val", np.bool_),
    _DT_UINT32: ("uint32_val", np.uint32),
    _DT_UINT64: ("uint64_val", np.uint64),
    _DT_HALF: ("half_val", np.uint16),
    _DT_BFLOAT16: ("half_val", np.uint16),
    _DT_COMPLEX64: ("scomplex_val", np.float32),
    _DT_COMPLEX128: ("dcomplex_val", np.float64),
}
_WIRE_DTYPE = dict(_CONTENT_DTYPE)
_WIRE_DTYPE.update({_DT_UINT16: np.dtype("<u2"), _DT_COMPLEX64: np.dtype("<c8"),
                    _DT_COMPLEX128: np.dtype("<c16")})


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
    if dtype == _DT_STRING:
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
        per = 2 if dtype in (_DT_COMPLEX64, _DT_COMPLEX128) else 1
        vals = np.array(raw, dtype=npdt) if len(raw) else np.zeros(0, dtype=npdt)
        if per == 2:
            vals = vals[: (len(vals) // 2) * 2].view(wire) if len(vals) else np.zeros(0, dtype=wire)
        elif dtype in (_DT_HALF, _DT_BFLOAT16):
            vals = vals.astype("<u2")
        else:
            vals = vals.astype(wire, copy=False)
        if len(vals) >= n:
            a = vals[:n]
        elif len(vals) == 0:
            a = np.zeros(n, dtype=vals.dtype)
        else:
            a = np.concatenate([vals, np.repeat(vals[-1:], n - len(vals))])
    if dtype == _DT_HALF:
        a = a.view("<f2")
    elif dtype == _DT_BFLOAT16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.reshape(shape)


# ---------------------------------------------------------------------------
# Tensors -> JSON text
# ---------------------------------------------------------------------------

_IND = "    "


def _leaf_tokens(name: str, t: tensor_pb2.TensorProto, depth: int) -> tuple[list[int], list[str]]:
    """Shape and flat value tokens; `depth` = open containers around a leaf
    (a b64 object's layout depends on it)."""
    shape = [d.size for d in t.tensor_shape.dim]
    dtype = t.dtype
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n == 0:  # TF Serving checks the type per value written: none here.
        return shape, []
    if dtype == _DT_STRING:
        a = tensor_to_ndarray(t).ravel().tolist()
        if name.endswith("_bytes"):
            pre = '{\n' + _IND * (depth + 1) + '"b64": "'
            post = '"\n' + _IND * depth + "}"
            return shape, [pre + base64.b64encode(b).decode("ascii") + post for b in a]
        return shape, [_jstr(_bytes_to_text(b)) for b in a]
    if dtype in (_DT_FLOAT, _DT_HALF, _DT_BFLOAT16):
        return shape, _float_tokens(tensor_to_ndarray(t).astype(np.float32), double=False)
    if dtype == _DT_DOUBLE:
        return shape, _float_tokens(tensor_to_ndarray(t), double=True)
    if dtype in (_DT_INT32, _DT_INT16, _DT_INT8, _DT_UINT8, _DT_INT64, _DT_UINT32, _DT_UINT64):
        return shape, list(map(str, tensor_to_ndarray(t).ravel().tolist()))
    if dtype == _DT_BOOL:
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


# ---------------------------------------------------------------------------
# Classify / Regress
# ---------------------------------------------------------------------------

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
                if not _lossless(v, _FLOAT_MAX_INT, _FLT_MAX):
                    raise _lossy_error(v, "float")
                kind = "float_list"
                values.append(_as_double(v))
            else:
                if kind not in (None, "int64_list"):
                    raise incompatible()
                if v > _INT64_MAX:
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


# ---------------------------------------------------------------------------
# Model status and metadata
# ---------------------------------------------------------------------------

def _enum_name(enum: Any, value: int) -> Any:
    try:
        return enum.Name(value)
    except ValueError:
        return value


def model_status_to_json(response: get_model_status_pb2.GetModelStatusResponse) -> bytes:
    """GetModelStatusResponse as TF Serving prints it (protobuf JSON, all
    fields, one-space indent)."""
    state_enum = get_model_status_pb2.ModelVersionStatus.State
    out = []
    for s in response.model_version_status:
        entry: dict[str, Any] = {"version": str(s.version), "state": _enum_name(state_enum, s.state)}
        if s.HasField("status"):
            entry["status"] = {"error_code": _enum_name(error_codes_pb2.Code, s.status.error_code),
                               "error_message": s.status.error_message}
        out.append(entry)
    return _encode_out(json.dumps({"model_version_status": out}, indent=1, ensure_ascii=False) + "\n")


def model_metadata_to_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> bytes:
    """GetModelMetadataResponse as TF Serving prints it:
    {"model_spec": {...}, "metadata": {"signature_def": <SignatureDefMap>}}."""
    from google.protobuf import json_format

    if "signature_def" not in response.metadata:
        raise JsonError("Failed to find 'signature_def' key in the GetModelMetadataResponse "
                        "metadata map.", "INTERNAL")
    sdm = get_model_metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(sdm):
        raise JsonError("Failed to unpack 'Any' object to 'SignatureDefMap'.", "INTERNAL")
    opts = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    doc = {
        "model_spec": json_format.MessageToDict(response.model_spec, **opts),
        "metadata": {"signature_def": json_format.MessageToDict(sdm, **opts)},
    }
    return _encode_out(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
