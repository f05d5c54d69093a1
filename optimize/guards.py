"""The accuracy guard a measured build (`--precision auto`, the CLI's default) holds every
candidate to, chosen by what the engine answers (its task, `optimize.sources.tasks`).

A guard says when an engine answers the same as the fp32 model, in the terms its users read it:

- **feature-extraction** (embeddings, and sources without a task): cosine ≥ 0.9999 to fp32
  eager, per text and per token, on held-out real texts. Cosine is what retrieval ranks by; an
  absolute bound would only restate it in a model-dependent scale. 0.9999 keeps the neighbours
  a search returns (bf16 compute scores ~0.99996 on all-MiniLM-L6-v2; int8 0.987 to 0.9991,
  which this guard refuses: ask for it with `--min-cosine 0.99`).
- **text-classification, token-classification**: the same label as fp32 (arg-max of the
  logits) on every held-out real text and token, and the logits cosine ≥ 0.9999.
- **sentence-pair** (one score per pair): a single number has no cosine (it is ±1), so the
  scores must be within 0.01 of fp32's, and cosine ≥ 0.9999 where a head has several.
- **fill-mask, causal-lm**: logits cosine ≥ 0.9999 (an arg-max over a vocabulary flips between
  near-tied tokens without changing what the model says).

Real texts are the held-out sentences of `optimize.samples` (or the `--calibration` set's
held-out part); random token ids exaggerate rounding error, so the guard judges on real texts
where the source has them and on random inputs otherwise.
"""

from __future__ import annotations

import math

from optimize.runtime.config import Tolerance

FP32_LEVEL_COSINE = 0.9999
# Above the best cosine int8 is known to reach on real text (all-MiniLM-L6-v2, held-out
# sentences: OpenVINO int8-weight 0.9991; static int8 with SmoothQuant 0.986-0.994 all-int8,
# 0.9992 with the costliest MatMuls kept in float until the calibration texts reach 0.999; ONNX
# Runtime static int8 with sensitive MatMuls in fp32 0.997). A guard above it skips int8
# candidates unbuilt, with the reason, instead of spending calibrations on certain rejections.
INT8_REACHABLE_COSINE = 0.9995
SCORE_ABS_ERROR = 1e-2

_GUARDS: dict[str, Tolerance] = {
    "feature-extraction": Tolerance(max_abs_error=math.inf, min_cosine=FP32_LEVEL_COSINE, real_samples_only=True),
    "text-classification": Tolerance(max_abs_error=math.inf, min_cosine=FP32_LEVEL_COSINE, same_labels=True,
                                     real_samples_only=True),
    "token-classification": Tolerance(max_abs_error=math.inf, min_cosine=FP32_LEVEL_COSINE, same_labels=True,
                                      real_samples_only=True),
    "sentence-pair": Tolerance(max_abs_error=SCORE_ABS_ERROR, min_cosine=FP32_LEVEL_COSINE, real_samples_only=True),
    "fill-mask": Tolerance(max_abs_error=math.inf, min_cosine=FP32_LEVEL_COSINE, real_samples_only=True),
    "causal-lm": Tolerance(max_abs_error=math.inf, min_cosine=FP32_LEVEL_COSINE, real_samples_only=True),
}


def task_guard(task: str | None) -> Tolerance:
    """The default guard for an engine of `task` (None: a source without one, judged like an
    embedding model)."""
    return _GUARDS.get(task or "feature-extraction", _GUARDS["feature-extraction"])


def with_task_checks(tolerance: Tolerance, task: str | None) -> Tolerance:
    """A tolerance the user gave (`--min-cosine`, `--max-abs-error`) with the task's label
    check and real-text judging added: the bounds are the user's, what they are checked on is
    the task's."""
    guard = task_guard(task)
    return Tolerance(max_abs_error=tolerance.max_abs_error, min_cosine=tolerance.min_cosine,
                     same_labels=tolerance.same_labels or guard.same_labels, real_samples_only=True)


__all__ = ["task_guard", "with_task_checks", "FP32_LEVEL_COSINE", "INT8_REACHABLE_COSINE"]
