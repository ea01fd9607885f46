import datetime

from cloudml.common.v1 import resources_pb2 as _resources_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_VERSION_STATE_UNSPECIFIED: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_START: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_LOADING: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_AVAILABLE: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_UNLOADING: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_END: _ClassVar[ModelVersionState]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_TFLITE: _ClassVar[ExportFormat]

class ExportOptimization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_OPTIMIZATION_UNSPECIFIED: _ClassVar[ExportOptimization]
    EXPORT_OPTIMIZATION_NONE: _ClassVar[ExportOptimization]
    EXPORT_OPTIMIZATION_DYNAMIC_RANGE: _ClassVar[ExportOptimization]
    EXPORT_OPTIMIZATION_FLOAT16: _ClassVar[ExportOptimization]

class ExportState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_STATE_UNSPECIFIED: _ClassVar[ExportState]
    EXPORT_STATE_PENDING: _ClassVar[ExportState]
    EXPORT_STATE_RUNNING: _ClassVar[ExportState]
    EXPORT_STATE_SUCCEEDED: _ClassVar[ExportState]
    EXPORT_STATE_FAILED: _ClassVar[ExportState]
MODEL_VERSION_STATE_UNSPECIFIED: ModelVersionState
MODEL_VERSION_STATE_START: ModelVersionState
MODEL_VERSION_STATE_LOADING: ModelVersionState
MODEL_VERSION_STATE_AVAILABLE: ModelVersionState
MODEL_VERSION_STATE_UNLOADING: ModelVersionState
MODEL_VERSION_STATE_END: ModelVersionState
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_TFLITE: ExportFormat
EXPORT_OPTIMIZATION_UNSPECIFIED: ExportOptimization
EXPORT_OPTIMIZATION_NONE: ExportOptimization
EXPORT_OPTIMIZATION_DYNAMIC_RANGE: ExportOptimization
EXPORT_OPTIMIZATION_FLOAT16: ExportOptimization
EXPORT_STATE_UNSPECIFIED: ExportState
EXPORT_STATE_PENDING: ExportState
EXPORT_STATE_RUNNING: ExportState
EXPORT_STATE_SUCCEEDED: ExportState
EXPORT_STATE_FAILED: ExportState

