"""Native gRPC clients through the real Envoy edge, including reflection."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from gateway import envoy_config
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

PUBLIC_SERVICES = {
    "tokenmesh.auth.v1.AuthService",
    "tokenmesh.router.v1.RouterService",
    "tokenmesh.inference.v1.InferenceService",
    "tokenmesh.usage.v1.UsageService",
}


def test_generate_through_the_edge(channel):
    stub = rpc.InferenceServiceStub(channel)
    call = stub.Generate(
        pb.GenerateRequest(model="deterministic-test", prompt="a b c", max_tokens=4), timeout=10
    )
    messages = list(call)
    assert messages[-1].finish_reason == "length"
    assert messages[-1].usage.total_tokens == 3 + 4
    assert dict(call.initial_metadata())["x-model-version"] == "1"


def test_invalid_argument_details_survive_the_edge(channel):
    stub = rpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Complete(
            pb.CompleteRequest(model="deterministic-test", prompt="x", max_tokens=0), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details if d.Is(bad_request.DESCRIPTOR))
    assert bad_request.field_violations[0].field == "max_tokens"


def test_unknown_grpc_method_is_not_ok(channel):
    call = channel.unary_unary("/tokenmesh.inference.v1.InferenceService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    assert info.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)


def _reflect(channel, request):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))


def test_reflection_through_the_edge_lists_the_four_services(channel):
    reply = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert PUBLIC_SERVICES <= names


def test_reflection_lists_what_clients_may_call_at_the_edge_and_nothing_internal(channel):
    reply = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    protocol = {n for n in names if n.startswith(("grpc.health.", "grpc.reflection."))}
    # Every service the edge routes and transcodes for clients, jobs included.
    assert names - protocol == set(envoy_config.TRANSCODED_SERVICES)
    assert "tokenmesh.router.v1.WorkerRegistryService" not in names  # workers only
    found = _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="tokenmesh.jobs.v1.JobsService"
        ),
    )
    assert found.WhichOneof("message_response") == "file_descriptor_response", found


def test_a_generic_client_calls_generate_from_reflected_descriptors(channel):
    """What grpcurl does: fetch descriptors by symbol, build messages, call."""
    reply = _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="tokenmesh.inference.v1.InferenceService"
        ),
    )
    pool = descriptor_pool.DescriptorPool()
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in reply.file_descriptor_response.file_descriptor_proto
    ]
    pending = {p.name: p for p in protos}
    _add_with_dependencies(pool, pending, channel)
    method = pool.FindServiceByName("tokenmesh.inference.v1.InferenceService").methods_by_name[
        "Generate"
    ]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_stream(
        "/tokenmesh.inference.v1.InferenceService/Generate",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    messages = list(
        call(request_cls(model="deterministic-test", prompt="generic", max_tokens=2), timeout=10)
    )
    assert messages[-1].finish_reason == "length"


def _add_with_dependencies(pool, pending, channel) -> None:
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        if name not in pending:
            reply = _reflect(channel, reflection_pb2.ServerReflectionRequest(file_by_filename=name))
            for raw in reply.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                pending.setdefault(proto.name, proto)
        for dependency in pending[name].dependency:
            add(dependency)
        pool.Add(pending[name])
        added.add(name)

    for name in list(pending):
        add(name)
