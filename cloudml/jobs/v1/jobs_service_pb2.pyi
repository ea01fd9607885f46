import datetime

from cloudml.common.v1 import resources_pb2 as _resources_pb2
from cloudml.jobs.v1 import tensorboards_pb2 as _tensorboards_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_TYPE_UNSPECIFIED: _ClassVar[ReplicaType]
    REPLICA_TYPE_MASTER: _ClassVar[ReplicaType]
    REPLICA_TYPE_CHIEF: _ClassVar[ReplicaType]
    REPLICA_TYPE_PS: _ClassVar[ReplicaType]
    REPLICA_TYPE_WORKER: _ClassVar[ReplicaType]
    REPLICA_TYPE_EVALUATOR: _ClassVar[ReplicaType]

class RestartPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTART_POLICY_UNSPECIFIED: _ClassVar[RestartPolicy]
    RESTART_POLICY_NEVER: _ClassVar[RestartPolicy]
    RESTART_POLICY_ON_FAILURE: _ClassVar[RestartPolicy]
    RESTART_POLICY_EXIT_CODE: _ClassVar[RestartPolicy]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_PREPARING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLING: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_RESTARTING: _ClassVar[JobState]

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_PENDING: _ClassVar[ReplicaState]
    REPLICA_STATE_RUNNING: _ClassVar[ReplicaState]
    REPLICA_STATE_SUCCEEDED: _ClassVar[ReplicaState]
    REPLICA_STATE_FAILED: _ClassVar[ReplicaState]
    REPLICA_STATE_STOPPED: _ClassVar[ReplicaState]

class MetricSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_SOURCE_UNSPECIFIED: _ClassVar[MetricSource]
    METRIC_SOURCE_REPORTED: _ClassVar[MetricSource]
    METRIC_SOURCE_TENSORBOARD: _ClassVar[MetricSource]
REPLICA_TYPE_UNSPECIFIED: ReplicaType
REPLICA_TYPE_MASTER: ReplicaType
REPLICA_TYPE_CHIEF: ReplicaType
REPLICA_TYPE_PS: ReplicaType
REPLICA_TYPE_WORKER: ReplicaType
REPLICA_TYPE_EVALUATOR: ReplicaType
RESTART_POLICY_UNSPECIFIED: RestartPolicy
RESTART_POLICY_NEVER: RestartPolicy
RESTART_POLICY_ON_FAILURE: RestartPolicy
RESTART_POLICY_EXIT_CODE: RestartPolicy
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_PREPARING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLING: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_RESTARTING: JobState
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_PENDING: ReplicaState
REPLICA_STATE_RUNNING: ReplicaState
REPLICA_STATE_SUCCEEDED: ReplicaState
REPLICA_STATE_FAILED: ReplicaState
REPLICA_STATE_STOPPED: ReplicaState
METRIC_SOURCE_UNSPECIFIED: MetricSource
METRIC_SOURCE_REPORTED: MetricSource
METRIC_SOURCE_TENSORBOARD: MetricSource

class ReplicaId(_message.Message):
    __slots__ = ("type", "index")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    type: ReplicaType
    index: int
    def __init__(self, type: _Optional[_Union[ReplicaType, str]] = ..., index: _Optional[int] = ...) -> None: ...

class ReplicaSpec(_message.Message):
    __slots__ = ("type", "replica_count", "resources")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COUNT_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    type: ReplicaType
    replica_count: int
    resources: _resources_pb2.Resources
    def __init__(self, type: _Optional[_Union[ReplicaType, str]] = ..., replica_count: _Optional[int] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ...) -> None: ...

