from pathlib import Path

import pytest
import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError, SourceError
from optimize.runtime.specs import Dim
from optimize.sources import load_source

CONFIG = CompileConfig(max_batch=4, max_seq=16)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "no such file or directory"),
        (lambda tmp: (tmp / "weights.txt").write_text("x") and tmp / "weights.txt", "unsupported file type '.txt'"),
        (lambda tmp: tmp, "directory without config.json"),
    ],
    ids=["missing", "text-file", "plain-dir"],
)
def test_unsupported_sources_name_what_was_expected(tmp_path: Path, make, message):
    with pytest.raises(SourceError) as info:
        load_source(make(tmp_path), CONFIG)
    text = str(info.value)
    assert message in text and "expected a Hugging Face model directory" in text
    assert "\n" not in text


def test_hf_directory_with_only_pickle_weights_is_refused(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(SourceError, match="pickle weights are never loaded"):
        load_source(tmp_path, CONFIG)


def test_hf_directory_specs_follow_the_config_and_vocab(minilm_model_dir: Path):
    source = load_source(minilm_model_dir, CONFIG)
    ids, mask = source.inputs
    assert ids.name == "input_ids" and ids.value_range == (0, 30521)
    assert ids.shape == (Dim("batch", 1, 4, 4), Dim("seq", 1, 16, 16)) == mask.shape
    assert source.pipeline and source.pipeline["output"] == "sentence_embedding"
    assert source.digest.startswith("sha256:") and len(source.digest) == 71
    feeds = source.make_inputs({"batch": 3, "seq": 9}, torch.Generator().manual_seed(0))
    assert feeds["attention_mask"][0].all(), "row 0 is full length"
    assert (feeds["input_ids"][feeds["attention_mask"] == 0] == 0).all(), "padding holds the pad id"


def test_hf_max_seq_beyond_positions_is_a_config_error(minilm_model_dir: Path):
    with pytest.raises(ConfigError, match="exceeds the model's 512 positions"):
        load_source(minilm_model_dir, CompileConfig(max_seq=1024))


def test_factory_with_dims_makes_batch_and_seq_dynamic():
    source = load_source("tests.optimize.factories:tiny_tokens", CONFIG)
    (spec,) = source.inputs
    assert [d.name for d in spec.dims] == ["batch", "seq"]
    out = source.module(**source.make_inputs({"batch": 2, "seq": 5}, torch.Generator().manual_seed(0)))
    assert set(out) == {"output_0", "output_1"}


def test_factory_positional_inputs_are_named_and_batch_is_dim0():
    source = load_source("tests.optimize.factories:tiny_mlp_positional", CONFIG)
    (spec,) = source.inputs
    assert spec.name == "input_0" and spec.batched and spec.shape[1] == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("tests.optimize.factories:not_a_model", "expected a torch.nn.Module"),
        ("tests.optimize.factories:bad_dims", "expected 'batch' or 'seq'"),
        ("tests.optimize.factories:nope", "has no callable 'nope'"),
        ("no_such_module_xyz:make", "cannot import factory module"),
    ],
)
def test_bad_factories_raise_source_errors(text, message):
    with pytest.raises(SourceError, match=message):
        load_source(text, CONFIG)


def test_pt2_source_reads_dims_and_checks_the_config_range(tmp_path: Path):
    from tests.optimize.factories import TinyMLP

    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(TinyMLP(), (torch.randn(2, 16),), dynamic_shapes=({0: batch},))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, str(path))
    source = load_source(path, CONFIG)
    (spec,) = source.inputs
    assert spec.shape == (CONFIG.dims["batch"], 16)
    x = torch.randn(3, 16)
    assert torch.equal(source.module(**{spec.name: x})["output"], program.module()(x))
    with pytest.raises(ConfigError, match=r"accepts batch in \[1, 8\]"):
        load_source(path, CompileConfig(max_batch=16))


def test_a_pt2_program_compiles_into_a_verified_engine(tmp_path: Path):
    import optimize
    from tests.optimize.factories import TinyMLP

    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(TinyMLP().eval(), (torch.randn(2, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "mlp.pt2"))
    # verification calls eval() on the reference, which an exported module refuses
    engine = optimize.compile(tmp_path / "mlp.pt2", tmp_path / "e", CompileConfig(backend="eager", max_batch=4))
    assert engine.manifest.accuracy["max_abs_error"] == 0.0


def test_position_limits_follow_how_the_family_numbers_positions():
    from types import SimpleNamespace

    from optimize.sources.hf import _max_positions

    class Roberta(torch.nn.Module):  # positions start after the pad id (1)
        def __init__(self) -> None:
            super().__init__()
            self.position_embeddings = torch.nn.Embedding(514, 4, padding_idx=1)

    assert _max_positions(SimpleNamespace(max_position_embeddings=514), Roberta()) == 512
    assert _max_positions(SimpleNamespace(max_position_embeddings=512), torch.nn.Module()) == 512
    assert _max_positions(SimpleNamespace(n_positions=1024), torch.nn.Module()) == 1024
    assert _max_positions(SimpleNamespace(max_position_embeddings=-1), torch.nn.Module()) is None  # XLNet


def test_corrupt_pt2_is_a_source_error(tmp_path: Path):
    path = tmp_path / "broken.pt2"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(SourceError, match="not a torch.export program"):
        load_source(path, CONFIG)
