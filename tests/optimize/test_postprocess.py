"""Task post-processing in numpy (`optimize/runtime/postprocess.py`): scores, top-k, entity grouping and
embedding truncation on hand-made and random arrays of odd shapes. Agreement with transformers
itself on real models and sentences is tests/optimize/test_pipeline.py's."""

from __future__ import annotations

import numpy as np
import pytest

from optimize.runtime.postprocess import activate, group_entities, top_labels, truncate_embeddings

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def test_softmax_and_sigmoid_match_a_float64_reference_and_none_is_the_logits():
    logits = np.random.default_rng(0).normal(0, 4, (7, 129)).astype(np.float32)
    wide = logits.astype(np.float64)
    softmax = np.exp(wide - wide.max(-1, keepdims=True))
    np.testing.assert_allclose(activate(logits, "softmax"), softmax / softmax.sum(-1, keepdims=True), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(activate(logits, "sigmoid"), 1 / (1 + np.exp(-wide)), rtol=1e-5, atol=1e-7)
    assert activate(logits, "none").dtype == np.float32
    np.testing.assert_array_equal(activate(logits, "none"), logits)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        activate(logits, "relu")


@pytest.mark.parametrize("top_k", [0, 1, 2, 5, 13])
def test_top_labels_are_the_best_first_and_at_most_every_label(top_k: int):
    scores = np.random.default_rng(top_k).random((7, 5)).astype(np.float32)
    names, best = top_labels(scores, LABELS, top_k)
    k = 5 if top_k in (0, 13) else top_k
    assert names.shape == best.shape == (7, k) and best.dtype == np.float32
    for row in range(7):
        order = sorted(range(5), key=lambda i: -scores[row, i])[:k]
        assert names[row].tolist() == [LABELS[i] for i in order]
        np.testing.assert_array_equal(best[row], scores[row, order])


def test_ties_keep_label_order_and_all_scores_keep_every_label_in_label_order():
    scores = np.array([[0.2, 0.4, 0.4, 0.0, 0.0]], dtype=np.float32)
    assert top_labels(scores, LABELS, 3)[0].tolist() == [["B-PER", "I-PER", "O"]]
    names, values = top_labels(scores, LABELS, all_scores=True)
    assert names.tolist() == [list(LABELS)]
    np.testing.assert_array_equal(values, scores)


def test_truncated_embeddings_are_unit_length_and_zero_stays_zero():
    vectors = np.random.default_rng(1).normal(size=(3, 384)).astype(np.float32)
    vectors[2] = 0
    kept = truncate_embeddings(vectors, 7)
    assert kept.shape == (3, 7) and kept.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(kept[:2], axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(kept[:2] * np.linalg.norm(vectors[:2, :7], axis=1, keepdims=True), vectors[:2, :7],
                               rtol=1e-5)
    assert not kept[2].any()
    for bad in (0, 385):
        with pytest.raises(ValueError, match=f"dimensions {bad} is not between 1 and the embedding's width 384"):
            truncate_embeddings(vectors, bad)


def one_hot(labels: list[str], confidence: float = 0.9) -> np.ndarray:
    scores = np.full((len(labels), len(LABELS)), (1 - confidence) / (len(LABELS) - 1), dtype=np.float32)
    for row, label in enumerate(labels):
        scores[row, LABELS.index(label)] = confidence
    return scores


def test_entities_group_adjacent_tags_split_at_b_and_leave_out_o():
    text = "Ada Love lives in New York"
    #        [CLS] ada    love     lives    in       new      york     [SEP]
    labels = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "B-LOC", "O"]
    offsets = np.array([[0, 0], [0, 3], [4, 8], [9, 14], [15, 17], [18, 21], [22, 26], [0, 0]])
    keep = np.array([False, True, True, True, True, True, True, False])
    ids = np.arange(8)
    tokens = ["[CLS]", "ada", "love", "lives", "in", "new", "york", "[SEP]"]
    scores = one_hot(labels)
    scores[2, 2] = 0.7  # the second token of the person is less sure
    entities = group_entities(scores, keep, ids, offsets, text, LABELS, tokens.__getitem__, " ".join)
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
        ("PER", "ada love", 0, 8), ("LOC", "new", 18, 21), ("LOC", "york", 22, 26)]
    assert entities[0]["score"] == pytest.approx((0.9 + 0.7) / 2)


def test_an_unknown_token_is_the_text_it_covers_and_a_text_of_special_tokens_has_no_entity():
    text = "I ♥ Paris"
    offsets = np.array([[0, 0], [0, 1], [2, 3], [4, 9], [0, 0]])
    keep = np.array([False, True, True, True, False])
    ids = np.array([101, 1045, 100, 3000, 102])  # 100 is [UNK]
    scores = one_hot(["O", "O", "I-LOC", "I-LOC", "O"])
    vocabulary = {1045: "i", 100: "[UNK]", 3000: "paris"}
    entities = group_entities(scores, keep, ids, offsets, text, LABELS, vocabulary.__getitem__, " ".join, unk_id=100)
    assert [(e["word"], text[e["start"]:e["end"]]) for e in entities] == [("♥ paris", "♥ Paris")]
    assert group_entities(scores, np.zeros(5, bool), ids, offsets, text, LABELS, vocabulary.__getitem__,
                          " ".join) == []
