"""Keeping etcd small: compaction on a schedule, defragmentation past a
size, and the store's size and key counts as Prometheus metrics.

etcd keeps every revision of every key until a compaction drops those
older than a revision; the space they held is reused but the file never
shrinks until a defragmentation. Run by one leader per platform (the jobs
service's), every `compact_seconds`:

- compact at (current revision - `keep_revisions`): watchers further behind
  relist (`services.common.etcd.PrefixWatcher`);
- defragment when the file is at least `defrag_bytes` and at least a quarter
  of it, or half of `defrag_bytes`, is free (the member stalls reads and
  writes for the duration, about a second per 100 MB here, so not more often
  than needed);

and every `stats_seconds` exports

    cloudml_etcd_db_size_bytes            the member's file
    cloudml_etcd_db_size_in_use_bytes     what live data and kept history use of it
    cloudml_etcd_revision                 the store's revision
    cloudml_etcd_keys{prefix}             keys under each owner's prefix (this platform's namespace)
    cloudml_etcd_compactions_total, cloudml_etcd_defragmentations_total
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common import errors
from services.common.etcd import Etcd

log = logging.getLogger(__name__)

#: the owners' prefixes counted in cloudml_etcd_keys
PREFIXES = ("/cloudml/auth/", "/cloudml/jobs/", "/cloudml/jobs/jobs/", "/cloudml/models/", "/cloudml/tuner/",
            "/cloudml/registry/")


@dataclass(frozen=True)
class EtcdMaintenanceSettings:
    """How etcd is kept small (flags --etcd-compact-seconds, --etcd-keep-revisions,
    --etcd-defrag-bytes, --etcd-stats-seconds of the service that runs it)."""

    compact_seconds: float = 300.0
    keep_revisions: int = 10_000
    defrag_bytes: int = 128 << 20
    stats_seconds: float = 30.0


class EtcdMaintenanceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else CollectorRegistry()
        self.db_size = Gauge("cloudml_etcd_db_size_bytes", "Size of etcd's database file.", registry=registry)
        self.db_in_use = Gauge("cloudml_etcd_db_size_in_use_bytes", "Bytes of etcd's file in use.",
                               registry=registry)
        self.revision = Gauge("cloudml_etcd_revision", "etcd's current revision.", registry=registry)
        self.keys = Gauge("cloudml_etcd_keys", "Keys under an owner's prefix.", ("prefix",), registry=registry)
        self.compactions = Counter("cloudml_etcd_compactions_total", "Compactions this process ran.",
                                   registry=registry)
        self.defrags = Counter("cloudml_etcd_defragmentations_total", "Defragmentations this process ran.",
                               registry=registry)


class EtcdMaintenance:
    def __init__(self, etcd: Etcd, settings: EtcdMaintenanceSettings = EtcdMaintenanceSettings(),
                 metrics: EtcdMaintenanceMetrics | None = None, clock=time.monotonic):
        self.etcd = etcd
        self.settings = settings
        self.metrics = metrics or EtcdMaintenanceMetrics()
        self.clock = clock
        self.compacted_at = 0  # the revision of the last compaction this process ran

    async def refresh_metrics(self) -> None:
        status = await self.etcd.status()
        self.metrics.db_size.set(status.dbSize)
        self.metrics.db_in_use.set(status.dbSizeInUse or status.dbSize)
        self.metrics.revision.set(status.header.revision)
        for prefix in PREFIXES:
            self.metrics.keys.labels(prefix).set(await self.etcd.count_prefix(prefix))

    async def compact(self) -> int:
        """Compacts away revisions older than the last `keep_revisions`;
        returns the compaction revision (0: nothing to do)."""
        revision = (await self.etcd.status()).header.revision - self.settings.keep_revisions
        if revision <= self.compacted_at or revision <= 0:
            return 0
        await self.etcd.compact(revision)
        self.compacted_at = revision
        self.metrics.compactions.inc()
        log.info("etcd compacted at revision %d", revision)
        return revision

    async def defragment_if_needed(self) -> bool:
        status = await self.etcd.status()
        size, in_use = status.dbSize, status.dbSizeInUse or status.dbSize
        if size < self.settings.defrag_bytes or size - in_use < min(size // 4, self.settings.defrag_bytes // 2):
            return False
        started = time.perf_counter()
        await self.etcd.defragment()
        self.metrics.defrags.inc()
        log.info("etcd defragmented: %d -> %d bytes in %.1f s", size, (await self.etcd.status()).dbSize,
                 time.perf_counter() - started)
        return True

    async def run(self) -> None:
        """Until cancelled (the leader's loop)."""
        next_compaction = self.clock()
        while True:
            try:
                if self.clock() >= next_compaction:
                    next_compaction = self.clock() + self.settings.compact_seconds
                    await self.compact()
                    await self.defragment_if_needed()
                await self.refresh_metrics()
            except errors.Unavailable as err:
                log.info("etcd maintenance interrupted: %s", err.message)
            except Exception:  # noqa: BLE001 - keep maintaining whatever happens
                log.exception("etcd maintenance failed")
            await asyncio.sleep(min(self.settings.stats_seconds, self.settings.compact_seconds))
