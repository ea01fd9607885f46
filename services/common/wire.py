"""Reading protobuf wire format by hand, for the few places that must look at
a field without parsing (or without having the schema of) the whole message."""
from __future__ import annotations


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decodes a base-128 varint at `pos`; returns (value, next position)."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
