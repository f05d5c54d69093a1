"""ModelInfer fuzzed with hypothesis: malformed shapes, datatypes, input and model names (control
characters included), raw and typed contents mixed, sizes past the message limit, parameters
of every kind, and plain byte garbage.

Every request is answered, within its deadline, with a status Triton gives for its class of
malformation (`triton_statuses`, the mapping); nothing logs an ERROR or a traceback; the server
serves real requests afterwards. Decoding alone is fuzzed too, many more times, without sockets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install hypothesis)")

from google.protobuf.message import DecodeError  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from server import codec  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from server.errors import InvalidArgument  # noqa: E402
from server.proto import grpc_service_pb2 as pb  # noqa: E402
from server.repository import Model, Repository  # noqa: E402
from tests.server.fakes import VOCAB, FakeEngine, FakeTextEngine  # noqa: E402
from tests.server.harness import RunningServer, running_server  # noqa: E402

# Cases per run: about 25 s on two shared cores for the wire test, 5 s for decoding alone.
WIRE_EXAMPLES = 3000
DECODE_EXAMPLES = 1500
CALL_TIMEOUT_S = 10.0  # every call has a deadline: a hang fails as DEADLINE_EXCEEDED, never blocks CI
MAX_MESSAGE_BYTES = 256 * 1024
MAX_BATCH = 8
MAX_SEQ = 16  # the fake engines' token limit
INFER = "/inference.GRPCInferenceService/ModelInfer"

Code = grpc.StatusCode
SERVED = {"fake", "text"}
MODEL_NAMES = ["fake", "fake", "fake", "text", "text", "nope", "", "fake\n", "fa\x00ke", "FAKE", "x" * 300, "ünï"]
VERSIONS = ["", "", "", "", "1", "2", "01", "latest", "\n"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
             "BF16", "BYTES", "", "int64", "STRING", "FP8", "INT64\x00", "INT64\n"]
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4, "INT32": 4,
            "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
CONTENT_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                  "fp32_contents", "fp64_contents", "bytes_contents"]
NAMES = ["input_ids", "attention_mask", "text", "token_type_ids", "", "x" * 300, "input_ids\n", "\x00", "input_ïds",
         "attention_mask\r\n2030-01-01 INFO forged"]
OUTPUTS = ["features", "lengths", "logits", "", "features\n"]
DIMS = st.one_of(st.integers(0, 12), st.sampled_from([-1, -7, 2**31, 2**40, 2**62, 100_000]))


def triton_statuses(body: bytes, valid: bool) -> set[grpc.StatusCode]:
    """The statuses Triton answers a ModelInfer body with, by class of malformation (first match):

    | class | statuses | who answers, in Triton |
    | --- | --- | --- |
    | larger than the server's message limit | RESOURCE_EXHAUSTED | gRPC, before parsing |
    | bytes that are not a ModelInferRequest | INVALID_ARGUMENT "Unable to parse request" | grpc++'s words (its status is INTERNAL) |
    | a model (or version) that is not served | NOT_FOUND | Triton, "Request for unknown model" |
    | a served model, well formed | OK | |
    | a served model, anything else | INVALID_ARGUMENT | Triton's input checks |

    plus UNAVAILABLE ("Request timeout expired") for a request whose `timeout` parameter may run
    out while it waits, as Triton's queue policy answers."""
    if len(body) > MAX_MESSAGE_BYTES:
        return {Code.RESOURCE_EXHAUSTED}
    try:
        request = pb.ModelInferRequest.FromString(body)
    except DecodeError:
        return {Code.INVALID_ARGUMENT}
    if request.model_name not in SERVED or request.model_version not in ("", "1"):
        return {Code.NOT_FOUND}
    codes = {Code.OK} if valid else {Code.OK, Code.INVALID_ARGUMENT}
    timeout = request.parameters.get("timeout")
    if timeout is not None and timeout.WhichOneof("parameter_choice") in ("int64_param", "uint64_param"):
        codes.add(Code.UNAVAILABLE)
    return codes


# -- requests -----------------------------------------------------------------------------------------

