"""The SDK's resource groups on `cloudml.Client`: `client.jobs`
(`cloudml.sdk.jobs.Jobs`), `client.models` (`cloudml.sdk.models.Models`),
`client.studies` (`cloudml.sdk.studies.Studies`), and their typed results
(`cloudml.sdk.types`). The CLI's `jobs`, `models` and `hp` commands call
these; nothing else talks to those services."""
from cloudml.sdk.types import Job, LogLine, MetricSeries, Metrics, Model, ModelVersion, Study, Trial

__all__ = ["Job", "LogLine", "MetricSeries", "Metrics", "Model", "ModelVersion", "Study", "Trial"]
