"""Typed domain errors and the one table that maps them to gRPC status codes.

Core code (`core.py` of each service) raises these and never touches gRPC; the
error interceptor (`services.common.interceptors`) turns them into status codes.
Anything else a handler raises becomes INTERNAL with a request id, and its
traceback goes to the log only.
"""
from __future__ import annotations

import grpc


class CloudMLError(Exception):
    """Base of every error that is meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, trailers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        # Extra trailing metadata that lets machines tell cases apart.
        self.trailers = trailers


class InvalidArgument(CloudMLError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CloudMLError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CloudMLError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CloudMLError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(CloudMLError):
    """A compare-and-swap lost its race; the caller may retry."""

    code = grpc.StatusCode.ABORTED


class PermissionDenied(CloudMLError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CloudMLError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CloudMLError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CloudMLError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CloudMLError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CloudMLError):
    code = grpc.StatusCode.UNIMPLEMENTED


# The trailer that marks "does not fit now, retry after a release" answers.
RETRY_TRAILER = "cloudml-retry"


class QuotaBusy(FailedPrecondition):
    """A reservation fits the limits but not the current usage: queue and retry."""

    def __init__(self, message: str):
        super().__init__(message, trailers=((RETRY_TRAILER, "quota"),))


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Conflict,
        PermissionDenied, Unauthenticated, ResourceExhausted, Unavailable,
        DeadlineExceeded, Unimplemented,
    )
}


def from_rpc_error(err: grpc.RpcError) -> CloudMLError:
    """Turns a failed outbound call back into a typed error (for core code
    that calls another service and wants to branch on the outcome)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    trailers = ()
    try:
        trailers = tuple((k, v) for k, v in (err.trailing_metadata() or ()))
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        trailers = ()
    if code == grpc.StatusCode.FAILED_PRECONDITION and (RETRY_TRAILER, "quota") in trailers:
        return QuotaBusy(details or "")
    cls = _BY_CODE.get(code, CloudMLError)
    error = cls(details or code.name, trailers=trailers)
    if cls is CloudMLError:
        error.code = code
    return error