@st.composite
def tensor_data(draw, datatype: str, shape: list[int]) -> tuple[bytes | None, dict | None]:  # type: ignore[no-untyped-def]
    """Raw bytes (often exactly the right length for the shape, sometimes not) or typed
    contents in any field."""
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    kind = draw(st.sampled_from(["raw-exact", "raw-any", "typed", "none"]))
    if kind == "raw-exact" and 0 <= count <= 200_000 and datatype in ITEMSIZE:
        size = count * ITEMSIZE[datatype]
        head = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
        return head + bytes(max(0, size - 64)), None
    if kind == "raw-exact" and datatype == "BYTES" and 0 <= count <= 64:
        parts = [draw(st.binary(max_size=12)) for _ in range(count)]
        return b"".join(len(p).to_bytes(4, "little") + p for p in parts), None
    if kind in ("raw-any", "raw-exact"):
        return draw(st.binary(max_size=96)), None
    if kind == "typed":
        field = draw(st.sampled_from(CONTENT_FIELDS))
        values = {
            "bool_contents": st.booleans(), "int_contents": st.integers(-2**31, 2**31 - 1),
            "int64_contents": st.integers(-2**63, 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
            "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
            "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8),
        }[field]
        size = count if 0 <= count <= 64 and draw(st.booleans()) else draw(st.integers(0, 20))
        return None, {field: draw(st.lists(values, min_size=size, max_size=size))}
    return None, None


@st.composite
def parameters(draw) -> dict:  # type: ignore[no-untyped-def]
    keys = st.sampled_from(["priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                            "triton_enable_empty_final_response", "truncate", "binary_data_output", "whatever",
                            "", "timeout\n", "top_k", "all_scores", "dimensions"])
    values = st.one_of(
        st.builds(lambda v: ("bool_param", v), st.booleans()),
        st.builds(lambda v: ("int64_param", v), st.integers(-2**63, 2**63 - 1)),
        st.builds(lambda v: ("uint64_param", v), st.integers(0, 2**64 - 1)),
        st.builds(lambda v: ("string_param", v), st.text(max_size=8)),
        st.builds(lambda v: ("double_param", v), st.floats()),
    )
    return draw(st.dictionaries(keys, values, max_size=3))


def _add_parameters(draw, request: pb.ModelInferRequest) -> None:  # type: ignore[no-untyped-def]
    for key, (kind, value) in draw(parameters()).items():
        setattr(request.parameters[key], kind, value)


@st.composite
def random_requests(draw) -> pb.ModelInferRequest:  # type: ignore[no-untyped-def]
    """Requests built from scratch: anything goes, raw and typed contents mixed included."""
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(MODEL_NAMES)),
                                   model_version=draw(st.sampled_from(VERSIONS)), id=draw(st.text(max_size=8)))
    use_raw = draw(st.booleans())
    raws: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES))
        datatype = draw(st.sampled_from(["INT64", "INT64", "BYTES", *DATATYPES]))
        shape = draw(st.lists(DIMS, min_size=0, max_size=4))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        raw, contents = draw(tensor_data(datatype, shape))
        if use_raw:
            raws.append(raw if raw is not None else b"")
        if contents and (not use_raw or draw(st.booleans())):  # typed, or typed next to raw
            (field, values), = contents.items()
            getattr(tensor.contents, field).extend(values)
    if use_raw:
        extra = draw(st.integers(-1, 1))  # sometimes one raw entry too many or too few
        raws = raws[:len(raws) + extra] if extra < 0 else raws + [b"\x00"] * extra
        request.raw_input_contents.extend(raws)
    _add_parameters(draw, request)
    for name in draw(st.lists(st.sampled_from(OUTPUTS), max_size=2)):
        request.outputs.add(name=name)
    return request


