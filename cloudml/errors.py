"""Errors the SDK raises, one class per gRPC status code.

Every failed call made through `cloudml.Client` raises a `CloudMLError`
subclass carrying the status code's name (`err.code`, e.g. "NOT_FOUND") and
the server's message (`err.message`), so callers can write

    try:
        client.get_tenant("team-a")
    except cloudml.errors.NotFound:
        ...

Errors raised before anything reaches a server have their own classes:
`ConfigurationError` (no credentials, unreadable config file) and
`ConnectionFailed` (the endpoint cannot be reached; a subclass of
`Unavailable`). This module is client-side only and does not import grpc.
"""
from __future__ import annotations

# The trailer the auth service sets on a reservation that fits the limits but
# not the current usage ("queue and retry after a release").
RETRY_TRAILER = "cloudml-retry"


class CloudMLError(Exception):
    """Base class. `code` is a gRPC status code name, `message` the detail."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, trailers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # Trailing metadata of the failed call (lets machines tell cases apart).
        self.trailers = tuple(trailers)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class Cancelled(CloudMLError):
    code = "CANCELLED"


class Unknown(CloudMLError):
    code = "UNKNOWN"


class InvalidArgument(CloudMLError):
    code = "INVALID_ARGUMENT"


class DeadlineExceeded(CloudMLError):
    code = "DEADLINE_EXCEEDED"


class NotFound(CloudMLError):
    code = "NOT_FOUND"


class AlreadyExists(CloudMLError):
    code = "ALREADY_EXISTS"


class PermissionDenied(CloudMLError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(CloudMLError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(CloudMLError):
    code = "FAILED_PRECONDITION"


class QuotaBusy(FailedPrecondition):
    """A reservation fits the quota's limits but not its usage now: a retry
    after some work releases its reservation may succeed."""


class Aborted(CloudMLError):
    """A concurrent update won a race; the call may be retried."""

    code = "ABORTED"


class OutOfRange(CloudMLError):
    code = "OUT_OF_RANGE"


class Unimplemented(CloudMLError):
    code = "UNIMPLEMENTED"


class Internal(CloudMLError):
    code = "INTERNAL"


class Unavailable(CloudMLError):
    code = "UNAVAILABLE"


class DataLoss(CloudMLError):
    code = "DATA_LOSS"


class Unauthenticated(CloudMLError):
    code = "UNAUTHENTICATED"


class ConnectionFailed(Unavailable):
    """The platform's endpoint could not be reached at all."""

    def __init__(self, endpoint: str, detail: str):
        super().__init__(f"cannot reach the platform at {endpoint}: {detail}")
        self.endpoint = endpoint

    def __str__(self) -> str:
        return self.message


class SpecError(InvalidArgument, ValueError):
    """A job, study or model spec (a file, a dict or keyword arguments) is
    malformed; raised on the client, before anything is sent. The CLI shows
    it as a usage error (exit 2)."""

    def __str__(self) -> str:
        return self.message


class ConfigurationError(CloudMLError):
    """Missing or unusable client settings (credentials, config file)."""

    code = "CONFIGURATION"

    def __str__(self) -> str:
        return self.message


_BY_CODE: dict[str, type[CloudMLError]] = {
    cls.code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}

# grpc's own words when no connection could be made (as opposed to a server
# that answered UNAVAILABLE).
_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "connections to all backends failing",
    "name resolution",
    "no route to host",
    "network is unreachable",
    "connection reset",
    "socket closed",
    "empty address list",
    "errors resolving",
    "address lookup failed",
)


def from_rpc_error(err, endpoint: str = "") -> CloudMLError:
    """The `CloudMLError` for a `grpc.RpcError` (anything with code()/details())."""
    try:
        code = err.code()
        name = getattr(code, "name", None) or str(code)
        message = err.details() or ""
    except Exception:  # not a call error: e.g. grpc.RpcError() raised by hand
        return Unknown(str(err) or type(err).__name__)
    try:
        trailers = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if isinstance(v, str))
    except Exception:
        trailers = ()
    if name == "UNAVAILABLE" and any(s in message.lower() for s in _CONNECT_FAILURES):
        return ConnectionFailed(endpoint or "the configured endpoint", _short_connect_detail(message))
    if name == "FAILED_PRECONDITION" and (RETRY_TRAILER, "quota") in trailers:
        return QuotaBusy(message, trailers=trailers)
    cls = _BY_CODE.get(name, Unknown)
    return cls(message or name, code=name, trailers=trailers)


def _short_connect_detail(message: str) -> str:
    """grpc's "failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:8500: Failed to connect to remote host: Connection refused"
    -> "Connection refused"."""
    tail = message.rsplit(": ", 1)[-1].strip()
    return tail or message
