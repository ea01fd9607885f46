import datetime

from cloudml.common.v1 import resources_pb2 as _resources_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorBoardState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSORBOARD_STATE_UNSPECIFIED: _ClassVar[TensorBoardState]
    TENSORBOARD_STATE_STARTING: _ClassVar[TensorBoardState]
    TENSORBOARD_STATE_RUNNING: _ClassVar[TensorBoardState]
    TENSORBOARD_STATE_FAILED: _ClassVar[TensorBoardState]
    TENSORBOARD_STATE_DELETING: _ClassVar[TensorBoardState]
TENSORBOARD_STATE_UNSPECIFIED: TensorBoardState
TENSORBOARD_STATE_STARTING: TensorBoardState
TENSORBOARD_STATE_RUNNING: TensorBoardState
TENSORBOARD_STATE_FAILED: TensorBoardState
TENSORBOARD_STATE_DELETING: TensorBoardState

class TensorBoard(_message.Message):
    __slots__ = ("tenant", "name", "uid", "logdir", "job", "state", "path", "resources", "create_time", "last_access_time", "idle_delete_time", "message", "runs")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    LOGDIR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCESS_TIME_FIELD_NUMBER: _ClassVar[int]
    IDLE_DELETE_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    uid: str
    logdir: str
    job: str
    state: TensorBoardState
    path: str
    resources: _resources_pb2.Resources
    create_time: _timestamp_pb2.Timestamp
    last_access_time: _timestamp_pb2.Timestamp
    idle_delete_time: _timestamp_pb2.Timestamp
    message: str
    runs: _containers.RepeatedCompositeFieldContainer[TensorBoardRun]
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., uid: _Optional[str] = ..., logdir: _Optional[str] = ..., job: _Optional[str] = ..., state: _Optional[_Union[TensorBoardState, str]] = ..., path: _Optional[str] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_access_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_delete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[TensorBoardRun, _Mapping]]] = ...) -> None: ...

class CreateTensorBoardRequest(_message.Message):
    __slots__ = ("tenant", "name", "logdir", "job", "runs")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOGDIR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    logdir: str
    job: str
    runs: _containers.RepeatedCompositeFieldContainer[TensorBoardRun]
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., logdir: _Optional[str] = ..., job: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[TensorBoardRun, _Mapping]]] = ...) -> None: ...

class TensorBoardRun(_message.Message):
    __slots__ = ("name", "logdir", "job")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOGDIR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    name: str
    logdir: str
    job: str
    def __init__(self, name: _Optional[str] = ..., logdir: _Optional[str] = ..., job: _Optional[str] = ...) -> None: ...

class CreateTensorBoardResponse(_message.Message):
    __slots__ = ("tensorboard",)
    TENSORBOARD_FIELD_NUMBER: _ClassVar[int]
    tensorboard: TensorBoard
    def __init__(self, tensorboard: _Optional[_Union[TensorBoard, _Mapping]] = ...) -> None: ...

class GetTensorBoardRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetTensorBoardResponse(_message.Message):
    __slots__ = ("tensorboard",)
    TENSORBOARD_FIELD_NUMBER: _ClassVar[int]
    tensorboard: TensorBoard
    def __init__(self, tensorboard: _Optional[_Union[TensorBoard, _Mapping]] = ...) -> None: ...

class ListTensorBoardsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListTensorBoardsResponse(_message.Message):
    __slots__ = ("tensorboards",)
    TENSORBOARDS_FIELD_NUMBER: _ClassVar[int]
    tensorboards: _containers.RepeatedCompositeFieldContainer[TensorBoard]
    def __init__(self, tensorboards: _Optional[_Iterable[_Union[TensorBoard, _Mapping]]] = ...) -> None: ...

class DeleteTensorBoardRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteTensorBoardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
