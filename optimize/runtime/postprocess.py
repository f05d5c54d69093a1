"""Task post-processing: from an engine's outputs to the answers transformers gives, in numpy.

Each function reproduces one step of a reference, so an engine served with it answers what the
reference answers for the same model and text:

- `activate`: logits to scores as `transformers.pipeline("text-classification")` (softmax,
  sigmoid, or none for regression) and sentence-transformers' `CrossEncoder.predict` do;
- `top_labels`: its `top_k` (sorted, best first; `None` there is 0 here) and its legacy
  `return_all_scores` (every label in id order);
- `group_entities`: `pipeline("token-classification", aggregation_strategy="simple")`;
- `truncate_embeddings`: Matryoshka truncation, scaled back to unit length as OpenAI's
  `dimensions` does.

Pure numpy on one request's arrays; `optimize.runtime.pipeline.TextInterface` applies them to engine
outputs and requests' options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ACTIVATIONS = ("softmax", "sigmoid", "none")
# What transformers' token classification pipeline leaves out of its answer (ignore_labels).
IGNORED_ENTITIES = ("O",)


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """Scores of `logits` ([..., labels]) as float32: "softmax" over the last axis, "sigmoid"
    per label, "none" (regression heads) the logits themselves. Computed in float32 in
    transformers' own order of operations, so the scores are its scores. Raises `ValueError`
    for another activation."""
    values = np.asarray(logits, dtype=np.float32)
    if activation == "softmax":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    if activation == "none":
        return values
    raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


def top_labels(scores: np.ndarray, labels: Sequence[str], top_k: int = 1,
               all_scores: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The labels and scores of each row of `scores` ([n, len(labels)]): the `top_k` best, best
    first (ties in label order, as transformers' stable sort leaves them; 0 or more than there
    are: all of them), or with `all_scores` every label in label order. Returns an object array
    of str and a float32 array, both [n, k]."""
    scores = np.asarray(scores, dtype=np.float32)
    count = scores.shape[-1]
    if all_scores:
        order = np.broadcast_to(np.arange(count), scores.shape)
    else:
        k = count if top_k == 0 else min(top_k, count)
        order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    names = np.asarray(list(labels), dtype=object)[order]
    return names, np.take_along_axis(scores, order, axis=-1)


def truncate_embeddings(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` of each row of `vectors` ([n, width]), scaled back to unit length
    (a zero vector stays zero), float32. Raises `ValueError` when `dimensions` is not between
    1 and the width."""
    width = vectors.shape[-1]
    if not 1 <= dimensions <= width:
        raise ValueError(f"dimensions {dimensions} is not between 1 and the embedding's width {width}")
    kept = np.asarray(vectors[..., :dimensions], dtype=np.float64)
    norms = np.linalg.norm(kept, axis=-1, keepdims=True)
    return np.divide(kept, norms, out=np.zeros_like(kept), where=norms > 0).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _tags(labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Per label: its tag's id (`B-PER` and `I-PER` share `PER`'s), whether it begins an entity
    (`B-`), and the name its entity is reported under (transformers splits at the first '-')."""
    tags: dict[str, int] = {}
    tag_ids, begins = [], []
    for label in labels:
        begins.append(label.startswith("B-"))
        tag = label[2:] if label.startswith(("B-", "I-")) else label
        tag_ids.append(tags.setdefault(tag, len(tags)))
    names = tuple(label.split("-", 1)[-1] for label in labels)
    return np.array(tag_ids), np.array(begins), names


def group_entities(scores: np.ndarray, keep: np.ndarray, ids: np.ndarray, offsets: np.ndarray, text: str,
                   labels: Sequence[str], token_of: Callable[[int], str], decode: Callable[[list[str]], str],
                   unk_id: int | None = None) -> list[dict[str, Any]]:
    """The entities of one text, as `pipeline("token-classification",
    aggregation_strategy="simple")` finds them: each kept token (`keep`: not special, not
    padding) gets its best label; adjacent tokens with the same tag join one entity unless the
    later one is a `B-` label; entities of `IGNORED_ENTITIES` are left out.

    `scores` [seq, labels] (the softmax of the logits, `activate(logits, "softmax")`), `ids`
    [seq] and `offsets` [seq, 2] (character span of each token in `text`) are the text's row.
    Each entity is `{"entity_group", "score", "word", "start", "end"}`: the tag, the mean score
    of its tokens, its tokens turned back into text by `decode` (an unknown token contributes
    the text it covers), and the character span [start, end) in `text`."""
    positions = np.flatnonzero(keep)
    if positions.size == 0:
        return []
    best = scores[positions].argmax(axis=-1)
    best_scores = scores[positions, best]
    tag_ids, begins, names = _tags(tuple(labels))
    tags = tag_ids[best]
    starts = np.ones(best.size, dtype=bool)
    starts[1:] = (tags[1:] != tags[:-1]) | begins[best[1:]]
    firsts = np.flatnonzero(starts)
    means = np.add.reduceat(best_scores, firsts) / np.diff(np.append(firsts, best.size)).astype(np.float32)
    bounds = np.append(firsts, best.size).tolist()
    labels_of, token_ids, spans = best.tolist(), ids[positions].tolist(), offsets[positions].tolist()
    entities = []
    for group, (first, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = names[labels_of[first]]
        if name in IGNORED_ENTITIES:
            continue
        tokens = [text[spans[i][0]:spans[i][1]] if token_ids[i] == unk_id else token_of(token_ids[i])
                  for i in range(first, end)]
        entities.append({"entity_group": name, "score": float(means[group]), "word": decode(tokens),
                         "start": spans[first][0], "end": spans[end - 1][1]})
    return entities
