"""OpenVINO engines split batches over CPU streams and compile static copies of their model for
the shapes they keep running."""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import optimize
from optimize.runtime.backends.openvino_shapes import AFTER, AGE_EVERY, StaticShapes, shape_key
from optimize.runtime.errors import ConfigError

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'kiln[cpu-engines]')")


def _key(batch: int, seq: int) -> tuple:
    return shape_key({"input_ids": np.zeros((batch, seq)), "attention_mask": np.zeros((batch, seq))})


class Compiler:
    """Stands in for OpenVINO's compile in the policy tests: records what it was asked for."""

    def __init__(self, fail: set | None = None) -> None:
        self.asked: list[tuple] = []
        self.fail = fail or set()

    def __call__(self, key: tuple) -> str:
        self.asked.append(key)
        if key in self.fail:
            raise RuntimeError("Exception from src/plugin.cpp:1:\nshape not supported")
        return f"copy {key}"


def _call(shapes: StaticShapes, key: tuple, times: int = 1) -> object:
    found = None
    for _ in range(times):
        found = shapes.lookup(key)
        shapes.wait()
    return found


def test_a_shape_gets_its_copy_once_it_repeats_and_calls_before_that_run_dynamic():
    compiler = Compiler()
    shapes = StaticShapes(compiler, capacity=2)
    a = _key(8, 128)
    assert _call(shapes, a, AFTER) is None, "the calls that earn a copy run on the dynamic model"
    assert compiler.asked == [a]
    assert _call(shapes, a) == f"copy {a}"
    _call(shapes, a, 5)
    assert compiler.asked == [a], "compiled once"
    assert shapes.shapes == [a]


def test_a_full_set_of_copies_gives_a_slot_only_to_a_shape_used_twice_as_often():
    compiler = Compiler()
    shapes = StaticShapes(compiler, capacity=2)
    a, b, c = _key(8, 128), _key(1, 32), _key(4, 64)
    _call(shapes, a, 4)
    _call(shapes, b, 3)
    assert sorted(compiler.asked) == sorted([a, b])
    _call(shapes, c, 5)  # b, the least used, has 3 calls: c needs 6
    assert set(shapes.shapes) == {a, b} and len(compiler.asked) == 2
    _call(shapes, c)
    assert set(shapes.shapes) == {a, c}, "c took the slot of the least-used copy"
    # a spread of shapes, each a few times, compiles nothing more: no compile without end
    for seq in range(1, 60):
        _call(shapes, _key(2, seq), 2)
    assert len(compiler.asked) == 3


def test_counts_age_so_a_new_hot_shape_can_take_over():
    compiler = Compiler()
    shapes = StaticShapes(compiler, capacity=1)
    old, new = _key(8, 128), _key(16, 128)
    for _ in range(AGE_EVERY * 3):
        shapes.lookup(old)
    shapes.wait()
    for _ in range(2 * AGE_EVERY):
        shapes.lookup(new)
    shapes.wait()
    assert shapes.shapes == [new], "halved counts let the shape now in use win within a few thousand calls"


def test_a_shape_openvino_cannot_make_static_stays_dynamic_and_is_not_retried(caplog: pytest.LogCaptureFixture):
    a = ("split", _key(2, 7))  # keyed as the engine keys it
    compiler = Compiler(fail={a})
    shapes = StaticShapes(compiler, capacity=4)
    with caplog.at_level(logging.WARNING):
        assert _call(shapes, a, 10) is None
    assert compiler.asked == [a]
    assert "shape not supported" in caplog.text and "stays dynamic" in caplog.text


def test_capacity_zero_never_compiles():
    compiler = Compiler()
    shapes = StaticShapes(compiler, capacity=0)
    assert _call(shapes, _key(1, 1), 10) is None
    assert compiler.asked == []


