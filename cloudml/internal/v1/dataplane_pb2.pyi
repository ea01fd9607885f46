from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataplaneControl(_message.Message):
    __slots__ = ("generation", "latency_buckets", "services", "public_methods")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_METHODS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    latency_buckets: _containers.RepeatedScalarFieldContainer[float]
    services: _containers.RepeatedCompositeFieldContainer[ServiceInstances]
    public_methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, generation: _Optional[int] = ..., latency_buckets: _Optional[_Iterable[float]] = ..., services: _Optional[_Iterable[_Union[ServiceInstances, _Mapping]]] = ..., public_methods: _Optional[_Iterable[str]] = ...) -> None: ...

class AuthDecision(_message.Message):
    __slots__ = ("generation", "expires_at")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    generation: int
    expires_at: float
    def __init__(self, generation: _Optional[int] = ..., expires_at: _Optional[float] = ...) -> None: ...

class ServiceInstances(_message.Message):
    __slots__ = ("service", "addresses")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    service: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("generation", "expires_at", "choices", "model")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    generation: int
    expires_at: float
    choices: _containers.RepeatedCompositeFieldContainer[VersionChoice]
    model: str
    def __init__(self, generation: _Optional[int] = ..., expires_at: _Optional[float] = ..., choices: _Optional[_Iterable[_Union[VersionChoice, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class RestDecision(_message.Message):
    __slots__ = ("route", "versions")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    route: RouteDecision
    versions: _containers.RepeatedCompositeFieldContainer[VersionSignatures]
    def __init__(self, route: _Optional[_Union[RouteDecision, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[VersionSignatures, _Mapping]]] = ...) -> None: ...

class VersionSignatures(_message.Message):
    __slots__ = ("version", "signatures")
    class SignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SignatureInputs
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SignatureInputs, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    version: int
    signatures: _containers.MessageMap[str, SignatureInputs]
    def __init__(self, version: _Optional[int] = ..., signatures: _Optional[_Mapping[str, SignatureInputs]] = ...) -> None: ...

class SignatureInputs(_message.Message):
    __slots__ = ("dtypes",)
    class DtypesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    dtypes: _containers.ScalarMap[str, int]
    def __init__(self, dtypes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class VersionChoice(_message.Message):
    __slots__ = ("version", "weight", "addresses", "coalesce_max", "max_request_bytes", "batch_timeout_micros", "frame_addresses")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    COALESCE_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_MICROS_FIELD_NUMBER: _ClassVar[int]
    FRAME_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    version: int
    weight: float
    addresses: _containers.RepeatedScalarFieldContainer[str]
    coalesce_max: int
    max_request_bytes: int
    batch_timeout_micros: int
    frame_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., weight: _Optional[float] = ..., addresses: _Optional[_Iterable[str]] = ..., coalesce_max: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., batch_timeout_micros: _Optional[int] = ..., frame_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelRequestStat(_message.Message):
    __slots__ = ("model", "version", "api", "code", "count", "latency_sum_seconds", "latency_buckets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    api: str
    code: str
    count: int
    latency_sum_seconds: float
    latency_buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., api: _Optional[str] = ..., code: _Optional[str] = ..., count: _Optional[int] = ..., latency_sum_seconds: _Optional[float] = ..., latency_buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class DataplaneReport(_message.Message):
    __slots__ = ("stats", "fast_path_calls", "slow_path_calls", "relays", "coalesced_calls", "rest_fast_path_calls", "framed_calls")
    STATS_FIELD_NUMBER: _ClassVar[int]
    FAST_PATH_CALLS_FIELD_NUMBER: _ClassVar[int]
    SLOW_PATH_CALLS_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    COALESCED_CALLS_FIELD_NUMBER: _ClassVar[int]
    REST_FAST_PATH_CALLS_FIELD_NUMBER: _ClassVar[int]
    FRAMED_CALLS_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.RepeatedCompositeFieldContainer[ModelRequestStat]
    fast_path_calls: int
    slow_path_calls: int
    relays: _containers.RepeatedCompositeFieldContainer[RelayStat]
    coalesced_calls: int
    rest_fast_path_calls: int
    framed_calls: int
    def __init__(self, stats: _Optional[_Iterable[_Union[ModelRequestStat, _Mapping]]] = ..., fast_path_calls: _Optional[int] = ..., slow_path_calls: _Optional[int] = ..., relays: _Optional[_Iterable[_Union[RelayStat, _Mapping]]] = ..., coalesced_calls: _Optional[int] = ..., rest_fast_path_calls: _Optional[int] = ..., framed_calls: _Optional[int] = ...) -> None: ...

class RelayStat(_message.Message):
    __slots__ = ("service", "method", "code", "count")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    service: str
    method: str
    code: str
    count: int
    def __init__(self, service: _Optional[str] = ..., method: _Optional[str] = ..., code: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...