@st.composite
def near_valid_requests(draw) -> tuple[pb.ModelInferRequest, bool]:  # type: ignore[no-untyped-def]
    """A request for one of the fake models (tokens or texts), often valid, then up to three
    mutations, so validation is exercised deep down and not only at its first check. Also says
    whether the request is valid (a mutation may happen to leave it valid; then it says no)."""
    if draw(st.booleans()):
        request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["fake", "text"])))
        batch, seq = draw(st.integers(1, MAX_BATCH + 2)), draw(st.integers(1, MAX_SEQ + 2))
        # Values from a drawn seed: drawing each of up to 180 ids would make hypothesis, not the
        # server, the slow part of the test.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        ids = rng.integers(0, draw(st.sampled_from([VOCAB, VOCAB, VOCAB + 20])), (batch, seq), dtype=np.int64)
        low, high = draw(st.sampled_from([(1, 2), (0, 2), (0, 2), (-1, 3)]))  # [low, high): the mask's values
        mask = rng.integers(low, high, (batch, seq), dtype=np.int64)
        for name, array in (("input_ids", ids), ("attention_mask", mask)):
            request.inputs.add(name=name, datatype="INT64", shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        valid = batch <= MAX_BATCH and seq <= MAX_SEQ and ids.max() < VOCAB and set(np.unique(mask)) <= {0, 1}
    else:
        request = pb.ModelInferRequest(model_name="text")
        texts = draw(st.lists(st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=10)),
                              min_size=1, max_size=MAX_BATCH + 2))
        shape = [len(texts), 1] if draw(st.booleans()) else [len(texts)]
        request.inputs.add(name="text", datatype="BYTES", shape=shape)
        request.raw_input_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
        valid = len(texts) <= MAX_BATCH and all(_utf8(t) for t in texts)
    mutations = draw(st.integers(0, 3))
    for _ in range(mutations):
        mutation = draw(st.sampled_from(["dtype", "shape", "bytes", "drop", "extra", "typed", "raw+typed", "params",
                                         "outputs", "model", "name"]))
        tensor = request.inputs[draw(st.integers(0, len(request.inputs) - 1))] if request.inputs else None
        if mutation == "dtype" and tensor is not None:
            tensor.datatype = draw(st.sampled_from(DATATYPES))
        elif mutation == "shape" and tensor is not None:
            tensor.shape[:] = draw(st.lists(DIMS, min_size=0, max_size=4))
        elif mutation == "bytes" and request.raw_input_contents:
            index = draw(st.integers(0, len(request.raw_input_contents) - 1))
            raw = request.raw_input_contents[index]
            request.raw_input_contents[index] = raw[:draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=9))
        elif mutation == "drop" and tensor is not None:
            index = list(request.inputs).index(tensor)
            del request.inputs[index]
            if len(request.raw_input_contents) > index:
                del request.raw_input_contents[index]
        elif mutation == "extra":
            request.inputs.add(name=draw(st.sampled_from(NAMES)), datatype="INT64", shape=[1, 2])
            request.raw_input_contents.append(bytes(16))
        elif mutation in ("typed", "raw+typed") and tensor is not None:
            if mutation == "typed":
                del request.raw_input_contents[:]
            field = draw(st.sampled_from(CONTENT_FIELDS))
            getattr(tensor.contents, field).extend(draw(st.lists(st.integers(0, 3), max_size=20))
                                                   if field not in ("bool_contents", "bytes_contents", "fp32_contents",
                                                                    "fp64_contents") else [])
            tensor.contents.SetInParent()
        elif mutation == "params":
            _add_parameters(draw, request)
        elif mutation == "outputs":
            request.outputs.add(name=draw(st.sampled_from(OUTPUTS)))
        elif mutation == "model":
            request.model_name = draw(st.sampled_from(MODEL_NAMES))
            request.model_version = draw(st.sampled_from(VERSIONS))
        elif mutation == "name" and tensor is not None:
            tensor.name = draw(st.sampled_from(NAMES))
    return request, valid and mutations == 0


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def infer_requests() -> st.SearchStrategy[pb.ModelInferRequest]:
    return st.one_of(near_valid_requests().map(lambda case: case[0]), near_valid_requests().map(lambda case: case[0]),
                     random_requests())


@st.composite
def garbage(draw) -> bytes:  # type: ignore[no-untyped-def]
    """Bytes that are mostly not a ModelInferRequest: random, or a real request's bytes cut short,
    with bytes flipped, or with bytes spliced in."""
    kind = draw(st.sampled_from(["random", "cut", "flipped", "spliced"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    body = draw(near_valid_requests())[0].SerializeToString()
    if kind == "cut":
        return body[:draw(st.integers(0, max(0, len(body) - 1)))]
    at = draw(st.integers(0, max(0, len(body) - 1)))
    if kind == "flipped":
        return body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:] if body else b"\xff"
    return body[:at] + draw(st.binary(min_size=1, max_size=16)) + body[at:]


@st.composite
def oversized(draw) -> bytes:  # type: ignore[no-untyped-def]
    """A well-formed request just past the server's message limit. (Few of them: gRPC takes about
    200 ms to refuse each, whatever its size.)"""
    width = MAX_MESSAGE_BYTES // 8 + draw(st.integers(1, 1024))
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["fake", "nope"])))
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, width])
    request.raw_input_contents.append(bytes(8 * width))
    return request.SerializeToString()


