"""Autoscaling a version's replicas on in-flight requests.

The rule
--------
Every `scrape_interval` (1 s) the reconciler reads each AVAILABLE replica's
gauge `cloudml_model_server_inflight_requests` (calls a model server has
accepted and not yet answered: queued for a batch or running) from its
Prometheus endpoint (`--metrics-listen`, port in its port file), and sums them
per version: `total`. Then

    wanted  = ceil(total / target)            target: in-flight requests per replica (default 4)
    desired = clamp(wanted, min_replicas, max_replicas)

- Scale up at once: as soon as one sample gives a `desired` above the current
  count, the reconciler starts the extra replicas (one scrape interval after
  the load arrives, at most).
- Scale down slowly: only when every sample of the last `scale_down_delay`
  seconds (default 60 s, and at least that long since the last change) wanted
  fewer replicas, and then to the largest count any of those samples wanted.
  A brief lull never drops a replica that the next burst needs again.

Why requests never queue past a bound first: a replica refuses work beyond
its batching queue (max_batch_size x max_enqueued_batches requests, UNAVAILABLE
as TF Serving does). The target (4 by default) is far below that bound, so the
version has asked for another replica long before any replica's queue fills:
at `target` in flight per replica it scales, while the replicas keep
absorbing requests up to their queue bound during the seconds a new replica
needs to load. Versions with min_replicas == max_replicas are never scraped.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from cloudml.models.v1 import models_service_pb2 as pb

log = logging.getLogger(__name__)

S = pb.ModelVersionState
# The model server's gauge of calls it is handling (queued for a batch or running).
INFLIGHT_METRICS = ("cloudml_model_server_inflight_requests", "cloudml_model_inflight_requests")
METRICS_MAX = 1 << 20


@dataclass
class _History:
    samples: deque = field(default_factory=deque)  # (time, wanted)
    # The count last seen in force, and since when (a change restarts the
    # scale-down delay).
    current: int | None = None
    since: float = 0.0


class Autoscaler:
    def __init__(self, target: float = 4.0, scale_down_delay: float = 60.0, sample_interval: float = 1.0):
        if target <= 0:
            raise ValueError("target in-flight requests per replica must be positive")
        self.target = target
        self.scale_down_delay = scale_down_delay
        # A window counts as full when its first sample is at most this much
        # younger than the window (samples come every sample_interval).
        self._slack = 1.5 * sample_interval
        self._history: dict[str, _History] = {}

    def wanted(self, total_inflight: float) -> int:
        return math.ceil(max(total_inflight, 0) / self.target)

    def observe(self, key: str, total_inflight: float, now: float) -> None:
        """Records one sample of a version's summed in-flight requests."""
        history = self._history.setdefault(key, _History())
        history.samples.append((now, self.wanted(total_inflight)))
        horizon = now - self.scale_down_delay
        while history.samples and history.samples[0][0] < horizon:
            history.samples.popleft()

    def desired(self, key: str, current: int, min_replicas: int, max_replicas: int, now: float) -> int:
        """The replica count to drive toward, given the one in force. Calling
        it again with the same arguments gives the same answer."""
        def clamp(n: int) -> int:
            return min(max(n, min_replicas), max_replicas)

        current = clamp(current)
        history = self._history.get(key)
        if history is None or not history.samples or min_replicas == max_replicas:
            return current
        if history.current != current:
            history.current, history.since = current, now
        latest = clamp(history.samples[-1][1])
        if latest > current:
            return latest
        if now - history.since < self.scale_down_delay:
            return current
        if history.samples[0][0] > now - self.scale_down_delay + self._slack:
            return current  # not a full window of samples yet (e.g. just adopted)
        return min(clamp(max(w for _, w in history.samples)), current)

    def forget(self, key: str) -> None:
        self._history.pop(key, None)


class InflightScraper:
    """The scrape behind the rule above, for the reconciler (a mixin of
    `Reconciler`): uses its `settings`, `clock`, `replicas`, `versions`,
    `autoscaler`, `_endpoint_state()`, `_socket_path()` and `wake()`."""

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scrape_interval)
            try:
                await self._scrape()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a scrape must never stop the loop
                log.exception("autoscaling scrape failed")

    async def _scrape(self) -> None:
        """Reads each autoscaled AVAILABLE replica's in-flight gauge from its
        metrics socket (`<replica id>.metrics.sock`, HTTP)."""
        targets: dict[str, list[str]] = defaultdict(list)
        for record in list(self.replicas.values()):
            version = self.versions.items.get(record.version_key)
            if version is None or version.min_replicas == version.max_replicas or record.stopping:
                continue
            if self._endpoint_state(record) != S.MODEL_VERSION_STATE_AVAILABLE:
                continue
            if record.address.startswith("unix:"):
                targets[record.version_key].append(self._socket_path(record, "metrics"))
        now = self.clock()
        for vkey, paths in targets.items():
            values = await asyncio.gather(*(self._inflight(path) for path in paths))
            total = sum(v for v in values if v is not None)
            self.autoscaler.observe(vkey, total, now)
            version = self.versions.items.get(vkey)
            if version is not None:
                current = version.desired_replicas or version.min_replicas
                if self.autoscaler.desired(vkey, current, version.min_replicas, version.max_replicas,
                                           now) != current:
                    self.wake()

    async def _inflight(self, path: str) -> float | None:
        timeout = max(self.settings.scrape_interval * 0.8, 0.2)
        try:
            text = await asyncio.wait_for(scrape_unix(path, METRICS_MAX), timeout)
            families = list(text_string_to_metric_families(text))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
            return None
        for family in families:
            if family.name in INFLIGHT_METRICS:
                return sum(sample.value for sample in family.samples)
        return None


async def scrape_unix(path: str, limit: int) -> str:
    """GET /metrics of a replica's Unix socket (HTTP/1.0, so the body ends at
    the close): a dozen lines rather than an HTTP client library's ~10 MB in
    every models process. ValueError for an answer other than 200."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: replica\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1:2]
        if status != [b"200"]:
            raise ValueError(f"metrics answered {head[:40]!r}")
        body = bytearray()
        while len(body) < limit and (chunk := await reader.read(limit - len(body))):
            body += chunk
        return body.decode(errors="replace")
    finally:
        writer.close()
