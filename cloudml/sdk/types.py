"""Typed results of the SDK: thin, read-only wrappers over the platform's
messages. Each names the fields people use (states as short upper-case
strings: "RUNNING", "AVAILABLE"; times as aware `datetime`s), and keeps the
whole message as `.proto` for everything else; `to_dict()` is its JSON form
(the CLI's `-o json`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

JOB_FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
STUDY_FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def enum_name(enum_type, value: int, prefix: str) -> str:
    """JOB_STATE_RUNNING -> "RUNNING" (the number as text when unknown)."""
    try:
        return enum_type.Name(value).removeprefix(prefix)
    except ValueError:
        return str(value)


def timestamp(ts) -> datetime | None:
    """A protobuf Timestamp as an aware UTC datetime (None when unset)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


def replica_name(replica) -> str:
    """ReplicaId(type=WORKER, index=1) -> "worker-1"."""
    from cloudml.jobs.v1 import jobs_service_pb2 as pb

    return f"{enum_name(pb.ReplicaType, replica.type, 'REPLICA_TYPE_').lower()}-{replica.index}"


def parameter_value(value) -> Any:
    """A tuner ParameterValue as a Python int, float or str."""
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind else None


def parameter_text(value) -> str:
    """A tuner ParameterValue as the CLI shows it: 3.0 -> "3", 0.1 -> "0.1"."""
    kind = value.WhichOneof("kind")
    if kind == "double_value":
        x = value.double_value
        return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)
    if kind == "int_value":
        return str(value.int_value)
    return value.string_value


def params_text(params) -> str:
    """A trial's parameters (a ParameterValue map) as "lr=0.1 opt=sgd", in name order."""
    return " ".join(f"{k}={parameter_text(params[k])}" for k in sorted(params))


class Wrapper:
    """Base of the typed results: `.proto` is the message, `to_dict()` its JSON form."""

    __slots__ = ("proto",)

    def __init__(self, proto):
        self.proto = proto

    def to_dict(self) -> dict:
        from cloudml.cli.base import message_to_dict  # noqa: PLC0415 - stdlib + protobuf only

        return message_to_dict(self.proto)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.proto == self.proto

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._repr_fields)
        return f"{type(self).__name__}({shown})"

    _repr_fields: tuple[str, ...] = ()


# --- jobs -------------------------------------------------------------------------------


class Job(Wrapper):
    """A train job (cloudml.jobs.v1.TrainJob). `created` is set by
    `jobs.submit`: False when the same spec had already been submitted."""

    __slots__ = ("created",)
    _repr_fields = ("name", "state", "reason")

    def __init__(self, proto, created: bool | None = None):
        super().__init__(proto)
        self.created = created

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def tenant(self) -> str:
        return self.proto.tenant

    @property
    def state(self) -> str:
        """QUEUED, PREPARING, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED or RESTARTING."""
        from cloudml.jobs.v1 import jobs_service_pb2 as pb

        return enum_name(pb.JobState, self.proto.state, "JOB_STATE_")

    @property
    def reason(self) -> str:
        return self.proto.reason

    @property
    def message(self) -> str:
        return self.proto.message

    @property
    def attempts(self) -> int:
        return self.proto.attempts

    @property
    def output_path(self) -> str:
        return self.proto.spec.output_path

    @property
    def create_time(self) -> datetime | None:
        return timestamp(self.proto.create_time)

    @property
    def end_time(self) -> datetime | None:
        return timestamp(self.proto.end_time)

    @property
    def replicas(self) -> dict[str, str]:
        """{"master-0": "SUCCEEDED", ...}."""
        from cloudml.jobs.v1 import jobs_service_pb2 as pb

        return {replica_name(r.replica): enum_name(pb.ReplicaState, r.state, "REPLICA_STATE_")
                for r in self.proto.replicas}

    @property
    def done(self) -> bool:
        """True once the job ended (SUCCEEDED, FAILED or CANCELLED)."""
        return self.state in JOB_FINAL

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


