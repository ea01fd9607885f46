"""What `client.tensorboards` and `client.dev` (and so `cloudml tensorboard|dev`)
share: calls on one service's stub, and waiting for a server to run."""
from __future__ import annotations

import importlib
import time
from typing import Callable, TypeVar

from cloudml import errors

T = TypeVar("T")

#: seconds between two looks at a starting server
POLL = 0.25


class Group:
    """A resource group of the client (`client.<group>`): unary calls on one
    service's stub, `_service` = (module of cloudml.jobs.v1, stub class)."""

    _service: tuple[str, str] = ("", "")

    def __init__(self, client):
        self._client = client

    @property
    def _stub(self):
        module, stub_class = self._service
        return self._client.stub(getattr(importlib.import_module(f"cloudml.jobs.v1.{module}"), stub_class))

    def _rpc(self, method: str, request):
        """`method` of the stub with `request`; gRPC errors become `CloudMLError`s."""
        return self._client.call(getattr(self._stub, method), request)


def wait_running(current: T, get: Callable[[T], T], what: str, timeout: float, poll: float | None = None) -> T:
    """Polls `get(current)` while `current.state` is STARTING, for at most
    `timeout` seconds, and returns it once RUNNING. FailedPrecondition
    ("<what> NAME is <state>: <message>") when it ended up in any other
    state, or was still starting at the deadline. `poll`: seconds between
    looks (default POLL)."""
    poll = POLL if poll is None else poll
    deadline = time.monotonic() + timeout
    while current.state == "STARTING" and time.monotonic() < deadline:
        time.sleep(poll)
        current = get(current)
    if current.state != "RUNNING":
        raise errors.FailedPrecondition(f"{what} {current.name} is {current.state.lower()}: {current.message}",
                                        code="FAILED_PRECONDITION")
    return current
