"""Measures how long callers keep failing after a killed service is back.

A `Probe` calls something in a loop from its own thread (short deadline,
short pause) and records each call's start, end and status code. Once the
replacement is known to be SERVING (`serving_at`, from `wait_health`), the
window is the time from then until the end of the last failed call that
started after it: how long a caller keeps seeing UNAVAILABLE (or a deadline)
although the service already answers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

CALL_DEADLINE = 0.25
PAUSE = 0.02


@dataclass
class Probe:
    name: str
    call: Callable[[float], object]  # call(timeout) -> response; raises grpc.RpcError
    records: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "Probe":
        self._thread = threading.Thread(target=self._run, name=f"probe-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.call(CALL_DEADLINE)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            self.records.append((began, time.monotonic(), code))
            self._stop.wait(PAUSE)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def wait_ok(self, after: float, timeout: float = 30.0) -> None:
        """Waits for a successful call that started after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(code == grpc.StatusCode.OK and began >= after for began, _, code in list(self.records)):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no successful call since {after:.3f}: {self.summary(after)}")

    def failures_since(self, since: float) -> list[tuple[float, float, grpc.StatusCode]]:
        return [r for r in list(self.records) if r[0] >= since and r[2] != grpc.StatusCode.OK]

    def outage(self, since: float) -> float:
        """Seconds from `since` to the first call (started after `since`) that succeeded."""
        for began, ended, code in list(self.records):
            if began >= since and code == grpc.StatusCode.OK:
                return ended - since
        return float("inf")

    def window(self, serving_at: float) -> float:
        """Seconds callers still failed after the service was SERVING (0: none)."""
        failed = [ended for began, ended, code in list(self.records)
                  if code != grpc.StatusCode.OK and ended > serving_at]
        return max(failed) - serving_at if failed else 0.0

    def summary(self, since: float) -> str:
        codes: dict[str, int] = {}
        for began, _, code in list(self.records):
            if began >= since:
                codes[code.name] = codes.get(code.name, 0) + 1
        return ", ".join(f"{k}={v}" for k, v in sorted(codes.items()))


def wait_health(address_of: Callable[[], str | None], timeout: float = 60.0) -> float:
    """Polls (every 10 ms) the health of the address `address_of()` returns
    until it is SERVING; returns the monotonic time it was first seen so."""
    deadline = time.monotonic() + timeout
    channel, current = None, None
    try:
        while time.monotonic() < deadline:
            address = address_of()
            if address and address != current:
                if channel:
                    channel.close()
                channel, current = grpc.insecure_channel(address), address
            if channel is not None:
                try:
                    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic()
                except grpc.RpcError:
                    pass
            time.sleep(0.01)
    finally:
        if channel:
            channel.close()
    raise AssertionError(f"not SERVING within {timeout} s (address {current})")