class LogLine(Wrapper):
    """One line of a replica's output (or of the job itself, replica None)."""

    __slots__ = ()
    _repr_fields = ("replica", "text")

    @property
    def replica(self) -> str | None:
        return replica_name(self.proto.replica) if self.proto.HasField("replica") else None

    @property
    def text(self) -> str:
        return self.proto.text

    @property
    def attempt(self) -> int:
        return self.proto.attempt

    @property
    def time(self) -> datetime | None:
        return timestamp(self.proto.time)

    def __str__(self) -> str:
        return f"[{self.replica or 'job'}] {self.text}"


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float
    attempt: int


class MetricSeries(Wrapper):
    """One metric of one replica: `points` in step order."""

    __slots__ = ()
    _repr_fields = ("name", "replica", "source")

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def replica(self) -> str | None:
        return replica_name(self.proto.replica) if self.proto.HasField("replica") else None

    @property
    def source(self) -> str:
        """REPORTED (cloudml.report) or TENSORBOARD (event files)."""
        from cloudml.jobs.v1 import jobs_service_pb2 as pb

        return enum_name(pb.MetricSource, self.proto.source, "METRIC_SOURCE_")

    @property
    def points(self) -> list[MetricPoint]:
        return [MetricPoint(p.step, p.value, p.attempt) for p in self.proto.points]

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self.proto.points]

    @property
    def values(self) -> list[float]:
        return [p.value for p in self.proto.points]


class Metrics(list):
    """The `MetricSeries` of a job (a list), with `names` and `series(name)`;
    `.proto` is the GetJobMetricsResponse."""

    def __init__(self, proto):
        super().__init__(MetricSeries(s) for s in proto.series)
        self.proto = proto

    @property
    def names(self) -> list[str]:
        return sorted({s.name for s in self})

    def series(self, name: str, replica: str | None = None) -> list[MetricSeries]:
        """Every series of metric `name` (of one `replica` when given)."""
        return [s for s in self if s.name == name and (replica is None or s.replica == replica)]

    def to_dict(self) -> dict:
        from cloudml.cli.base import message_to_dict  # noqa: PLC0415

        return message_to_dict(self.proto)


# --- models -----------------------------------------------------------------------------


class Model(Wrapper):
    """A model (cloudml.models.v1.Model): labels, default version, traffic split."""

    __slots__ = ("created",)
    _repr_fields = ("name", "public", "labels")

    def __init__(self, proto, created: bool | None = None):
        super().__init__(proto)
        self.created = created

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def tenant(self) -> str:
        return self.proto.tenant

    @property
    def public(self) -> bool:
        return self.proto.public

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.proto.labels)

    @property
    def default_version(self) -> int:
        return self.proto.default_version

    @property
    def deleting(self) -> bool:
        return self.proto.HasField("delete_time")


class ModelVersion(Wrapper):
    """A version of a model (cloudml.models.v1.ModelVersion). `created` is set
    by `models.create`/`deploy`: False when it existed with this spec."""

    __slots__ = ("created",)
    _repr_fields = ("model", "version", "state", "ready_replicas")

    def __init__(self, proto, created: bool | None = None):
        super().__init__(proto)
        self.created = created

    @property
    def model(self) -> str:
        return self.proto.model

    @property
    def version(self) -> int:
        return self.proto.version

    @property
    def state(self) -> str:
        """START, LOADING, AVAILABLE, UNLOADING or END (TF Serving's words)."""
        from cloudml.models.v1 import models_service_pb2 as pb

        return enum_name(pb.ModelVersionState, self.proto.state, "MODEL_VERSION_STATE_")

    @property
    def uri(self) -> str:
        return self.proto.model_uri

    @property
    def ready_replicas(self) -> int:
        from cloudml.models.v1 import models_service_pb2 as pb

        return sum(1 for r in self.proto.replicas if r.state == pb.MODEL_VERSION_STATE_AVAILABLE)

    @property
    def desired_replicas(self) -> int:
        return self.proto.desired_replicas

    @property
    def error(self) -> str:
        """Why the version failed to load ("" when it did not)."""
        return self.proto.status.message