def test_prepare_compiles_now_into_a_free_slot_and_never_takes_a_used_one():
    compiler = Compiler(fail={_key(2, 7)})
    shapes = StaticShapes(compiler, capacity=2)
    a, b, c = _key(8, 128), _key(1, 32), _key(4, 64)
    assert shapes.prepare(a) and compiler.asked == [a], "compiled on the calling thread, before it returns"
    assert _call(shapes, a) == f"copy {a}", "the first call at a prepared shape runs on its copy"
    assert shapes.prepare(a) and compiler.asked == [a], "a shape with a copy is not compiled again"
    assert not shapes.prepare(_key(2, 7)), "a shape OpenVINO cannot make static"
    assert shapes.prepare(b)
    assert not shapes.prepare(c) and set(shapes.shapes) == {a, b}, "warm-up shapes beyond capacity stay dynamic"
    _call(shapes, c, 2 * AFTER)  # traffic can still win a slot from a prepared shape seen less
    assert c in shapes.shapes
    assert not StaticShapes(compiler, capacity=0).prepare(a)


@pytest.fixture(scope="module")
def tiny_bert_engine(tmp_path_factory: pytest.TempPathFactory) -> optimize.Engine:
    from tests.optimize.hf_random import TINY_BERT, hf_dir

    source = hf_dir("bert", 1, **TINY_BERT)
    return optimize.compile(source, tmp_path_factory.mktemp("ov") / "e",
                            optimize.CompileConfig(backend="openvino", max_batch=4, max_seq=16))


