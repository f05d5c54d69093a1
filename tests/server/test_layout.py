"""Batch layouts: exact concatenation, bucket padding, packed batches and text, round-tripped
through fake engines written in numpy (no server, no asyncio)."""

from __future__ import annotations

import numpy as np
import pytest

from optimize.runtime.specs import Dim, TensorSpec
from server.layout import BucketPadding, Concatenate, Packed, Text, Unbatched, batch_key, concatenate, join, split

BATCH, SEQ = Dim("batch", 1, 8, 8), Dim("seq", 1, 64, 64)
INPUTS = [TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("attention_mask", "int64", (BATCH, SEQ))]
OUTPUTS = [TensorSpec("hidden", "float32", (BATCH, SEQ, 2)), TensorSpec("pooled", "float32", (BATCH, 2))]


def tokens(batch: int, seq: int, start: int = 1) -> dict[str, np.ndarray]:
    ids = (np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) % 97) + start
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def masked_model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A model for which zero padding is neutral: per-token features, masked mean pooling."""
    ids, mask = inputs["input_ids"].astype(np.float32), inputs["attention_mask"].astype(np.float32)
    hidden = np.stack([ids * mask, mask], axis=-1)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return {"hidden": hidden, "pooled": pooled}


def test_batch_key_separates_dtypes_and_non_batch_dims_only():
    base = {"ids": np.zeros((2, 16), np.int64), "mask": np.zeros((2, 16), np.int64)}
    assert batch_key(base) == batch_key({"ids": np.zeros((5, 16), np.int64), "mask": np.zeros((5, 16), np.int64)})
    assert batch_key(base) != batch_key({"ids": np.zeros((2, 17), np.int64), "mask": np.zeros((2, 17), np.int64)})
    assert batch_key(base) != batch_key({"ids": np.zeros((2, 16), np.int32), "mask": np.zeros((2, 16), np.int64)})


def test_concatenate_and_split_round_trip_in_request_order():
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((n, 3)).astype(np.float32)} for n in (1, 3, 2)]
    stacked = concatenate(requests)
    assert stacked["x"].shape == (6, 3)
    parts = split({"y": stacked["x"] * 2}, [1, 3, 2])
    for request, part in zip(requests, parts, strict=True):
        np.testing.assert_array_equal(part["y"], request["x"] * 2)


def test_split_refuses_outputs_whose_dim0_is_not_the_batch():
    with pytest.raises(ValueError, match="expected dim 0 to be the batch size 3"):
        split({"y": np.zeros((4, 2))}, [1, 2])


def test_exact_layout_keeps_different_lengths_apart():
    layout = Concatenate()
    assert layout.key(tokens(1, 20)) != layout.key(tokens(1, 21))


def test_bucket_padding_puts_lengths_of_one_bucket_under_one_key():
    layout = BucketPadding(INPUTS, OUTPUTS, buckets=[16, 32])
    assert layout.boundaries == {"seq": [16, 32, 64]}  # the dim's maximum is always the last bucket
    keys = {n: layout.key(tokens(1, n)) for n in (1, 16, 17, 32, 33, 64)}
    assert keys[1] == keys[16] != keys[17] == keys[32] != keys[33] == keys[64]
    assert layout.bucket("seq", 20) == 32 and layout.bucket("seq", 64) == 64


def test_bucket_padding_pads_to_the_longest_of_the_batch_and_cuts_outputs_back_per_request():
    layout = BucketPadding(INPUTS, OUTPUTS, buckets=[16, 32])
    requests = [tokens(1, 20, start=1), tokens(2, 17, start=5), tokens(1, 27, start=9)]
    assert len({layout.key(r) for r in requests}) == 1  # 17..32 is one bucket
    inputs, plan = layout.assemble(requests)
    assert inputs["input_ids"].shape == (4, 27)  # the longest request, not the bucket's 32
    assert inputs["attention_mask"][0, 20:].sum() == 0 and inputs["input_ids"][0, 20:].sum() == 0
    parts = layout.disassemble(masked_model(inputs), plan)
    for request, part in zip(requests, parts, strict=True):
        alone = masked_model(request)  # what the request computes unbatched and unpadded
        assert part["hidden"].shape == alone["hidden"].shape
        np.testing.assert_array_equal(part["hidden"], alone["hidden"])
        np.testing.assert_allclose(part["pooled"], alone["pooled"], rtol=1e-6)


def test_unbatched_layout_passes_one_request_through_untouched():
    layout = Unbatched()
    request = tokens(3, 5)
    inputs, plan = layout.assemble([request])
    assert inputs["input_ids"] is request["input_ids"]
    assert layout.disassemble({"y": np.ones(3)}, plan)[0]["y"].shape == (3,)
    with pytest.raises(ValueError, match="one request at a time"):
        layout.assemble([request, request])


class PackedModel:
    """An engine that accepts packed batches (the contract of server.layout.Packed)."""

    accepts_packed = True

    def __init__(self) -> None:
        self.seen: list[dict[str, np.ndarray]] = []

    def run_packed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append(inputs)
        ids, cu = inputs["input_ids"].astype(np.float32), inputs["cu_seqlens"]
        hidden = np.stack([ids, np.ones_like(ids)], axis=-1)  # [total_tokens, 2]
        pooled = np.stack([hidden[a:b].mean(0) for a, b in zip(cu[:-1], cu[1:], strict=True)])
        return {"hidden": hidden, "pooled": pooled}


def test_packed_layout_batches_every_length_together_without_padding():
    layout, engine = Packed(INPUTS, OUTPUTS), PackedModel()
    requests = [tokens(1, 3, start=1), tokens(2, 4, start=5), tokens(1, 5, start=9)]
    assert len({layout.key(r) for r in requests}) == 1  # lengths do not split batches
    inputs, plan = layout.assemble(requests)
    assert inputs["input_ids"].shape == (3 + 2 * 4 + 5,)  # not a single padding token
    np.testing.assert_array_equal(inputs["cu_seqlens"], [0, 3, 7, 11, 16])
    assert inputs["cu_seqlens"].dtype == np.int32
    parts = layout.disassemble(layout.execute(engine, inputs), plan)
    for request, part in zip(requests, parts, strict=True):
        expected = masked_model(request)
        np.testing.assert_array_equal(part["hidden"], expected["hidden"])
        np.testing.assert_allclose(part["pooled"], expected["pooled"], rtol=1e-6)


def fake_tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """One token per word (its length), padded to the longest text, as a pipeline does."""
    words = [[len(w) for w in t.split()] or [1] for t in texts]
    longest = max(len(w) for w in words)
    ids = np.zeros((len(texts), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, w in enumerate(words):
        ids[row, :len(w)], mask[row, :len(w)] = w, 1
    return {"input_ids": ids, "attention_mask": mask}


def test_text_layout_pads_tokenized_requests_to_the_batch_longest_and_gives_each_its_rows():
    layout = Text(BucketPadding(INPUTS, OUTPUTS, buckets=[4]), OUTPUTS, pad_id=7)
    requests = [fake_tokenize(["a bb", "ccc"]), fake_tokenize(["dd e fff gggg hh"])]  # 2 and 5 tokens wide
    assert layout.key(requests[0]) == layout.key(requests[1])  # any lengths share a batch
    inputs, plan = layout.assemble(requests)
    assert inputs["input_ids"].shape == (3, 5)  # the longest text: 5 tokens
    np.testing.assert_array_equal(inputs["input_ids"][:2, 2:], 7)  # pad_id where the first request had none
    np.testing.assert_array_equal(inputs["attention_mask"].sum(1), [2, 1, 5])
    first, second = layout.disassemble(masked_model(inputs), plan)
    assert first["hidden"].shape == (2, 2, 2) and second["hidden"].shape == (1, 5, 2)
    np.testing.assert_allclose(first["pooled"][:, 0], [1.5, 3.0], rtol=1e-6)  # mean word length per text
    np.testing.assert_allclose(second["pooled"][:, 0], [2.4], rtol=1e-6)


def test_text_layout_packs_each_text_s_real_tokens_for_a_packed_engine():
    layout, engine = Text(Packed(INPUTS, OUTPUTS), OUTPUTS, pad_id=7, buckets=[4, 8]), PackedModel()
    requests = [fake_tokenize(["a bb", "ccc"]), fake_tokenize(["dd e fff gggg hh"])]  # 2, 1 and 5 tokens
    inputs, plan = layout.assemble(requests)
    assert inputs["input_ids"].shape == (2 + 1 + 5,) and (inputs["attention_mask"] == 1).all()  # no padding
    np.testing.assert_array_equal(inputs["cu_seqlens"], [0, 2, 3, 8])
    first, second = layout.disassemble(layout.execute(engine, inputs), plan)
    padded, padded_plan = Text(BucketPadding(INPUTS, OUTPUTS, buckets=[4]), OUTPUTS, pad_id=7).assemble(requests)
    want_first, want_second = Text(BucketPadding(INPUTS, OUTPUTS, buckets=[4]), OUTPUTS).disassemble(
        masked_model(padded), padded_plan)
    for got, want in ((first, want_first), (second, want_second)):
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def test_text_layout_pads_a_batch_up_to_its_bucket_never_past_the_pipelines_maximum():
    layout = Text(Concatenate(), [OUTPUTS[1]], buckets=[4, 8, 64], max_length=10)
    inputs, _ = layout.assemble([fake_tokenize(["a bb", "ccc"])])  # 2 tokens wide: bucket 4
    assert inputs["input_ids"].shape == (2, 4) and inputs["attention_mask"].sum() == 3
    inputs, _ = layout.assemble([fake_tokenize(["a " * 9])])  # 9 tokens: bucket 64, capped at 10
    assert inputs["input_ids"].shape == (1, 10)


def test_text_layout_splits_a_request_into_one_part_per_text_cut_to_its_own_tokens():
    layout = Text(Concatenate(), [OUTPUTS[1]], buckets=[4, 8])
    parts = layout.split(fake_tokenize(["a bb", "ccc dd ee ff g", "x"]))
    assert [(p["input_ids"].shape, rows, tokens) for p, rows, tokens in parts] == [
        ((1, 2), 1, 4), ((1, 5), 1, 8), ((1, 1), 1, 4)]
    # A request whose answer reads token outputs stays one padded block, in slices within the budget.
    whole = Text(Concatenate(), OUTPUTS, buckets=[4, 8]).split(fake_tokenize(["a bb", "ccc dd ee ff g"]), 8,
                                                               by_text=False)
    assert [(p["input_ids"].shape, rows, tokens) for p, rows, tokens in whole] == [((1, 5), 1, 8), ((1, 5), 1, 8)]


def test_join_puts_parts_back_in_order_padding_token_outputs_to_the_longest():
    parts = [{"pooled": np.ones((1, 2)), "hidden": np.ones((1, 2, 3))},
             {"pooled": np.zeros((2, 2)), "hidden": np.full((2, 4, 3), 2.0)}]
    joined = join(parts)
    assert joined["pooled"].tolist() == [[1, 1], [0, 0], [0, 0]]
    assert joined["hidden"].shape == (3, 4, 3) and joined["hidden"][0, 2:].sum() == 0
