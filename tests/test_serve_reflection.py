"""Server reflection under both names: grpc.reflection.v1 and grpc.reflection.v1alpha."""

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICES = {"mmsim.v1.MemoryManager", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"}


async def _ask(method: grpc.aio.StreamStreamMultiCallable, requests: list) -> list:
    return [r async for r in method(iter(requests))]


async def test_v1alpha_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]  # the stubs' reflection stub is for a sync channel
    [listed] = await _ask(stub.ServerReflectionInfo, [reflection_pb2.ServerReflectionRequest(list_services="")])  # type: ignore[arg-type]  # the stubs' reflection stub is for a sync channel
    assert {s.name for s in listed.list_services_response.service} == SERVICES


async def test_v1_lists_the_services_and_describes_itself(channel: grpc.aio.Channel) -> None:
    # grpcio-reflection ships no v1 stubs: the v1 messages are the ones the server put in the pool.
    pool = descriptor_pool.Default()
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
    listed, described, mmsim = await _ask(info, [
        request(list_services=""),
        request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        request(file_containing_symbol="mmsim.v1.MemoryManager"),
    ])
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    fd = descriptor_pb2.FileDescriptorProto.FromString(described.file_descriptor_response.file_descriptor_proto[0])
    assert (fd.name, fd.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    [method] = fd.service[0].method
    assert (method.name, method.input_type) == ("ServerReflectionInfo", ".grpc.reflection.v1.ServerReflectionRequest")
    assert mmsim.file_descriptor_response.file_descriptor_proto