class TrainJobSpec(_message.Message):
    __slots__ = ("trainer_uri", "module_name", "job_args", "output_path", "replica_specs", "env", "restart_policy", "max_retries", "timeout", "priority", "docker_image", "job_args_line")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRAINER_URI_FIELD_NUMBER: _ClassVar[int]
    MODULE_NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_ARGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SPECS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DOCKER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_ARGS_LINE_FIELD_NUMBER: _ClassVar[int]
    trainer_uri: str
    module_name: str
    job_args: _containers.RepeatedScalarFieldContainer[str]
    output_path: str
    replica_specs: _containers.RepeatedCompositeFieldContainer[ReplicaSpec]
    env: _containers.ScalarMap[str, str]
    restart_policy: RestartPolicy
    max_retries: int
    timeout: _duration_pb2.Duration
    priority: int
    docker_image: str
    job_args_line: str
    def __init__(self, trainer_uri: _Optional[str] = ..., module_name: _Optional[str] = ..., job_args: _Optional[_Iterable[str]] = ..., output_path: _Optional[str] = ..., replica_specs: _Optional[_Iterable[_Union[ReplicaSpec, _Mapping]]] = ..., env: _Optional[_Mapping[str, str]] = ..., restart_policy: _Optional[_Union[RestartPolicy, str]] = ..., max_retries: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., priority: _Optional[int] = ..., docker_image: _Optional[str] = ..., job_args_line: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("time", "state", "reason", "message", "attempt")
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    state: JobState
    reason: str
    message: str
    attempt: int
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica", "state", "exit_code", "address", "pid", "reason", "start_time", "end_time", "gpu_ids")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GPU_IDS_FIELD_NUMBER: _ClassVar[int]
    replica: ReplicaId
    state: ReplicaState
    exit_code: int
    address: str
    pid: int
    reason: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    gpu_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, replica: _Optional[_Union[ReplicaId, _Mapping]] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., exit_code: _Optional[int] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., reason: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TrainJob(_message.Message):
    __slots__ = ("name", "tenant", "spec", "spec_hash", "state", "reason", "message", "events", "create_time", "start_time", "end_time", "attempts", "replicas", "uid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    spec: TrainJobSpec
    spec_hash: str
    state: JobState
    reason: str
    message: str
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempts: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    uid: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., spec: _Optional[_Union[TrainJobSpec, _Mapping]] = ..., spec_hash: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., uid: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("tenant", "name", "spec", "validate_only")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    spec: TrainJobSpec
    validate_only: bool
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[TrainJobSpec, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: TrainJob
    created: bool
    def __init__(self, job: _Optional[_Union[TrainJob, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainJob
    def __init__(self, job: _Optional[_Union[TrainJob, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("tenant", "states", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainJob
    def __init__(self, job: _Optional[_Union[TrainJob, _Mapping]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamLogsRequest(_message.Message):
    __slots__ = ("tenant", "name", "replicas", "follow", "tail_lines")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaId]
    follow: bool
    tail_lines: int
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaId, _Mapping]]] = ..., follow: _Optional[bool] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("time", "replica", "attempt", "text")
    TIME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    replica: ReplicaId
    attempt: int
    text: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replica: _Optional[_Union[ReplicaId, _Mapping]] = ..., attempt: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class StreamLogsResponse(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("step", "value", "wall_time", "attempt")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    step: int
    value: float
    wall_time: _timestamp_pb2.Timestamp
    attempt: int
    def __init__(self, step: _Optional[int] = ..., value: _Optional[float] = ..., wall_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class MetricSeries(_message.Message):
    __slots__ = ("name", "replica", "source", "points")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replica: ReplicaId
    source: MetricSource
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    def __init__(self, name: _Optional[str] = ..., replica: _Optional[_Union[ReplicaId, _Mapping]] = ..., source: _Optional[_Union[MetricSource, str]] = ..., points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ...) -> None: ...

class GetJobMetricsRequest(_message.Message):
    __slots__ = ("tenant", "name", "metric_names", "start_step")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAMES_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    metric_names: _containers.RepeatedScalarFieldContainer[str]
    start_step: int
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., metric_names: _Optional[_Iterable[str]] = ..., start_step: _Optional[int] = ...) -> None: ...

class GetJobMetricsResponse(_message.Message):
    __slots__ = ("series",)
    SERIES_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[MetricSeries]
    def __init__(self, series: _Optional[_Iterable[_Union[MetricSeries, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainJob
    def __init__(self, job: _Optional[_Union[TrainJob, _Mapping]] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("tenant", "job_name", "replica", "attempt", "step", "metrics", "wall_time")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job_name: str
    replica: ReplicaId
    attempt: int
    step: int
    metrics: _containers.ScalarMap[str, float]
    wall_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant: _Optional[str] = ..., job_name: _Optional[str] = ..., replica: _Optional[_Union[ReplicaId, _Mapping]] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., wall_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UploadPackageRequest(_message.Message):
    __slots__ = ("tenant", "file_name", "data")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    file_name: str
    data: bytes
    def __init__(self, tenant: _Optional[str] = ..., file_name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadPackageResponse(_message.Message):
    __slots__ = ("uri", "size_bytes", "sha256")
    URI_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    uri: str
    size_bytes: int
    sha256: str
    def __init__(self, uri: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
