"""The jobs service's domain metrics (Prometheus), in the process's registry:

    cloudml_jobs_submitted_total                  jobs created by SubmitJob
    cloudml_jobs_finished_total{state,reason}     jobs that reached a final state (leader)
    cloudml_jobs_queued                           jobs waiting in QUEUED (leader, per pass)
    cloudml_jobs_active                           jobs the leader drives (PREPARING..CANCELLING)
    cloudml_jobs_start_seconds                    submit -> replicas started, first attempt
    cloudml_jobs_live                             jobs not yet ended, the only ones in memory
    cloudml_jobs_archived_total                   jobs moved from etcd to the archive (leader)
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class JobsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else CollectorRegistry()
        self.submitted = Counter("cloudml_jobs_submitted_total", "Train jobs created by SubmitJob.",
                                 registry=registry)
        self.finished = Counter("cloudml_jobs_finished_total", "Train jobs that reached a final state.",
                                ("state", "reason"), registry=registry)
        self.queued = Gauge("cloudml_jobs_queued", "Train jobs waiting in QUEUED.", registry=registry)
        self.active = Gauge("cloudml_jobs_active", "Train jobs driven by this scheduler.", registry=registry)
        self.live = Gauge("cloudml_jobs_live", "Train jobs not yet ended (held in memory).", registry=registry)
        self.archived = Counter("cloudml_jobs_archived_total", "Train jobs moved from etcd to the archive.",
                                registry=registry)
        self.start_seconds = Histogram(
            "cloudml_jobs_start_seconds", "Time from submission to the first attempt's replicas started.",
            registry=registry, buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
        )