def wire_cases() -> st.SearchStrategy[tuple[bytes, bool]]:
    """(ModelInfer body, whether it is a valid request)."""
    return st.one_of(
        near_valid_requests().map(lambda case: (case[0].SerializeToString(), case[1])),
        near_valid_requests().map(lambda case: (case[0].SerializeToString(), case[1])),
        random_requests().map(lambda request: (request.SerializeToString(), False)),
        garbage().map(lambda body: (body, False)),
        st.just(b"").map(lambda body: (body, False)),  # an empty body is an empty message: model '' is not served
    )


def _request_with_shape(shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fake", raw_input_contents=[b"", b""])
    for name in ("input_ids", "attention_mask"):
        request.inputs.add(name=name, datatype="INT64", shape=shape)
    return request


def _models() -> dict[str, Model]:
    config = ModelConfig(max_batch_size=MAX_BATCH)
    return {"fake": Model(name="fake", version=1, engine=FakeEngine(), config=config),
            "text": Model(name="text", version=1, engine=FakeTextEngine(), config=config)}


# -- decoding alone -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    return _models()


@settings(max_examples=DECODE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=infer_requests())
@example(request=_request_with_shape([0, 2**31, 2**31]))  # numpy cannot describe it (found by this test)
def test_decoding_any_request_either_succeeds_or_raises_invalid_argument(models: dict[str, Model],
                                                                        request: pb.ModelInferRequest):
    model = models.get(request.model_name, models["fake"])
    mixed = bool(request.raw_input_contents) and any(t.HasField("contents") for t in request.inputs)
    try:
        codec.request_options(request)
        inputs = codec.decode_inputs(request, model)
        if model.text_input in inputs:
            size = model.check_text(inputs)
        else:
            size = model.check_inputs(inputs)
        codec.requested_outputs(request, model)
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert not mixed, "raw and typed contents together must be refused, as Triton does"
    assert 1 <= size <= model.max_batch_size


# -- over the wire --------------------------------------------------------------------------------------

class Trouble(logging.Handler):
    """Collects what an operator would be paged for: WARNING and up, or any traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def trouble() -> Iterator[Trouble]:
    handler = Trouble()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def fuzz_server(trouble: Trouble) -> Iterator[RunningServer]:
    with running_server(Repository(models=_models()), max_message_bytes=MAX_MESSAGE_BYTES) as running:
        yield running


@pytest.fixture(scope="module")
def infer(fuzz_server: RunningServer) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """ModelInfer taking and giving bytes, on one channel for every example."""
    with grpc.insecure_channel(fuzz_server.url, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield channel.unary_unary(INFER)


def call(infer: grpc.UnaryUnaryMultiCallable, body: bytes, valid: bool) -> None:
    """Send `body` as a ModelInfer request and check its status against Triton's for its class."""
    try:
        infer(body, timeout=CALL_TIMEOUT_S)
        code, details = Code.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    expected = triton_statuses(body, valid)
    triton = sorted(c.name for c in expected)
    assert code in expected, f"{code.name} ({details}) for a body Triton answers with {triton}"
    if code != Code.OK:
        assert details, code
    if code == Code.INVALID_ARGUMENT and len(body) <= MAX_MESSAGE_BYTES and not _parses(body):
        assert details.startswith("Unable to parse request"), details


def _parses(body: bytes) -> bool:
    try:
        pb.ModelInferRequest.FromString(body)
    except DecodeError:
        return False
    return True


@settings(max_examples=WIRE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=wire_cases())
@example(case=(b"\xff\xff\xff\xff", False))
@example(case=(b"\x0a\x02\xff\xfe", False))  # model_name that is not UTF-8: protobuf refuses to parse it
def test_every_model_infer_body_gets_a_status_triton_gives_for_its_class(infer: grpc.UnaryUnaryMultiCallable,
                                                                        case: tuple[bytes, bool]):
    call(infer, *case)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(body=oversized())
def test_bodies_past_the_message_limit_are_refused_by_grpc_as_by_triton(infer: grpc.UnaryUnaryMultiCallable,
                                                                        body: bytes):
    call(infer, body, valid=False)


def test_the_server_still_answers_real_requests_after_the_fuzzing(fuzz_server: RunningServer):
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    request = service_pb2.ModelInferRequest(model_name="fake")
    for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    with grpc.insecure_channel(fuzz_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=CALL_TIMEOUT_S).live
    assert [o.name for o in response.outputs] == ["features", "lengths"]


def test_nothing_the_fuzzing_sent_logged_an_error_or_a_traceback(fuzz_server: RunningServer, trouble: Trouble):
    assert [f"{r.name} {r.levelname}: {r.getMessage()}" for r in trouble.records] == []
