from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Resources(_message.Message):
    __slots__ = ("cpu_millis", "memory_bytes", "gpus", "train_jobs", "model_replicas", "studies", "dev_environments", "tensorboards")
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_JOBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    DEV_ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    TENSORBOARDS_FIELD_NUMBER: _ClassVar[int]
    cpu_millis: int
    memory_bytes: int
    gpus: int
    train_jobs: int
    model_replicas: int
    studies: int
    dev_environments: int
    tensorboards: int
    def __init__(self, cpu_millis: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., gpus: _Optional[int] = ..., train_jobs: _Optional[int] = ..., model_replicas: _Optional[int] = ..., studies: _Optional[int] = ..., dev_environments: _Optional[int] = ..., tensorboards: _Optional[int] = ...) -> None: ...
