"""Wire form ↔ numpy: raw and typed contents, BYTES, and every mismatch named."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from server import codec
from server.config import ModelConfig
from server.errors import InvalidArgument
from server.proto import grpc_service_pb2 as pb
from server.repository import Model
from tests.server.fakes import FakeEngine


@pytest.fixture
def model() -> Model:
    return Model(name="fake", version=1, engine=FakeEngine(), config=ModelConfig())


def raw_request(**arrays: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fake")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=codec.datatype(array.dtype), shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def ids_and_mask(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    ids = np.arange(batch * seq, dtype=np.int64).reshape(batch, seq)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_raw_inputs_decode_to_writable_arrays(model: Model):
    arrays = codec.decode_inputs(raw_request(**ids_and_mask()), model)
    np.testing.assert_array_equal(arrays["input_ids"], ids_and_mask()["input_ids"])
    assert arrays["input_ids"].flags.writeable
    assert model.check_inputs(arrays) == 2


def test_typed_contents_decode_like_raw(model: Model):
    expected = ids_and_mask()
    request = pb.ModelInferRequest(model_name="fake")
    for name, array in expected.items():
        tensor = request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        tensor.contents.int64_contents.extend(array.reshape(-1).tolist())
    arrays = codec.decode_inputs(request, model)
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name])
        assert arrays[name].dtype == np.int64


@pytest.mark.parametrize(
    "kserve_type, field, values",
    [("INT8", "int_contents", [-3, 4]), ("UINT16", "uint_contents", [7, 65535]),
     ("FP32", "fp32_contents", [0.5, -2.0]), ("FP64", "fp64_contents", [1e300, 2.0]),
     ("BOOL", "bool_contents", [True, False]), ("UINT64", "uint64_contents", [2**63, 1])],
)
def test_narrow_types_travel_in_their_widened_typed_field(kserve_type: str, field: str, values: list):
    contents = pb.InferTensorContents(**{field: values})
    array = codec.decode_tensor("x", kserve_type, (2,), None, contents)
    assert array.dtype == np.dtype(codec.DTYPE_OF[kserve_type])
    np.testing.assert_array_equal(array, np.array(values, dtype=array.dtype))


def test_bytes_decode_from_raw_length_prefixed_and_typed_contents():
    elements = [b"hello", b"", "caf\u00e9".encode()]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    from_raw = codec.decode_tensor("text", "BYTES", (3,), raw, None)
    from_typed = codec.decode_tensor("text", "BYTES", (3,), None, pb.InferTensorContents(bytes_contents=elements))
    assert from_raw.tolist() == from_typed.tolist() == elements
    assert codec.encode_tensor(from_raw) == raw


@pytest.mark.parametrize(
    "raw, message",
    [(b"\x05\x00\x00\x00abc", "longer than the data left"), (b"\x01\x00", "inside an element's length prefix"),
     (struct.pack("<I", 1) + b"a", "has 1 BYTES elements, expected 3")],
)
def test_malformed_raw_bytes_are_invalid_argument(raw: bytes, message: str):
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_tensor("text", "BYTES", (3,), raw, None)


def test_raw_byte_length_must_match_shape_and_datatype(model: Model):
    request = raw_request(**ids_and_mask())
    request.raw_input_contents[0] = request.raw_input_contents[0][:-8]
    message = r"input 'input_ids' has 72 bytes of raw data, expected 80 for shape \[2, 5\] and datatype INT64"
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_inputs(request, model)


def test_typed_value_count_must_match_shape():
    message = r"input 'x' has 3 values in contents.int64_contents, expected 4 for shape \[2, 2\]"
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_tensor("x", "INT64", (2, 2), None, pb.InferTensorContents(int64_contents=[1, 2, 3]))


def test_typed_values_out_of_the_datatype_range_are_invalid_argument():
    with pytest.raises(InvalidArgument, match="outside the range of UINT8"):
        codec.decode_tensor("x", "UINT8", (1,), None, pb.InferTensorContents(uint_contents=[300]))


def test_negative_and_huge_dims_never_allocate(model: Model):
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_tensor("x", "INT64", (2, -1), b"", None)
    with pytest.raises(InvalidArgument, match="bytes of raw data, expected"):
        codec.decode_tensor("x", "INT64", (2**20, 2**10), b"\x00" * 8, None)
    with pytest.raises(InvalidArgument, match=r"shape \[1099511627776, 1048576\], too large for any message"):
        codec.decode_tensor("x", "INT64", (2**40, 2**20), b"\x00" * 8, None)
    with pytest.raises(InvalidArgument, match="too large for any message"):  # empty, yet beyond numpy's shapes
        codec.decode_tensor("x", "INT64", (0, 2**31, 2**31), b"", None)


def test_wrong_datatype_names_the_input_and_both_types(model: Model):
    arrays = ids_and_mask()
    arrays["attention_mask"] = arrays["attention_mask"].astype(np.float32)
    with pytest.raises(InvalidArgument, match="input 'attention_mask' has datatype FP32, expected INT64"):
        codec.decode_inputs(raw_request(**arrays), model)


def test_missing_unknown_and_duplicate_inputs_are_named(model: Model):
    arrays = ids_and_mask()
    with pytest.raises(InvalidArgument, match="missing input\\(s\\) 'attention_mask'"):
        codec.decode_inputs(raw_request(input_ids=arrays["input_ids"]), model)
    with pytest.raises(InvalidArgument, match="unknown input 'token_type_ids'"):
        codec.decode_inputs(raw_request(**arrays, token_type_ids=arrays["input_ids"]), model)
    request = raw_request(**arrays)
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    with pytest.raises(InvalidArgument, match="input 'input_ids' is given twice"):
        codec.decode_inputs(request, model)


def test_raw_contents_must_cover_every_input_or_none(model: Model):
    request = raw_request(**ids_and_mask())
    del request.raw_input_contents[1]
    with pytest.raises(InvalidArgument, match="1 raw_input_contents for 2 inputs"):
        codec.decode_inputs(request, model)


@pytest.mark.parametrize("field, values", [("int64_contents", [1, 2]), ("int64_contents", []),
                                           ("fp32_contents", [1.0])])
def test_typed_contents_next_to_raw_contents_are_refused_in_tritons_words(model: Model, field: str, values: list):
    request = raw_request(**ids_and_mask())
    getattr(request.inputs[1].contents, field).extend(values)
    if not values:
        request.inputs[1].contents.SetInParent()  # present though empty: still a second source of data
    with pytest.raises(InvalidArgument, match="^contents field must not be specified when using raw_input_contents "
                                              "for 'attention_mask' for model 'fake'$"):
        codec.decode_inputs(request, model)


def test_shape_value_range_and_batch_limits_are_checked_against_the_engine(model: Model):
    ok = ids_and_mask(batch=2, seq=5)
    with pytest.raises(InvalidArgument, match=r"input 'input_ids' dim 1 \(seq\) is 17, allowed range is \[1, 16\]"):
        model.check_inputs(ids_and_mask(seq=17))
    with pytest.raises(InvalidArgument, match="input 'input_ids' has rank 1"):
        model.check_inputs({"input_ids": ok["input_ids"][0], "attention_mask": ok["attention_mask"][0]})
    with pytest.raises(InvalidArgument, match=r"input 'input_ids' holds value 100, outside the allowed range"):
        model.check_inputs({**ok, "input_ids": np.full((2, 5), 100, np.int64)})
    with pytest.raises(InvalidArgument, match="batch size 9, more than model 'fake' accepts \\(max_batch_size 8\\)"):
        model.check_inputs(ids_and_mask(batch=9))
    small = Model(name="small", version=1, engine=FakeEngine(), config=ModelConfig(max_batch_size=2))
    with pytest.raises(InvalidArgument, match="max_batch_size 2"):
        small.check_inputs(ids_and_mask(batch=3))


def test_requested_outputs_default_to_all_and_unknown_ones_are_refused(model: Model):
    request = pb.ModelInferRequest()
    assert codec.requested_outputs(request, model) == ["features", "lengths"]
    request.outputs.add(name="lengths")
    assert codec.requested_outputs(request, model) == ["lengths"]
    request.outputs.add(name="logits")
    with pytest.raises(InvalidArgument, match="unknown output 'logits'"):
        codec.requested_outputs(request, model)


def test_response_carries_raw_little_endian_outputs_and_echoes_the_id(model: Model):
    request = pb.ModelInferRequest(model_name="fake", id="req-7")
    features = np.arange(8, dtype=np.float32).reshape(2, 4)
    response = codec.encode_response(request, model, {"features": features, "lengths": np.array([3, 4])}, ["features"])
    assert response.id == "req-7" and response.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("features", "FP32", [2, 4])]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 4), features)


def test_datatype_tables_cover_every_engine_dtype():
    for dtype in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"):
        assert codec.DTYPE_OF[codec.datatype(dtype)] == dtype
        assert codec.config_datatype(dtype).startswith("TYPE_")
    assert codec.config_datatype("object") == "TYPE_STRING"