def _feeds(engine: optimize.Engine, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0  # one padded row: padding must stay neutral in every part of a split batch
    feeds = {"input_ids": ids, "attention_mask": mask}
    return {s.name: feeds[s.name] for s in engine.manifest.inputs}


def _transformers(engine: optimize.Engine, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModel.from_pretrained(engine.manifest.source["location"]).eval()
    with torch.no_grad():
        return model(**feeds).last_hidden_state


@pytest.mark.parametrize("batch_streams", [1, 2])
def test_an_engine_runs_a_repeated_shape_on_a_static_copy_with_the_same_answers(tiny_bert_engine: optimize.Engine,
                                                                                batch_streams: int):
    from optimize.runtime.backends.openvino import OpenVINOEngine

    manifest = tiny_bert_engine.manifest
    options = {"batch_streams": batch_streams}
    engine = OpenVINOEngine(tiny_bert_engine.path,  # a fresh engine: no copies yet
                            replace(manifest, config=replace(manifest.config, backend_options=options)))
    assert engine.batch_streams == batch_streams
    feeds = _feeds(engine, 3, 11)
    mask = feeds["attention_mask"]
    dynamic = [engine.run(feeds)["last_hidden_state"] for _ in range(AFTER)]
    engine.static_shapes.wait()
    # split in two, 3 rows are parts of 2 and 1: each part shape has its copy
    parts = [(3, "whole")] if batch_streams == 1 else [(2, "split"), (1, "split")]
    if batch_streams == 2:
        for _ in range(AFTER - 1):  # the second part's shape reached AFTER on the last call; let it compile
            engine.run(feeds)
        engine.static_shapes.wait()
    assert sorted(engine.static_shapes.shapes) == sorted(
        (mode, tuple((name, (rows, 11)) for name in sorted(feeds))) for rows, mode in parts)
    assert "static_shapes" not in engine.describe(), "describe() is what the rows are (a batch run's identity)"
    static = engine.run(feeds)["last_hidden_state"]
    for rows, mode in parts:
        copy = engine.static_shapes.lookup((mode, shape_key({k: v[:rows].numpy() for k, v in feeds.items()})))
        assert copy.model.inputs[0].get_partial_shape().is_static
    # share_inputs: the request that ran the last call's first part holds its ids
    first = engine.static_shapes.lookup((parts[0][1], shape_key({k: v[:parts[0][0]].numpy() for k, v in feeds.items()})))
    with first.requests(1) as (request,):  # the one last used
        assert np.array_equal(request.get_tensor("input_ids").data, feeds["input_ids"][:parts[0][0]].numpy()), \
            "the static copy ran the call"
    real = mask.unsqueeze(-1).bool().expand_as(static)
    torch.testing.assert_close(static[real], dynamic[0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static[real], _transformers(engine, feeds)[real], rtol=1e-4, atol=1e-4)
    engine.run({name: t[:, :5] for name, t in feeds.items()})
    engine.static_shapes.wait()
    assert len(engine.static_shapes.shapes) == len(parts), "a shape seen once runs dynamic"


def test_a_split_batch_gives_each_row_the_answer_it_gets_alone(tiny_bert_engine: optimize.Engine):
    from optimize.runtime.backends.openvino import OpenVINOEngine

    manifest = tiny_bert_engine.manifest
    engine = OpenVINOEngine(tiny_bert_engine.path, replace(manifest, config=replace(
        manifest.config, backend_options={"batch_streams": 2, "max_static_shapes": 0})))
    feeds = _feeds(engine, 4, 16)
    together = engine.run(feeds)
    answers = []
    for _ in range(3):  # answers survive later calls: the requests' own tensors are copied out
        answers.append(engine.run(feeds))
        engine.run(_feeds(engine, 4, 16))
    expected = _transformers(engine, feeds)
    real = feeds["attention_mask"].unsqueeze(-1).bool().expand_as(expected)
    for row in range(4):
        alone = engine.run({name: t[row:row + 1] for name, t in feeds.items()})["last_hidden_state"]
        torch.testing.assert_close(together["last_hidden_state"][row][real[row]], alone[0][real[row]],
                                   rtol=1e-5, atol=1e-5)
    for answer in answers:
        torch.testing.assert_close(answer["last_hidden_state"][real], expected[real], rtol=1e-4, atol=1e-4)
        assert set(answer) == set(together) and answer["last_hidden_state"].shape == (4, 16, expected.shape[-1])


def test_an_engine_run_from_several_threads_at_once_answers_each_call(tiny_bert_engine: optimize.Engine):
    """The server runs an engine from `instances` threads: each call needs requests of its own."""
    from concurrent.futures import ThreadPoolExecutor

    from optimize.runtime.backends.openvino import OpenVINOEngine

    engine = OpenVINOEngine(tiny_bert_engine.path, tiny_bert_engine.manifest)
    calls = [_feeds(engine, batch, seq) for batch, seq in [(1, 8), (4, 16), (3, 11), (2, 5)] * 6]
    expected = [engine.run(feeds)["last_hidden_state"] for feeds in calls]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda feeds: engine.run(feeds)["last_hidden_state"], calls))
    for feeds, answer, reference in zip(calls, got, expected):
        real = feeds["attention_mask"].unsqueeze(-1).bool().expand_as(reference)
        torch.testing.assert_close(answer[real], reference[real], rtol=1e-5, atol=1e-5)


def test_max_static_shapes_zero_turns_copies_off_and_bad_options_are_refused(tiny_bert_engine: optimize.Engine,
                                                                            tmp_path: Path):
    from optimize.runtime.backends.openvino import OpenVINOEngine

    manifest = tiny_bert_engine.manifest
    off = replace(manifest, config=replace(manifest.config, backend_options={"max_static_shapes": 0}))
    engine = OpenVINOEngine(tiny_bert_engine.path, off)
    ids = torch.randint(0, 1000, (2, 9))
    for _ in range(5):
        engine.run({s.name: (ids if s.name == "input_ids" else torch.ones_like(ids)) for s in manifest.inputs})
    engine.static_shapes.wait()
    assert engine.static_shapes.shapes == []
    for option, bad, message in [("max_static_shapes", -1, "an integer >= 0"), ("max_static_shapes", True, "an integer >= 0"),
                                 ("max_static_shapes", "4", "an integer >= 0"), ("batch_streams", 0, "an integer >= 1"),
                                 ("batch_streams", 1.5, "an integer >= 1"),
                                 ("static_shapes_memory_mb", -1, "an integer >= 0")]:
        with pytest.raises(ConfigError, match=f"{option} must be {message}"):
            optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                             optimize.CompileConfig(backend="openvino", backend_options={option: bad}))


