"""Backend `ctranslate2`: the encoder converted from the Hugging Face weights, padding skipped."""

from pathlib import Path

import pytest
import torch

import optimize
from optimize.runtime.errors import ConfigError, EngineError

pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install 'kiln[cpu-engines]')")


def test_minilm_fp32_encoder_matches_eager_with_pooling_applied_after_it(tmp_path: Path, minilm_model_dir: Path):
    engine = optimize.compile(minilm_model_dir, tmp_path / "ct2",
                              optimize.CompileConfig(backend="ctranslate2", max_batch=4, max_seq=32))
    accuracy = engine.manifest.accuracy
    assert accuracy["max_abs_error"] < 1e-4 and accuracy["samples"]["min_cosine"] > 0.99999
    assert engine.manifest.build["ctranslate2"] == {"version": engine.manifest.build["ctranslate2"]["version"],
                                                    "compute_type": "float32", "pooling": "mean", "normalize": True}
    feeds = engine.pipeline.tokenize(["Short.", "A rather longer sentence about guitars and music."])
    out = engine.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert out["last_hidden_state"].shape == (2, feeds["input_ids"].shape[1], 384)
    torch.testing.assert_close(out["sentence_embedding"].norm(dim=1), torch.ones(2))
    # the encoder takes lengths: a left-padded row would be read wrongly, so it is refused by name,
    # in the input check the server runs on each request before batching (INVALID_ARGUMENT / 400)
    left = {k: torch.from_numpy(v).flip(1) for k, v in feeds.items()}
    reason = "input 'attention_mask' row 0 has a token after padding"
    assert reason in engine.check_inputs({k: v.numpy() for k, v in left.items()})
    with pytest.raises(EngineError, match=reason):
        engine.run(left)
    from server.errors import InvalidArgument
    from server.repository import Model, ModelConfig

    with pytest.raises(InvalidArgument, match=reason):
        Model(name="ct2", version=1, engine=engine, config=ModelConfig()).check_inputs(
            {k: v.numpy() for k, v in left.items()})


def test_sources_other_than_hugging_face_directories_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="converts Hugging Face model directories; this source is factory"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="ctranslate2"))
