"""Errors and their HTTP status, as TF Serving maps gRPC codes."""
from __future__ import annotations

from typing import Any

from services.gateway.tfs_json.strings import _encode_out, _jstr


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
