"""The packed entry of triton engines (optimize.passes.packed_entry): a packed batch goes from
`Engine.run_packed` to the kernels as it comes, with no pad, re-pack or scatter on the way, and
gives what the padded program and transformers give. Tiny random BERT and RoBERTa (RoBERTa's
positions are counted from its ids, a cumulative sum along the sequence); on CPU the kernels'
references run."""

from __future__ import annotations

from pathlib import Path

import kiln_kernels  # noqa: F401  (registers torch.ops.kiln)
import numpy as np
import pytest
import torch

import optimize
from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from tests.optimize.hf_random import TINY_BERT, hf_dir

MAX_BATCH, MAX_SEQ = 4, 16
PACKING_OPS = ("kiln_cuda.pack_indices", "kiln_cuda.gather_rows", "kiln_cuda.scatter_rows")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, its triton engine)."""
    model = hf_dir(request.param, 2, **TINY_BERT)
    out = tmp_path_factory.mktemp(f"packed-{request.param}") / "engine"
    config = optimize.CompileConfig(backend="triton", max_batch=MAX_BATCH, max_seq=MAX_SEQ, verify_samples=1)
    optimize.compile(model, out, config)
    return model, out


def targets(module: torch.nn.Module) -> set[str]:
    return {str(n.target).removesuffix(".default") for n in module.graph.nodes if n.op == "call_function"}


def random_batch(rng: np.random.Generator) -> tuple[list[int], dict[str, np.ndarray]]:
    """Fresh lengths and ids (never RoBERTa's pad id 1): the rows padded, as `run` takes them."""
    lengths = rng.integers(1, MAX_SEQ + 1, size=int(rng.integers(1, MAX_BATCH + 1))).tolist()
    longest = max(lengths)
    ids = np.zeros((len(lengths), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, TINY_BERT["vocab_size"], size=n)
        mask[row, :n] = 1
    return lengths, {"input_ids": ids, "attention_mask": mask}


def packed(lengths: list[int], padded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds = {k: np.concatenate([v[row, :n] for row, n in enumerate(lengths)]) for k, v in padded.items()}
    feeds["cu_seqlens"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return feeds


def real_rows(lengths: list[int], value: np.ndarray) -> np.ndarray:
    return np.concatenate([value[row, :n] for row, n in enumerate(lengths)])


def test_the_packed_entry_reads_packed_tokens_and_never_packs_or_scatters(built: tuple[Path, Path]):
    engine = optimize.load(built[1])
    record = engine.manifest.build["packed_batches"]
    assert engine.has_packed_entry, record
    assert record["program"] == "packed.pt2" and record["inputs"][-2:] == ["cu_seqlens", "max_seqlen"]
    assert (built[1] / "packed.pt2").is_file() and "packed.pt2" in engine.manifest.payload
    padded_ops, packed_ops = targets(engine._module), targets(engine._packed)
    assert set(PACKING_OPS) <= padded_ops, "the padded program packs at the first layer and scatters at the end"
    assert not set(PACKING_OPS) & packed_ops, packed_ops & set(PACKING_OPS)
    assert "kiln.attention_varlen" in packed_ops
    inputs = [n.target for n in engine._packed.graph.nodes if n.op == "placeholder"]
    assert inputs == record["inputs"]


def test_run_packed_never_pads_and_answers_as_the_padded_program_and_transformers(
        built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch):
    import transformers

    model_dir, engine_dir = built
    engine = optimize.load(engine_dir)
    reference = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    rng = np.random.default_rng()
    for _ in range(3):
        lengths, padded = random_batch(rng)
        expected = engine.run(padded)["last_hidden_state"]
        with torch.no_grad():
            hf = reference(**{k: torch.from_numpy(v) for k, v in padded.items()}).last_hidden_state.numpy()

        def no_padding(*args: object, **kwargs: object) -> None:
            raise AssertionError("run_packed padded the batch")

        with monkeypatch.context() as patch:
            patch.setattr(engine, "run", no_padding)
            patch.setattr(engine, "_run_padded", no_padding)
            got = engine.run_packed(packed(lengths, padded))["last_hidden_state"]
        assert got.shape == (sum(lengths), TINY_BERT["hidden_size"]), lengths
        np.testing.assert_allclose(got, real_rows(lengths, expected), atol=1e-5, rtol=1e-5, err_msg=str(lengths))
        np.testing.assert_allclose(got, real_rows(lengths, hf), atol=1e-4, rtol=1e-4, err_msg=str(lengths))


def test_rows_with_their_own_padding_and_engines_without_an_entry_pad_once(
        built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch):
    engine = optimize.load(built[1])
    padded = {"input_ids": np.random.default_rng(3).integers(3, TINY_BERT["vocab_size"], size=(2, 5)),
              "attention_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    calls = []
    run_padded = engine._run_padded
    monkeypatch.setattr(engine, "_run_padded", lambda *a: calls.append(1) or run_padded(*a))
    # the second row carries two padding tokens of its own: computed the padded way
    own = {k: v.reshape(-1) for k, v in padded.items()} | {"cu_seqlens": np.array([0, 5, 10], dtype=np.int32)}
    got = engine.run_packed(own)["last_hidden_state"]
    assert calls == [1]
    np.testing.assert_allclose(got, engine.run(padded)["last_hidden_state"].reshape(10, -1), atol=1e-6)

    monkeypatch.setattr(type(engine), "has_packed_entry", property(lambda self: False))
    got = engine.run_packed(packed([5, 3], padded))["last_hidden_state"]
    assert calls == [1, 1]
    np.testing.assert_allclose(got, real_rows([5, 3], engine.run(padded)["last_hidden_state"]), atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "dtype int32, expected int64"),
    (lambda f: f.update(input_ids=f["input_ids"] + 5000), "outside the allowed range"),
    (lambda f: f.update(cu_seqlens=np.array([0, 1, 2, 3, 4, 5], dtype=np.int32),
                        input_ids=f["input_ids"][:5], attention_mask=f["attention_mask"][:5]), "allowed range is [1, 4]"),
    (lambda f: f.pop("attention_mask"), "missing input(s) attention_mask"),
])
def test_bad_packed_inputs_are_refused_with_a_reason(built: tuple[Path, Path], change, message: str):
    engine: Engine = optimize.load(built[1])
    feeds = packed([2, 4], {"input_ids": np.full((2, 4), 9), "attention_mask": np.ones((2, 4), dtype=np.int64)})
    change(feeds)
    with pytest.raises(EngineError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        engine.run_packed(feeds)
