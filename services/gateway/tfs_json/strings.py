"""JSON string literals and bytes, as rapidjson writes them."""
from __future__ import annotations

import json


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