@pytest.mark.parametrize("batch_streams", [1, 2])
def test_warm_compiles_the_static_copies_of_a_shape_before_its_first_call(tiny_bert_engine: optimize.Engine,
                                                                          batch_streams: int):
    from optimize.runtime.backends.openvino import OpenVINOEngine

    manifest = tiny_bert_engine.manifest
    options = {"batch_streams": batch_streams}
    engine = OpenVINOEngine(tiny_bert_engine.path,
                            replace(manifest, config=replace(manifest.config, backend_options=options)))
    feeds = _feeds(engine, 3, 9)
    engine.warm({name: torch.zeros_like(t) for name, t in feeds.items()})
    parts = [(3, "whole")] if batch_streams == 1 else [(2, "split"), (1, "split")]
    assert sorted(engine.static_shapes.shapes) == sorted(
        (mode, tuple((name, (rows, 9)) for name in sorted(feeds))) for rows, mode in parts), \
        "every part's copy is ready after one warm-up, where traffic needs AFTER calls and a background compile"
    answer = engine.run(feeds)["last_hidden_state"]
    real = feeds["attention_mask"].unsqueeze(-1).bool().expand_as(answer)
    torch.testing.assert_close(answer[real], _transformers(engine, feeds)[real], rtol=1e-4, atol=1e-4)


def test_static_copies_fit_a_memory_budget_drawn_from_the_weights(tiny_bert_engine: optimize.Engine,
                                                                 caplog: pytest.LogCaptureFixture):
    import openvino as ov
    import transformers

    from optimize.runtime.backends.openvino import OpenVINOEngine, copy_bytes, static_capacity

    model = ov.Core().read_model(str(tiny_bert_engine.path / "model.xml"))
    hf = transformers.AutoModel.from_pretrained(tiny_bert_engine.manifest.source["location"])
    weights = sum(p.numel() for name, p in hf.named_parameters() if not name.startswith("pooler."))  # not exported
    assert 2 * weights <= copy_bytes(model, bf16=True) <= 2.2 * weights, "the weights, at 2 bytes each in bf16"
    assert copy_bytes(model, bf16=False) >= 2 * copy_bytes(model, bf16=True) - 64 * 1024, "and 4 in f32"
    mb = 2**20
    assert static_capacity(4, 1024, 45 * mb) == 4, "MiniLM in bf16 keeps its 4 copies"
    assert static_capacity(4, 1024, 670 * mb) == 1, "a 335M-parameter model in bf16 one"
    assert static_capacity(4, 1024, 2048 * mb) == 0 and static_capacity(4, 0, 1) == 0
    manifest = tiny_bert_engine.manifest
    tight = replace(manifest, config=replace(manifest.config, backend_options={"static_shapes_memory_mb": 0}))
    with caplog.at_level(logging.INFO):
        engine = OpenVINOEngine(tiny_bert_engine.path, tight)
    assert engine.static_shapes.capacity == 0 and "keeps 0 static copies, not 4" in caplog.text
    feeds = _feeds(engine, 2, 9)
    for _ in range(2 * AFTER):
        engine.run(feeds)
    engine.static_shapes.wait()
    assert engine.static_shapes.shapes == []


def test_the_throughput_hint_splits_a_batch_across_the_models_own_streams(tiny_bert_engine: optimize.Engine):
    from optimize.runtime.backends.openvino import OpenVINOEngine

    manifest = tiny_bert_engine.manifest
    options = {"hint": "throughput"}
    engine = OpenVINOEngine(tiny_bert_engine.path,
                            replace(manifest, config=replace(manifest.config, backend_options=options)))
    streams = int(engine._whole.model.get_property("NUM_STREAMS"))
    if streams < 2:
        pytest.skip("OpenVINO gives this machine one stream: nothing to split across")
    assert engine.batch_streams == streams, "one caller's batch uses every stream, not one"
    feeds = _feeds(engine, 3, 9)
    engine.warm(feeds)
    rows = np.diff(np.linspace(0, 3, min(streams, 3) + 1).round().astype(int))
    assert sorted(engine.static_shapes.shapes) == sorted(
        {("split", tuple((name, (int(n), 9)) for name in sorted(feeds))) for n in rows}), \
        "the parts' static copies, compiled with the model's own settings"
    answer = engine.run(feeds)["last_hidden_state"]
    real = feeds["attention_mask"].unsqueeze(-1).bool().expand_as(answer)
    torch.testing.assert_close(answer[real], _transformers(engine, feeds)[real], rtol=1e-4, atol=1e-4)
