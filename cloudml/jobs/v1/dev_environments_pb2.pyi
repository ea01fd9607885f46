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

class DevEnvironmentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEV_ENVIRONMENT_STATE_UNSPECIFIED: _ClassVar[DevEnvironmentState]
    DEV_ENVIRONMENT_STATE_STARTING: _ClassVar[DevEnvironmentState]
    DEV_ENVIRONMENT_STATE_RUNNING: _ClassVar[DevEnvironmentState]
    DEV_ENVIRONMENT_STATE_STOPPING: _ClassVar[DevEnvironmentState]
    DEV_ENVIRONMENT_STATE_STOPPED: _ClassVar[DevEnvironmentState]
    DEV_ENVIRONMENT_STATE_FAILED: _ClassVar[DevEnvironmentState]
    DEV_ENVIRONMENT_STATE_DELETING: _ClassVar[DevEnvironmentState]
DEV_ENVIRONMENT_STATE_UNSPECIFIED: DevEnvironmentState
DEV_ENVIRONMENT_STATE_STARTING: DevEnvironmentState
DEV_ENVIRONMENT_STATE_RUNNING: DevEnvironmentState
DEV_ENVIRONMENT_STATE_STOPPING: DevEnvironmentState
DEV_ENVIRONMENT_STATE_STOPPED: DevEnvironmentState
DEV_ENVIRONMENT_STATE_FAILED: DevEnvironmentState
DEV_ENVIRONMENT_STATE_DELETING: DevEnvironmentState

class DevEnvironment(_message.Message):
    __slots__ = ("tenant", "name", "uid", "state", "path", "resources", "image", "working_dir", "access_key_id", "create_time", "last_activity_time", "idle_stop_time", "idle_stop_seconds", "message")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    ACCESS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_TIME_FIELD_NUMBER: _ClassVar[int]
    IDLE_STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    IDLE_STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    uid: str
    state: DevEnvironmentState
    path: str
    resources: _resources_pb2.Resources
    image: str
    working_dir: str
    access_key_id: str
    create_time: _timestamp_pb2.Timestamp
    last_activity_time: _timestamp_pb2.Timestamp
    idle_stop_time: _timestamp_pb2.Timestamp
    idle_stop_seconds: int
    message: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., uid: _Optional[str] = ..., state: _Optional[_Union[DevEnvironmentState, str]] = ..., path: _Optional[str] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., image: _Optional[str] = ..., working_dir: _Optional[str] = ..., access_key_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_activity_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_stop_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_stop_seconds: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CreateDevEnvironmentRequest(_message.Message):
    __slots__ = ("tenant", "name", "resources", "image")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    resources: _resources_pb2.Resources
    image: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., image: _Optional[str] = ...) -> None: ...

class CreateDevEnvironmentResponse(_message.Message):
    __slots__ = ("dev_environment",)
    DEV_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    dev_environment: DevEnvironment
    def __init__(self, dev_environment: _Optional[_Union[DevEnvironment, _Mapping]] = ...) -> None: ...

class GetDevEnvironmentRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetDevEnvironmentResponse(_message.Message):
    __slots__ = ("dev_environment",)
    DEV_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    dev_environment: DevEnvironment
    def __init__(self, dev_environment: _Optional[_Union[DevEnvironment, _Mapping]] = ...) -> None: ...

class ListDevEnvironmentsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListDevEnvironmentsResponse(_message.Message):
    __slots__ = ("dev_environments",)
    DEV_ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    dev_environments: _containers.RepeatedCompositeFieldContainer[DevEnvironment]
    def __init__(self, dev_environments: _Optional[_Iterable[_Union[DevEnvironment, _Mapping]]] = ...) -> None: ...

class StopDevEnvironmentRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class StopDevEnvironmentResponse(_message.Message):
    __slots__ = ("dev_environment",)
    DEV_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    dev_environment: DevEnvironment
    def __init__(self, dev_environment: _Optional[_Union[DevEnvironment, _Mapping]] = ...) -> None: ...

class StartDevEnvironmentRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class StartDevEnvironmentResponse(_message.Message):
    __slots__ = ("dev_environment",)
    DEV_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    dev_environment: DevEnvironment
    def __init__(self, dev_environment: _Optional[_Union[DevEnvironment, _Mapping]] = ...) -> None: ...

class DeleteDevEnvironmentRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteDevEnvironmentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
