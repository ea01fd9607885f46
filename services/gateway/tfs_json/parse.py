"""Parsing request bodies as TF Serving's rapidjson reads them."""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from services.gateway.tfs_json.errors import JsonError
from services.gateway.tfs_json.text import _vts


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
