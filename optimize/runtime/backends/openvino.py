"""Engines of backend `openvino`: `model.xml` + `model.bin` compiled by OpenVINO for a device,
with the inference precision pinned to the one the manifest names."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimize.runtime.backends.openvino_shapes import ShapeKey, StaticShapes, shape_key
from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest
from optimize.runtime.precision import facts
from optimize.runtime.specs import numpy_dtype

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
# The backend's options (`CompileConfig.backend_options`) and their defaults; engines read
# theirs from the manifest over these.
OPTIONS: dict[str, Any] = {"hint": "latency", "threads": 0, "device": "CPU", "batch_streams": 2, "max_static_shapes": 4,
                           "static_shapes_memory_mb": 1024}


# Ops whose graphs OpenVINO 2026.4's CPU shape cache gets wrong: a model with
# nn.MultiheadAttention (tests.optimize.factories:tiny_tokens, whose graph holds one
# ScaledDotProductAttention) called first at [1, 1] and then at [4, 16] is off by 2 to 3 at the
# second shape, on the same or a fresh infer request, with or without bounded dims, at every cache
# capacity but 0 (which turns the cache off). BERT-like graphs (MatMul, Softmax, MatMul) keep it:
# all-MiniLM-L6-v2 gives bit-identical results with it on and off over such shape sequences,
# and with it off pays about 1.5x the CPU time per 1 x 32 call when shapes alternate.
SHAPE_CACHE_UNSAFE_OPS = frozenset({"ScaledDotProductAttention"})


def shape_cache_is_exact(model: Any) -> bool:
    """Whether OpenVINO's CPU shape cache may stay on for `model` (an `openvino.Model`): its graph
    holds none of `SHAPE_CACHE_UNSAFE_OPS`. With the cache on, an engine that sees alternating
    shapes prepares each once instead of on every call."""
    return not any(op.get_type_name() in SHAPE_CACHE_UNSAFE_OPS for op in model.get_ordered_ops())


def copy_bytes(model: Any, bf16: bool) -> int:
    """About what one more compiled copy of `model` (an `openvino.Model`) holds: its constants,
    floating-point ones in the inference precision (bf16, or f32), the others as stored (int8
    weights stay int8). all-MiniLM-L6-v2: 45 MB in bf16, where a static copy measured 35 MB of
    resident memory; so a budget drawn from it errs on the safe side."""
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        kind = op.get_output_element_type(0)
        count = int(np.prod(list(op.get_output_shape(0)), dtype=np.int64))
        total += count * ((2 if bf16 else 4) if kind.is_real() else kind.size)
    return total


def static_capacity(max_shapes: int, budget_mb: int, one_copy: int) -> int:
    """How many static copies an engine keeps: `max_shapes`, fewer where that many copies of
    `one_copy` bytes would exceed `budget_mb` (a large model gets fewer; one over budget none)."""
    return min(max_shapes, budget_mb * 2**20 // max(one_copy, 1))


def engine_config(options: dict[str, Any], precision: str, float_compute: str = "f32", *,
                  shape_cache: bool = False) -> dict[str, Any]:
    """OpenVINO's compile properties for an engine of `precision`; `float_compute` is what an
    int8 engine computes in outside its int8 MatMuls (the manifest's quantization record says);
    `shape_cache`: keep the CPU shape cache (only where `shape_cache_is_exact` says so)."""
    # OpenVINO 2026.4 picks bf16 inference precision on its own on CPUs with AVX512_BF16:
    # all-MiniLM-L6-v2 then differs from fp32 by 0.03 (max abs). The precision is pinned, so an
    # engine computes in the precision its manifest says.
    f = facts(precision)
    bf16 = f.compute == torch.bfloat16 or (f.calibrated and float_compute == "bf16")
    config: dict[str, Any] = {"PERFORMANCE_HINT": HINTS[options["hint"]],
                              "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    if int(options["threads"]) > 0:
        config["INFERENCE_NUM_THREADS"] = int(options["threads"])
    if options["device"] == "CPU" and not shape_cache:
        config["CPU_RUNTIME_CACHE_CAPACITY"] = 0  # see SHAPE_CACHE_UNSAFE_OPS
    return config


class Compiled:
    """A compiled model and its idle infer requests. A request runs one call at a time, and the
    server may run an engine from several threads at once (`instances`), so each call takes
    requests of its own: one, or one per part of a split batch (the parts then run on different
    streams). Requests are made as needed and kept for the next call."""

    def __init__(self, model: Any) -> None:
        self.model = model  # openvino.CompiledModel
        self.streams = int(model.get_property("NUM_STREAMS"))
        self._idle: list[Any] = [model.create_infer_request() for _ in range(self.streams)]
        self._lock = threading.Lock()

    @contextmanager
    def requests(self, count: int) -> Iterator[list[Any]]:
        """`count` requests no other call is using; the last returned come first."""
        with self._lock:
            taken = [self._idle.pop() for _ in range(min(count, len(self._idle)))]
        try:  # what was taken goes back even if making a new request fails
            taken += [self.model.create_infer_request() for _ in range(count - len(taken))]
            yield taken
        finally:
            with self._lock:
                self._idle.extend(taken)


def _wait(requests: list[Any]) -> None:
    """Wait for every request; then raise the first one's error, if any failed."""
    errors = []
    for request in requests:
        try:
            request.wait()
        except Exception as exc:  # noqa: BLE001  (raised below, after the others are done)
            errors.append(exc)
    if errors:
        raise errors[0]


def split_config(config: dict[str, Any], streams: int) -> dict[str, Any]:
    """The compile properties of the model split batches run on: `streams` CPU streams sharing
    the threads `config` gives one call. A batch of independent rows run as two halves on two
    streams took 7-29% less time than whole on one stream with both threads (all-MiniLM-L6-v2 in
    bf16 on a 2-core AMX Xeon, batch 2 to 32, 16 to 128 tokens): the cores do not meet at a
    barrier after every operation."""
    return {**config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": max(streams, 1)}


class OpenVINOEngine(Engine):
    """Runs `model.xml`. Batches of two rows or more are split into `batch_streams` parts run
    at once, each on its own CPU stream; shapes that repeat run on static copies of the model
    (`openvino_shapes`)."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        try:
            # why: optional (kiln[cpu-engines])
            import openvino as ov
        except ImportError:
            raise EngineError(f"engine {path} needs OpenVINO: pip install 'kiln[cpu-engines]'") from None
        options = {**OPTIONS, **manifest.config.backend_options}
        float_compute = manifest.build.get("quantization", {}).get("float_compute", "f32")
        core = ov.Core()
        if options["device"] not in core.available_devices:
            raise EngineError(f"OpenVINO device {options['device']} is not available here; "
                              f"available: {', '.join(core.available_devices)}")
        self._core, self._device = core, options["device"]
        try:
            self._model = core.read_model(str(path / MODEL_FILE))
            # whether shapes prepared once are reused (OpenVINO cannot be asked afterwards)
            self.shape_cache = options["device"] == "CPU" and shape_cache_is_exact(self._model)
            config = engine_config(options, manifest.config.precision, float_compute, shape_cache=self.shape_cache)
            # with the throughput hint a batch's parts run on the model's own streams (`_splitting`)
            split = config if options["hint"] == "throughput" else split_config(config, int(options["batch_streams"]))
            self._configs = {"whole": config, "split": split}
            self._whole = self._compile(self._model, "whole")
            self._split = self._splitting(options)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
            raise EngineError(f"OpenVINO cannot open {path / MODEL_FILE}: {str(exc).splitlines()[0]}") from exc
        self._input_dtypes = {s.name: numpy_dtype(s.dtype) for s in manifest.inputs}
        self._outputs = [s.name for s in manifest.outputs]
        one_copy = copy_bytes(self._model, config["INFERENCE_PRECISION_HINT"] == "bf16")
        capacity = static_capacity(int(options["max_static_shapes"]), int(options["static_shapes_memory_mb"]), one_copy)
        if capacity < int(options["max_static_shapes"]):
            log.info("engine %s keeps %d static copies, not %d: one takes about %d MB, the budget "
                     "(static_shapes_memory_mb) is %d MB", path, capacity, options["max_static_shapes"],
                     one_copy // 2**20, options["static_shapes_memory_mb"])
        self.static_shapes = StaticShapes(self._compile_static, capacity)

    @property
    def batch_streams(self) -> int:
        """How many parts a batch is split into at most (1: batches run whole): `batch_streams`
        with the latency hint, the streams OpenVINO gives the model with the throughput hint."""
        return self._split.streams if self._split is not None else 1

    def _splitting(self, options: dict[str, Any]) -> Compiled | None:
        """The multi-stream model split batches run on, or None where batches run whole:
        `batch_streams` 1, an input or output without a batch dim, or a device that gives one
        stream. With the throughput hint the model itself has OpenVINO's streams, and a batch's
        parts run on them: one call would otherwise run on one stream, one core of two
        (MiniLM bf16, 8 x 128: 43 ms, against 21 ms split), unless as many callers as streams
        kept it busy."""
        rows = all(s.batched for s in [*self.manifest.inputs, *self.manifest.outputs])
        if int(options["batch_streams"]) < 2 or not rows:
            return None
        split = self._whole if options["hint"] == "throughput" else self._compile(self._model, "split")
        return split if split.streams > 1 else None

    def _compile(self, model: Any, mode: str) -> Compiled:
        return Compiled(self._core.compile_model(model, self._device, self._configs[mode]))

    def _compile_static(self, key: tuple[str, ShapeKey]) -> Compiled:
        """A copy of the model compiled for the one shape in `key` (see `openvino_shapes`),
        for whole batches or for the parts of split ones."""
        mode, shapes = key
        model = self._model.clone()
        model.reshape({name: list(shape) for name, shape in shapes})
        return self._compile(model, mode)

    def warm(self, inputs: Mapping[str, Any]) -> None:
        """One call on the dynamic model (its requests made), the static copies for this shape
        compiled now rather than after the shape has come back (`StaticShapes.prepare`), and a
        call on them."""
        self.run(inputs)
        feeds = {name: np.asarray(value) for name, value in inputs.items()}
        prepared = [self.static_shapes.prepare(key) for key, _ in self._parts(feeds)]
        if any(prepared):
            self.run(inputs)

    def _parts(self, feeds: dict[str, np.ndarray]) -> list[tuple[tuple[str, ShapeKey], dict[str, np.ndarray]]]:
        """How a call runs: one ("whole", shape) part, or up to `batch_streams` ("split", shape)
        parts of about equal rows, each with its slice of the feeds."""
        # a split model exists only where every input has a batch dim (`_splitting`)
        rows = len(next(iter(feeds.values()))) if self._split is not None else 1
        parts = min(self.batch_streams, rows)
        if parts < 2:
            return [(("whole", shape_key(feeds)), feeds)]
        bounds = np.linspace(0, rows, parts + 1).round().astype(int)
        pieces = [{name: array[low:high] for name, array in feeds.items()} for low, high in zip(bounds[:-1], bounds[1:])]
        return [(("split", shape_key(piece)), piece) for piece in pieces]

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=self._input_dtypes[k]) for k, v in inputs.items()}
        parts = self._parts(feeds)
        if parts[0][0][0] == "whole":
            # share_inputs: OpenVINO reads the arrays in place (the call is synchronous);
            # share_outputs=False: it hands back arrays of their own, which the request's next
            # call does not overwrite, so no second copy is needed here.
            with self._pick(parts[0][0]).requests(1) as (request,):
                results = request.infer(feeds, share_inputs=True, share_outputs=False)
            by_name = {port.get_any_name(): value for port, value in results.items()}
            return {name: torch.from_numpy(by_name[name]) for name in self._outputs}
        keys = [key for key, _ in parts]
        with ExitStack() as stack:
            # a call counts once per shape; parts of one shape take a request each
            requests = {key: iter(stack.enter_context(self._pick(key).requests(keys.count(key))))
                        for key in dict.fromkeys(keys)}
            running: list[Any] = []
            try:
                for key, piece in parts:
                    request = next(requests[key])
                    request.start_async(piece, share_inputs=True)
                    running.append(request)
            finally:
                _wait(running)  # even after a failed start: a request goes back idle only when done
            # the requests' output tensors are theirs (their next call overwrites them): copied out
            return {name: torch.from_numpy(np.concatenate([r.get_tensor(name).data for r in running]))
                    for name in self._outputs}

    def _pick(self, key: tuple[str, ShapeKey]) -> Compiled:
        """What a call (or a part of one) of `key`'s shape runs on: its static copy if it has one."""
        static = self.static_shapes.lookup(key)
        if static is not None:
            return static
        return self._whole if key[0] == "whole" else self._split


def load(directory: Path, manifest: Manifest) -> Engine:
    return OpenVINOEngine(directory, manifest)


__all__ = ["OpenVINOEngine", "Compiled", "copy_bytes", "static_capacity", "split_config", "OPTIONS", "MODEL_FILE", "WEIGHTS_FILE", "SHAPE_CACHE_UNSAFE_OPS", "engine_config",
           "shape_cache_is_exact", "load"]
