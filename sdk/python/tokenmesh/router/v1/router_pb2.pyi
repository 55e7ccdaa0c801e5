import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tokenmesh.type.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CatalogVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATALOG_VERSION_STATE_UNSPECIFIED: _ClassVar[CatalogVersionState]
    CATALOG_VERSION_STATE_ACTIVE: _ClassVar[CatalogVersionState]
    CATALOG_VERSION_STATE_DEPRECATED: _ClassVar[CatalogVersionState]
    CATALOG_VERSION_STATE_SUNSET: _ClassVar[CatalogVersionState]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_SERVING: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]
CATALOG_VERSION_STATE_UNSPECIFIED: CatalogVersionState
CATALOG_VERSION_STATE_ACTIVE: CatalogVersionState
CATALOG_VERSION_STATE_DEPRECATED: CatalogVersionState
CATALOG_VERSION_STATE_SUNSET: CatalogVersionState
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_SERVING: WorkerState
WORKER_STATE_DRAINING: WorkerState

class CatalogModel(_message.Message):
    __slots__ = ("name", "versions", "aliases", "fallback_model", "pinned_version")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODEL_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[CatalogVersion]
    aliases: _containers.ScalarMap[str, str]
    fallback_model: str
    pinned_version: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[CatalogVersion, _Mapping]]] = ..., aliases: _Optional[_Mapping[str, str]] = ..., fallback_model: _Optional[str] = ..., pinned_version: _Optional[str] = ...) -> None: ...

class CatalogVersion(_message.Message):
    __slots__ = ("version", "weight", "state", "sunset_time", "healthy_workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUNSET_TIME_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: int
    state: CatalogVersionState
    sunset_time: _timestamp_pb2.Timestamp
    healthy_workers: int
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[int] = ..., state: _Optional[_Union[CatalogVersionState, str]] = ..., sunset_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., healthy_workers: _Optional[int] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("id", "address", "models", "state", "lease_expire_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[_types_pb2.ModelRef]
    state: WorkerState
    lease_expire_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_types_pb2.ModelRef, _Mapping]]] = ..., state: _Optional[_Union[WorkerState, str]] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrafficWeight(_message.Message):
    __slots__ = ("version", "weight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: int
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...