class Export(Wrapper):
    """An export of a version (cloudml.models.v1.Export): its format and
    options, state, and the artifact once SUCCEEDED. `created` is set by
    `models.export`: False when it existed."""

    __slots__ = ("created",)
    _repr_fields = ("id", "state", "size_bytes")

    def __init__(self, proto, created: bool | None = None):
        super().__init__(proto)
        self.created = created

    @property
    def id(self) -> str:
        """e.g. "tflite", "tflite-float16": `models.download(..., artifact=id)`."""
        return self.proto.id

    @property
    def state(self) -> str:
        """PENDING, RUNNING, SUCCEEDED or FAILED."""
        from cloudml.models.v1 import models_service_pb2 as pb

        return enum_name(pb.ExportState, self.proto.state, "EXPORT_STATE_")

    @property
    def optimization(self) -> str:
        """none, dynamic-range or float16."""
        from cloudml.models.v1 import models_service_pb2 as pb

        name = enum_name(pb.ExportOptimization, self.proto.options.optimization, "EXPORT_OPTIMIZATION_")
        return "none" if name == "UNSPECIFIED" else name.lower().replace("_", "-")

    @property
    def message(self) -> str:
        """Why it FAILED (the converter's reason), or what a PENDING one waits for."""
        return self.proto.message

    @property
    def size_bytes(self) -> int:
        return self.proto.artifact.size_bytes

    @property
    def sha256(self) -> str:
        return self.proto.artifact.sha256

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED")


# --- studies ----------------------------------------------------------------------------


