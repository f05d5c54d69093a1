"""Our hand-written .proto files against tritonclient's generated descriptors: same service,
same methods, and for every message we define the same field numbers, types and cardinality.
Names of .proto files differ (they never travel on the wire); what the wire sees must not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from server.proto import POOL, grpc_service_pb2, model_config_pb2
from server.service import InferenceService


def messages(file: FileDescriptor) -> Iterator[Descriptor]:
    def walk(message: Descriptor) -> Iterator[Descriptor]:
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    for message in file.message_types_by_name.values():
        yield from walk(message)


def enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()
    for message in messages(file):
        yield from message.enum_types


def wire(field: FieldDescriptor) -> tuple:
    """What a field looks like on the wire (and to a decoder): number, type, repeated, and the
    full name of its message or enum type."""
    kind = field.message_type or field.enum_type
    return field.number, field.type, field.is_repeated, kind.full_name if kind else None


OURS = {m.full_name: m for f in (grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR) for m in messages(f)}
THEIRS = {m.full_name: m for f in (triton_service.DESCRIPTOR, triton_config.DESCRIPTOR) for m in messages(f)}
SERVICE_MESSAGES = sorted(m.full_name for m in messages(grpc_service_pb2.DESCRIPTOR))
CONFIG_MESSAGES = sorted(m.full_name for m in messages(model_config_pb2.DESCRIPTOR))


def test_our_descriptors_live_in_a_private_pool_next_to_tritonclients():
    assert grpc_service_pb2.DESCRIPTOR.pool is POOL
    assert triton_service.DESCRIPTOR.pool is not POOL
    assert grpc_service_pb2.DESCRIPTOR.package == triton_service.DESCRIPTOR.package == "inference"


def test_the_service_has_tritons_methods_with_the_same_types_and_streaming():
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"

    def shape(method):  # type: ignore[no-untyped-def]
        return (method.name, method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming)

    assert [shape(m) for m in ours.methods] == [shape(m) for m in theirs.methods]
    assert len(ours.methods) == 20


@pytest.mark.parametrize("name", SERVICE_MESSAGES)
def test_service_messages_match_tritons_field_for_field(name: str):
    theirs = THEIRS.get(name)
    assert theirs is not None, f"{name} is not a Triton message"
    assert {f.name: wire(f) for f in OURS[name].fields} == {f.name: wire(f) for f in theirs.fields}


@pytest.mark.parametrize("name", CONFIG_MESSAGES)
def test_model_config_messages_are_a_subset_of_tritons_with_the_same_numbers(name: str):
    theirs = THEIRS.get(name)
    assert theirs is not None, f"{name} is not a Triton message"
    their_fields = {f.name: wire(f) for f in theirs.fields}
    for field in OURS[name].fields:
        assert their_fields.get(field.name) == wire(field), f"{name}.{field.name}"


def test_enums_have_tritons_values():
    theirs = {e.full_name: e for f in (triton_service.DESCRIPTOR, triton_config.DESCRIPTOR) for e in enums(f)}
    for enum in (*enums(grpc_service_pb2.DESCRIPTOR), *enums(model_config_pb2.DESCRIPTOR)):
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in theirs[enum.full_name].values}


def test_messages_round_trip_between_our_stubs_and_tritonclients():
    request = triton_service.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x01\x02"])
    request.inputs.add(name="x", datatype="INT8", shape=[2])
    request.parameters["priority"].int64_param = 3
    ours = grpc_service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert (ours.model_name, ours.id, list(ours.inputs[0].shape)) == ("m", "7", [2])
    assert ours.parameters["priority"].int64_param == 3
    assert triton_service.ModelInferRequest.FromString(ours.SerializeToString()) == request


def test_every_rpc_is_answered_by_the_service_itself():
    """No RPC falls through to the generated base class (whose default is not a clean status)."""
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert method.name in vars(InferenceService), method.name
