"""JSON text helpers: rapidjson's writer, as TF Serving configures it."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from services.gateway.tfs_json.dtypes import DT, INT64_MIN, RJ_FLOAT_RANGE, UINT64_MAX
from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.strings import _jstr


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
        return "int" if INT64_MIN <= v <= UINT64_MAX else "double"
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
        if -RJ_FLOAT_RANGE <= d <= RJ_FLOAT_RANGE:
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
