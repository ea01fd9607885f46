"""The SDK's resource groups on `cloudml.Client`: `client.jobs`
(`cloudml.sdk.jobs.Jobs`), `client.models` (`cloudml.sdk.models.Models`),
`client.studies` (`cloudml.sdk.studies.Studies`), `client.tensorboards`
(`cloudml.sdk.tensorboards.TensorBoards`), `client.dev`
(`cloudml.sdk.dev.DevEnvironments`), and their typed results
(`cloudml.sdk.types`). The CLI's `jobs`, `models`, `hp`, `tensorboard` and
`dev` commands call these; nothing else talks to those services."""
from cloudml.sdk.types import (DevEnvironment, Export, Job, LogLine, MetricSeries, Metrics, Model, ModelVersion,
                                Study, TensorBoard, Trial)

__all__ = ["DevEnvironment", "Export", "Job", "LogLine", "MetricSeries", "Metrics", "Model", "ModelVersion", "Study",
           "TensorBoard", "Trial"]
