from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ResolvePageRequest(_message.Message):
    __slots__ = ("kind", "tenant", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    tenant: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ResolvePageResponse(_message.Message):
    __slots__ = ("address", "cache_seconds", "authorization")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    address: str
    cache_seconds: int
    authorization: str
    def __init__(self, address: _Optional[str] = ..., cache_seconds: _Optional[int] = ..., authorization: _Optional[str] = ...) -> None: ...