class Trial(Wrapper):
    """One trial of a study: its parameters, state and objective."""

    __slots__ = ()
    _repr_fields = ("number", "state", "objective", "params")

    @property
    def number(self) -> int:
        return self.proto.number

    @property
    def state(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED, EARLY_STOPPED or CANCELLED."""
        from cloudml.tuner.v1 import tuner_service_pb2 as pb

        return enum_name(pb.TrialState, self.proto.state, "TRIAL_STATE_")

    @property
    def params(self) -> dict[str, Any]:
        return {k: parameter_value(v) for k, v in sorted(self.proto.params.items())}

    @property
    def objective(self) -> float | None:
        return self.proto.objective_value if self.proto.HasField("objective_value") else None

    @property
    def job_name(self) -> str:
        return self.proto.job_name

    @property
    def reason(self) -> str:
        return self.proto.reason


class Study(Wrapper):
    """A hyperparameter study: its state, trial counts and best trial."""

    __slots__ = ("created",)
    _repr_fields = ("name", "state", "counts")

    def __init__(self, proto, created: bool | None = None):
        super().__init__(proto)
        self.created = created

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def tenant(self) -> str:
        return self.proto.tenant

    @property
    def state(self) -> str:
        """RUNNING, SUCCEEDED, FAILED or CANCELLED."""
        from cloudml.tuner.v1 import tuner_service_pb2 as pb

        return enum_name(pb.StudyState, self.proto.state, "STUDY_STATE_")

    @property
    def reason(self) -> str:
        return self.proto.reason

    @property
    def message(self) -> str:
        return self.proto.message

    @property
    def metric(self) -> str:
        return self.proto.spec.metric

    @property
    def goal(self) -> str:
        from cloudml.tuner.v1 import tuner_service_pb2 as pb

        return enum_name(pb.Goal, self.proto.spec.goal, "GOAL_")

    @property
    def max_trials(self) -> int:
        return self.proto.spec.max_trials

    @property
    def counts(self) -> dict[str, int]:
        """Trials per state: {"pending": 1, "running": 2, "succeeded": 3, ...}."""
        c = self.proto.trial_counts
        return {"pending": c.pending, "running": c.running, "succeeded": c.succeeded, "failed": c.failed,
                "early_stopped": c.early_stopped, "cancelled": c.cancelled}

    @property
    def best_trial(self) -> Trial | None:
        return Trial(self.proto.best_trial) if self.proto.HasField("best_trial") else None

    @property
    def done(self) -> bool:
        return self.state in STUDY_FINAL

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


# --- tensorboards and dev environments --------------------------------------------------


def _field(name: str, doc: str = "") -> property:
    """A read-only property: the message's field `name`."""
    return property(lambda self: getattr(self.proto, name), doc=doc)


def _time_field(name: str, doc: str = "") -> property:
    """A read-only property: the message's Timestamp `name` as an aware datetime (None when unset)."""
    return property(lambda self: timestamp(getattr(self.proto, name)) if self.proto.HasField(name) else None,
                    doc=doc)


class _Server(Wrapper):
    """What TensorBoards and dev environments share: a server of the tenant
    reached through the gateway's HTTP port at `path`, after logging in
    with a one-time link."""

    __slots__ = ()
    _repr_fields = ("name", "state", "path")
    _states: tuple[str, str, str] = ("", "", "")  # (module of cloudml.jobs.v1, its state enum, the prefix)

    name = _field("name")
    tenant = _field("tenant")
    message = _field("message", "Why it FAILED (or stopped); \"\" otherwise.")
    path = _field("path", "/<kind>/<tenant>/<name>/ on the gateway's HTTP endpoint.")
    create_time = _time_field("create_time")

    @property
    def state(self) -> str:
        import importlib  # noqa: PLC0415

        module, enum, prefix = self._states
        return enum_name(getattr(importlib.import_module(f"cloudml.jobs.v1.{module}"), enum), self.proto.state,
                         prefix)

    @property
    def running(self) -> bool:
        """True when its server answers through the gateway."""
        return self.state == "RUNNING"


class TensorBoard(_Server):
    """A managed TensorBoard (cloudml.jobs.v1.TensorBoard): on one `logdir`,
    on a job's event files (`job`), or on several named `runs` side by side;
    `state` is STARTING, RUNNING, FAILED or DELETING. Its page is at `path`
    (/tensorboard/<tenant>/<name>/), after logging in with a link from
    `client.tensorboards.login_link`."""

    __slots__ = ()
    _states = ("tensorboards_pb2", "TensorBoardState", "TENSORBOARD_STATE_")

    logdir = _field("logdir")
    job = _field("job", "The job whose event files it shows (\"\" when made on a logdir or runs).")
    last_access_time = _time_field("last_access_time")
    idle_delete_time = _time_field("idle_delete_time", "When it is deleted unless used before.")

    @property
    def runs(self) -> dict[str, str]:
        """{run name: its job or logdir} of a TensorBoard over several runs."""
        return {r.name: r.job or r.logdir for r in self.proto.runs}


class DevEnvironment(_Server):
    """A dev environment (cloudml.jobs.v1.DevEnvironment): a JupyterLab
    server of the tenant; `state` is STARTING, RUNNING, STOPPING, STOPPED,
    FAILED or DELETING. Its page is at `path` (/dev/<tenant>/<name>/), after
    logging in with a link from `client.dev.login_link`."""

    __slots__ = ()
    _states = ("dev_environments_pb2", "DevEnvironmentState", "DEV_ENVIRONMENT_STATE_")

    image = _field("image", "The image it runs (\"\" for the platform's).")
    working_dir = _field("working_dir")
    access_key_id = _field("access_key_id", "The tenant access key its kernels are configured with.")
    idle_stop_seconds = _field("idle_stop_seconds")
    last_activity_time = _time_field("last_activity_time")
    idle_stop_time = _time_field("idle_stop_time", "When it is stopped unless used before (None when not running).")

    @property
    def cpu_millis(self) -> int:
        return self.proto.resources.cpu_millis

    @property
    def memory_bytes(self) -> int:
        return self.proto.resources.memory_bytes

    @property
    def gpus(self) -> int:
        return self.proto.resources.gpus
