"""Errors the model server answers with, in TF Serving's codes and words.

TF Serving returns `tensorflow::Status` codes, which share gRPC's numbering;
`ServingError` carries one to the servicer, the single place that turns it
into a gRPC status. The constructors below hold TF Serving's messages so the
modules that detect a case do not each spell them.
"""
from __future__ import annotations

import grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: The cancellation message (`Task.cancel(msg)`) of a call whose deadline passed
#: (frames.py enforces deadlines by cancelling): `Servicer.invoke` counts it
#: as DEADLINE_EXCEEDED rather than CANCELLED.
CANCEL_DEADLINE = "deadline exceeded"


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def from_tf_error(err: Exception) -> ServingError:
    """A TensorFlow OpError (its error_code is a gRPC code number) as a ServingError."""
    code = _CODES.get(getattr(err, "error_code", 2), grpc.StatusCode.UNKNOWN)
    message = getattr(err, "message", None) or str(err)
    return ServingError(code, message)


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def unimplemented(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, message)


def internal(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INTERNAL, message)


# --- TF Serving's messages ---------------------------------------------------------------

MISSING_MODEL_SPEC = "Missing ModelSpec"
NO_MODEL_NAME = "ModelSpec has no name specified."


def servable_not_found(name: str, version: int | None) -> ServingError:
    """ServerCore's answer for a model or version it does not serve."""
    request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
    return not_found(f"Servable not found for request: {request}")


def unknown_label(label: str) -> ServingError:
    return invalid(f"Unrecognized servable version label: {label}")


def type_mismatch(index: int, expected: str, provided: str) -> ServingError:
    """What a TensorFlow session says when a fed tensor has the wrong dtype."""
    return invalid(f"Expects arg[{index}] to be {expected} but {provided} is provided")
