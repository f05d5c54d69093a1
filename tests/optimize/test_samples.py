import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError
from optimize.samples import CALIBRATION_SENTENCES, VERIFICATION_SENTENCES, calibration_feeds, read_texts, text_batches
from optimize.sources import load_source


def test_verification_sentences_are_held_out_from_calibration():
    assert not set(CALIBRATION_SENTENCES) & set(VERIFICATION_SENTENCES)


def test_read_texts_takes_txt_and_jsonl(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_texts(tmp_path / "a.txt") == ["first line", "second line"]
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "\n\n", "no texts in the file"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("nofield.jsonl", '{"sentence": "x"}\n', "line 1 has no string field 'text'"),
        ("data.csv", "a,b\n", "expected a .txt, .jsonl or .safetensors file"),
    ],
)
def test_bad_calibration_files_are_one_line_config_errors(tmp_path: Path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        read_texts(tmp_path / name)
    assert "\n" not in str(info.value)


def test_text_batches_respect_max_batch_and_pad_to_min_seq():
    def tokenize(texts):
        import numpy as np

        return {"input_ids": np.ones((len(texts), 3), np.int64), "attention_mask": np.ones((len(texts), 3), np.int64)}

    config = CompileConfig(max_batch=4, min_seq=5, max_seq=16)
    batches = text_batches(tokenize, [f"t{i}" for i in range(10)], config, pad_id=7)
    assert [b["input_ids"].shape for b in batches] == [(4, 5), (4, 5), (2, 5)]
    assert (batches[0]["input_ids"][:, 3:] == 7).all() and (batches[0]["attention_mask"][:, 3:] == 0).all()


def test_user_sentences_replace_the_built_in_ones(tmp_path: Path, minilm_model_dir: Path):
    data = tmp_path / "domain.txt"
    data.write_text("\n".join(f"Invoice {i} is overdue by {i} days." for i in range(10)))
    config = CompileConfig(max_batch=4, max_seq=32, calibration=str(data), calibration_samples=6)
    batches = calibration_feeds(load_source(minilm_model_dir, config), config)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2], "calibration_samples caps the data set"
    default = calibration_feeds(load_source(minilm_model_dir, CompileConfig(max_batch=4, max_seq=32)),
                                CompileConfig(max_batch=4, max_seq=32))
    assert sum(b["input_ids"].shape[0] for b in default) == len(CALIBRATION_SENTENCES)


def test_models_without_a_tokenizer_take_tensor_data_sets(tmp_path: Path):
    config = CompileConfig(max_batch=4, calibration=str(tmp_path / "x.safetensors"))
    save_file({"x": torch.randn(6, 16)}, str(tmp_path / "x.safetensors"))
    source = load_source("tests.optimize.factories:tiny_mlp", config)
    assert [b["x"].shape for b in calibration_feeds(source, config)] == [(4, 16), (2, 16)]
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match="text needs a model with a tokenizer"):
        calibration_feeds(source, CompileConfig(calibration=str(tmp_path / "t.txt")))
