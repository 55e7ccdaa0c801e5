import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tokenmesh.router.v1 import router_pb2 as _router_pb2
from tokenmesh.type.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListCatalogModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCatalogModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_router_pb2.CatalogModel]
    def __init__(self, models: _Optional[_Iterable[_Union[_router_pb2.CatalogModel, _Mapping]]] = ...) -> None: ...

class GetCatalogModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetCatalogModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class RegisterModelVersionRequest(_message.Message):
    __slots__ = ("model", "version", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    weight: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class RegisterModelVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class SetTrafficSplitRequest(_message.Message):
    __slots__ = ("model", "weights")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.RepeatedCompositeFieldContainer[_router_pb2.TrafficWeight]
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[_router_pb2.TrafficWeight, _Mapping]]] = ...) -> None: ...

class SetTrafficSplitResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class PinModelVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PinModelVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class DeprecateModelVersionRequest(_message.Message):
    __slots__ = ("model", "version", "sunset_time")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUNSET_TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    sunset_time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., sunset_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeprecateModelVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class SetFallbackModelRequest(_message.Message):
    __slots__ = ("model", "fallback_model")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    fallback_model: str
    def __init__(self, model: _Optional[str] = ..., fallback_model: _Optional[str] = ...) -> None: ...

class SetFallbackModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class SetModelAliasRequest(_message.Message):
    __slots__ = ("model", "alias", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    version: str
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SetModelAliasResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _router_pb2.CatalogModel
    def __init__(self, model: _Optional[_Union[_router_pb2.CatalogModel, _Mapping]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "address", "models")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[_types_pb2.ModelRef]
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_types_pb2.ModelRef, _Mapping]]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("lease_duration",)
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    lease_duration: _duration_pb2.Duration
    def __init__(self, lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("worker_id", "models")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    models: _containers.RepeatedCompositeFieldContainer[_types_pb2.ModelRef]
    def __init__(self, worker_id: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_types_pb2.ModelRef, _Mapping]]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease_expire_time", "drain")
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    lease_expire_time: _timestamp_pb2.Timestamp
    drain: bool
    def __init__(self, lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., drain: _Optional[bool] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: _router_pb2.Worker
    def __init__(self, worker: _Optional[_Union[_router_pb2.Worker, _Mapping]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_router_pb2.Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[_router_pb2.Worker, _Mapping]]] = ...) -> None: ...
