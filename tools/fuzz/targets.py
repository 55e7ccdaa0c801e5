"""What the fuzzer attacks: every public RPC (from the edge's contract) and its REST route."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, MethodDescriptor

from gateway.edge_auth import PUBLIC, RPC_SCOPES

# Generated modules of public services outside the style guide's layout
# (tokenmesh.<api>.<version>.<api>_service_pb2, which is imported by name).
SERVICE_MODULES = {
    "grpc.health.v1.Health": "grpc_health.v1.health_pb2",  # answered at the edge
    "tokenmesh.openai.v1.OpenAIBatchService": "tokenmesh.openai.v1.openai_batch_service_pb2",
    "tokenmesh.jobs.v1.HandoverService": "tokenmesh.jobs.v1.handover_service_pb2",
}
# RPCs that change state the other cases read (run them last, so that a
# pinned, deprecated or re-split model does not hide the read paths).
_WRITE_VERB = re.compile(r"^(Create|Revoke|Rotate|Register|Set|Pin|Deprecate)")
# RPCs that run a model: they may legitimately take long, so a client deadline is no hang.
WORK_RPCS = frozenset({"Generate", "Complete", "Embed"})
_HTTP_VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Route:
    """Route is an RPC's REST binding (google.api.http)."""

    method: str  # GET, POST, ...
    template: str  # /v1/models/{model}:generate
    body: str  # "*" or "" (no body: fields travel as query parameters)

    def variables(self) -> list[str]:
        """Returns the path template's variable names, in order."""
        return re.findall(r"{([^}=]+)", self.template)


@dataclass(frozen=True)
class Rpc:
    """Rpc is one public RPC as the edge exposes it."""

    path: str  # /tokenmesh.inference.v1.InferenceService/Generate
    scope: str  # the scope the edge requires (PUBLIC: none)
    method: MethodDescriptor
    route: Route | None

    @property
    def name(self) -> str:
        """Returns the method's short name (Generate)."""
        return self.path.rsplit("/", 1)[1]

    @property
    def label(self) -> str:
        """Returns a unique short label: the name, with the API version unless it is v1."""
        version = self.path.lstrip("/").split("/")[0].split(".")[-2]
        return self.name if version == "v1" else f"{self.name}.{version}"

    @property
    def input(self) -> Descriptor:
        """Returns the request message's descriptor."""
        return self.method.input_type

    @property
    def server_streaming(self) -> bool:
        """Tells whether the RPC streams its responses."""
        return bool(self.method.server_streaming)

    @property
    def public(self) -> bool:
        """Tells whether the edge serves it without credentials."""
        return self.scope == PUBLIC

    @property
    def writes(self) -> bool:
        """Tells whether the RPC changes shared state (catalogue, keys)."""
        return bool(_WRITE_VERB.match(self.name))


def _route(method: MethodDescriptor) -> Route | None:
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    for verb in _HTTP_VERBS:
        template = getattr(rule, verb)
        if template:
            return Route(verb.upper(), template, rule.body)
    return None


def _module(service: str) -> str:
    """Returns the generated module that defines `service` (tokenmesh.<api>.<v>.Name)."""
    if service in SERVICE_MODULES:
        return SERVICE_MODULES[service]
    package = service.rsplit(".", 1)[0]
    return f"{package}.{package.split('.')[1]}_service_pb2"


def public_rpcs() -> list[Rpc]:
    """Returns every RPC in the edge's RPC_SCOPES, reads first and writes last."""
    pool = descriptor_pool.Default()
    rpcs = []
    for path, scope in RPC_SCOPES.items():
        service, name = path.lstrip("/").split("/")
        importlib.import_module(_module(service))
        try:
            method = pool.FindServiceByName(service).methods_by_name[name]
        except KeyError as missing:
            raise LookupError(
                f"{path}: no descriptor; add its module to SERVICE_MODULES"
            ) from missing
        rpcs.append(Rpc(path, scope, method, _route(method)))
    return sorted(rpcs, key=lambda r: r.writes)
