"""Warm-up: a model runs the shapes its config names (`warmup`) before it is served, like
Triton's `model_warmup`.

An engine's first call at a shape is its slowest: OpenVINO plans the dynamic model and, for a
shape that repeats, compiles a static copy on a background thread while calls go on; ONNX Runtime
and oneDNN pick kernels and grow their arenas. Served cold, that cost lands on the first
requests' latency. The calls here are made at load, on the loading thread, before the model is
ready, so it lands on the load instead.

The inputs are made from the engine's specs, filled with each input's lowest allowed value (0
for token ids, like Triton's `zero_data`), the attention mask of an engine that skips padding
with ones (all tokens real, the work a request brings): the values do not matter, the shapes do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from optimize.runtime.engine import Engine
from optimize.runtime.errors import OptimizeError
from optimize.runtime.specs import Dim, torch_dtype
from server.errors import ConfigError

log = logging.getLogger(__name__)


def warmup_inputs(engine: Engine, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Inputs for one call of `engine`: `batch` rows in the batch dim, `tokens` in every other
    dynamic dim. Raises `ConfigError` when the engine does not accept that shape."""
    batched = engine.max_batch_size > 0
    if not batched and batch != 1:
        raise ConfigError(f"warmup [{batch}, {tokens}]: the engine has no batch dimension; name [1, tokens]")
    inputs = {}
    for spec in engine.inputs:
        shape = []
        for index, dim in enumerate(spec.shape):
            if not isinstance(dim, Dim):
                shape.append(dim)
                continue
            size, what = (batch, "batch") if batched and index == 0 else (tokens, "tokens")
            if not dim.contains(size):
                raise ConfigError(f"warmup [{batch}, {tokens}]: {what} {size} is outside the engine's range "
                                  f"{dim.min}..{dim.max} for input '{spec.name}' dim '{dim.name}'")
            shape.append(size)
        fill = 1 if spec.name == engine.packed_mask_input else spec.value_range[0] if spec.value_range else 0
        inputs[spec.name] = torch.full(shape, fill, dtype=torch_dtype(spec.dtype))
    return inputs


def warm_up(engine: Engine, shapes: Sequence[tuple[int, int]], model: str) -> None:
    """Run `engine` once at each of `shapes` (`Engine.warm`). Raises `ConfigError` for a shape
    the engine does not accept or a call that fails: a warm-up that was asked for and did not
    happen fails the load, instead of a model served cold without a word."""
    for batch, tokens in shapes:
        inputs = warmup_inputs(engine, batch, tokens)
        start = time.perf_counter()
        try:
            engine.warm(inputs)
        except OptimizeError as exc:
            raise ConfigError(f"warmup [{batch}, {tokens}] failed: {exc}") from exc
        log.info("model '%s' warmed up at [%d, %d] in %.2f s", model, batch, tokens,
                 time.perf_counter() - start, extra={"model": model})


__all__ = ["warm_up", "warmup_inputs"]