class Model(_message.Message):
    __slots__ = ("name", "tenant", "description", "public", "default_version", "labels", "traffic_split", "create_time", "update_time", "delete_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SPLIT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DELETE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    description: str
    public: bool
    default_version: int
    labels: _containers.ScalarMap[str, int]
    traffic_split: _containers.RepeatedCompositeFieldContainer[TrafficTarget]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    delete_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., description: _Optional[str] = ..., public: _Optional[bool] = ..., default_version: _Optional[int] = ..., labels: _Optional[_Mapping[str, int]] = ..., traffic_split: _Optional[_Iterable[_Union[TrafficTarget, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrafficTarget(_message.Message):
    __slots__ = ("version", "percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    percent: int
    def __init__(self, version: _Optional[int] = ..., percent: _Optional[int] = ...) -> None: ...

class ErrorStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("enabled", "max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_MICROS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENQUEUED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_size: int
    batch_timeout_micros: int
    max_enqueued_batches: int
    num_batch_threads: int
    def __init__(self, enabled: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., batch_timeout_micros: _Optional[int] = ..., max_enqueued_batches: _Optional[int] = ..., num_batch_threads: _Optional[int] = ...) -> None: ...

class ModelReplica(_message.Message):
    __slots__ = ("id", "state", "address", "status", "start_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: ModelVersionState
    address: str
    status: ErrorStatus
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., address: _Optional[str] = ..., status: _Optional[_Union[ErrorStatus, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model", "tenant", "version", "model_uri", "description", "resources", "min_replicas", "max_replicas", "batching", "state", "status", "desired_replicas", "replicas", "create_time", "delete_time")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DELETE_TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    tenant: str
    version: int
    model_uri: str
    description: str
    resources: _resources_pb2.Resources
    min_replicas: int
    max_replicas: int
    batching: BatchingConfig
    state: ModelVersionState
    status: ErrorStatus
    desired_replicas: int
    replicas: _containers.RepeatedCompositeFieldContainer[ModelReplica]
    create_time: _timestamp_pb2.Timestamp
    delete_time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., tenant: _Optional[str] = ..., version: _Optional[int] = ..., model_uri: _Optional[str] = ..., description: _Optional[str] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., status: _Optional[_Union[ErrorStatus, _Mapping]] = ..., desired_replicas: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ModelReplica, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReplicaEndpoint(_message.Message):
    __slots__ = ("tenant", "model", "version", "replica_id", "address", "state", "register_time", "coalesce_max", "max_request_bytes", "batch_timeout_micros", "frame_address")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_TIME_FIELD_NUMBER: _ClassVar[int]
    COALESCE_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_MICROS_FIELD_NUMBER: _ClassVar[int]
    FRAME_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    replica_id: str
    address: str
    state: ModelVersionState
    register_time: _timestamp_pb2.Timestamp
    coalesce_max: int
    max_request_bytes: int
    batch_timeout_micros: int
    frame_address: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., replica_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., register_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., coalesce_max: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., batch_timeout_micros: _Optional[int] = ..., frame_address: _Optional[str] = ...) -> None: ...

class ModelRoute(_message.Message):
    __slots__ = ("tenant", "model", "public", "default_version", "labels", "traffic_split", "versions")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SPLIT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    public: bool
    default_version: int
    labels: _containers.ScalarMap[str, int]
    traffic_split: _containers.RepeatedCompositeFieldContainer[TrafficTarget]
    versions: _containers.RepeatedCompositeFieldContainer[VersionRoute]
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., public: _Optional[bool] = ..., default_version: _Optional[int] = ..., labels: _Optional[_Mapping[str, int]] = ..., traffic_split: _Optional[_Iterable[_Union[TrafficTarget, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[VersionRoute, _Mapping]]] = ...) -> None: ...

class VersionRoute(_message.Message):
    __slots__ = ("version", "state", "status")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: ModelVersionState
    status: ErrorStatus
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., status: _Optional[_Union[ErrorStatus, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("tenant", "name", "description", "public")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    description: str
    public: bool
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., public: _Optional[bool] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("tenant", "name", "model", "update_mask")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    model: Model
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class CreateVersionRequest(_message.Message):
    __slots__ = ("tenant", "model", "model_version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    model_version: ModelVersion
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...

class CreateVersionResponse(_message.Message):
    __slots__ = ("model_version", "created")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    created: bool
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("tenant", "model", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("tenant", "model", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("model_versions", "next_page_token")
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    def __init__(self, model_versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("tenant", "model", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...

class SetLabelRequest(_message.Message):
    __slots__ = ("tenant", "model", "label", "version", "allow_unavailable")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    label: str
    version: int
    allow_unavailable: bool
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., label: _Optional[str] = ..., version: _Optional[int] = ..., allow_unavailable: _Optional[bool] = ...) -> None: ...

class SetLabelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class DeleteLabelRequest(_message.Message):
    __slots__ = ("tenant", "model", "label")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    label: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class DeleteLabelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ScaleVersionRequest(_message.Message):
    __slots__ = ("tenant", "model", "version", "min_replicas", "max_replicas")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    min_replicas: int
    max_replicas: int
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ...) -> None: ...

class ScaleVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...

class WatchModelRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class WatchModelResponse(_message.Message):
    __slots__ = ("model", "model_versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: Model
    model_versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., model_versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class GetUploadLocationRequest(_message.Message):
    __slots__ = ("tenant", "model", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetUploadLocationResponse(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadModelHeader
    chunk: UploadFileChunk
    def __init__(self, header: _Optional[_Union[UploadModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[UploadFileChunk, _Mapping]] = ...) -> None: ...

class UploadModelHeader(_message.Message):
    __slots__ = ("tenant", "model")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class UploadFileChunk(_message.Message):
    __slots__ = ("path", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadModelResponse(_message.Message):
    __slots__ = ("uri", "size_bytes", "files", "sha256")
    URI_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    uri: str
    size_bytes: int
    files: int
    sha256: str
    def __init__(self, uri: _Optional[str] = ..., size_bytes: _Optional[int] = ..., files: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ExportOptions(_message.Message):
    __slots__ = ("signature", "optimization")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    signature: str
    optimization: ExportOptimization
    def __init__(self, signature: _Optional[str] = ..., optimization: _Optional[_Union[ExportOptimization, str]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("file", "size_bytes", "sha256", "create_time")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    file: str
    size_bytes: int
    sha256: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, file: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Export(_message.Message):
    __slots__ = ("tenant", "model", "version", "id", "format", "options", "state", "message", "attempts", "artifact", "create_time", "update_time")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    id: str
    format: ExportFormat
    options: ExportOptions
    state: ExportState
    message: str
    attempts: int
    artifact: Artifact
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., options: _Optional[_Union[ExportOptions, _Mapping]] = ..., state: _Optional[_Union[ExportState, str]] = ..., message: _Optional[str] = ..., attempts: _Optional[int] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExportVersionRequest(_message.Message):
    __slots__ = ("tenant", "model", "version", "format", "options")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    format: ExportFormat
    options: ExportOptions
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., options: _Optional[_Union[ExportOptions, _Mapping]] = ...) -> None: ...

class ExportVersionResponse(_message.Message):
    __slots__ = ("export", "created")
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    export: Export
    created: bool
    def __init__(self, export: _Optional[_Union[Export, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetExportRequest(_message.Message):
    __slots__ = ("tenant", "model", "version", "id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    id: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., id: _Optional[str] = ...) -> None: ...

class GetExportResponse(_message.Message):
    __slots__ = ("export",)
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    export: Export
    def __init__(self, export: _Optional[_Union[Export, _Mapping]] = ...) -> None: ...

class ListExportsRequest(_message.Message):
    __slots__ = ("tenant", "model", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListExportsResponse(_message.Message):
    __slots__ = ("exports",)
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    exports: _containers.RepeatedCompositeFieldContainer[Export]
    def __init__(self, exports: _Optional[_Iterable[_Union[Export, _Mapping]]] = ...) -> None: ...

class DownloadVersionRequest(_message.Message):
    __slots__ = ("tenant", "model", "version", "label", "artifact", "path", "offset", "manifest_only")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ONLY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    version: int
    label: str
    artifact: str
    path: str
    offset: int
    manifest_only: bool
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., label: _Optional[str] = ..., artifact: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., manifest_only: _Optional[bool] = ...) -> None: ...

class ManifestFile(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DownloadManifest(_message.Message):
    __slots__ = ("version", "artifact", "files", "size_bytes", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    artifact: str
    files: _containers.RepeatedCompositeFieldContainer[ManifestFile]
    size_bytes: int
    sha256: str
    def __init__(self, version: _Optional[int] = ..., artifact: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ManifestFile, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("path", "offset", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownloadVersionResponse(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: DownloadManifest
    chunk: DownloadChunk
    def __init__(self, manifest: _Optional[_Union[DownloadManifest, _Mapping]] = ..., chunk: _Optional[_Union[DownloadChunk, _Mapping]] = ...) -> None: ...
