"""What can be profiled, and what each kind of target lets the profiler measure.

- an `nn.Module` (or a model source: HF directory, `.pt2`, `module:function`): everything;
  ops and modules are those of the eager forward.
- an engine whose backend runs a PyTorch program (`eager`): everything, on the program the
  engine runs (`program.pt2` + weights); modules come from the program's node metadata.
- any other engine (ONNX Runtime, TensorRT, ...): whole-engine latency through `Engine.run`;
  FLOPs and bytes come from the engine's *source-equivalent* program (the source model recorded
  in the manifest, loaded again and run at the same shapes), counted but not timed, because the
  backend executes its own fused graph. Without the source, latency only.

Which backends expose a program is a registry (`PROGRAM_LOADERS`), not a ladder of ifs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optimize.capture import PRECISION_DTYPES, CastPrecision
from optimize.profile.memory import weights_bytes
from optimize.profile.recorder import has_module_hierarchy
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError, OptimizeError
from optimize.runtime.loading import load
from optimize.runtime.manifest import MANIFEST_FILE
from optimize.runtime.program import load_program
from optimize.runtime.specs import TensorSpec
from optimize.runtime.specs import torch_dtype
from optimize.sources import load_source
from optimize.sources.base import Source, random_like_spec

DEFAULT_BATCH = 1
DEFAULT_SEQ = 128


def _eager_program(engine: Engine, device: torch.device) -> torch.nn.Module:
    return load_program(engine.path, device).module()


#: backend name → loader of the PyTorch program the engine runs (per-op profiling possible).
PROGRAM_LOADERS: dict[str, Callable[[Engine, torch.device], torch.nn.Module]] = {"eager": _eager_program}


@dataclass
class Target:
    """A resolved profiling target.

    `run()` is one uninstrumented inference (whole-model latency). `program` (with `args`,
    `kwargs`) is what the op recorder runs and times; `flop_program` is counted but not timed
    (an engine's source-equivalent). `inputs` are the CPU tensors fed, so another target can be
    profiled on exactly the same ones (`--compare`). `sample_device` is the GPU NVML watches
    (default `device`; an ONNX Runtime / TensorRT engine takes CPU tensors but runs on a GPU).
    """

    name: str
    mode: str
    device: torch.device
    run: Callable[[], Any]
    inputs: dict[str, torch.Tensor]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    program: torch.nn.Module | None = None
    flop_program: torch.nn.Module | None = None
    sample_device: torch.device | None = None
    weights_bytes: int = 0
    measures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _module_device(model: torch.nn.Module, inputs: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    for t in (inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (list, tuple)) else [inputs]):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def spec_inputs(specs: list[TensorSpec], sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Inputs from specs alone (an engine whose source is gone): masks all ones (no padding,
    so every token is real work), other integers across the spec's value range."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in specs:
        shape = spec.concrete(sizes)
        if "mask" in spec.name and not torch.empty(0, dtype=_torch_dtype(spec.dtype)).is_floating_point():
            out[spec.name] = torch.ones(shape, dtype=_torch_dtype(spec.dtype))
        else:
            out[spec.name] = random_like_spec(spec, shape, gen, spec.value_range or (0, 1))
    return out


def _torch_dtype(name: str) -> torch.dtype:
    return torch_dtype(name)


def _sizes(specs: list[TensorSpec], batch: int | None, seq: int | None) -> dict[str, int]:
    """Requested dim sizes; a dim not given takes the spec's `opt`."""
    sizes = {d.name: d.opt for s in specs for d in s.dims}
    if batch is not None:
        sizes["batch"] = batch
    if seq is not None:
        sizes["seq"] = seq
    return sizes


def load_engine_source(engine: Engine) -> tuple[Source | None, str]:
    """The engine's source model, loaded again from the manifest's location, or None and why."""
    location = engine.manifest.source.get("location")
    if not location:
        return None, "manifest records no source location"
    try:
        source = load_source(location, engine.manifest.config)
    except OptimizeError as exc:
        return None, f"source {location} cannot be loaded ({exc})"
    note = ""
    recorded = engine.manifest.source.get("digest")
    if recorded and source.digest != recorded:
        note = f"source {location} changed since the engine was compiled (digest differs); its FLOPs may not match"
    return source, note


def _source_program(source: Source, precision: str) -> torch.nn.Module:
    if precision in PRECISION_DTYPES and precision != "fp32":
        return CastPrecision(source.module, PRECISION_DTYPES[precision])
    return source.module


def _module_target(model: torch.nn.Module, inputs: Any, device: torch.device | None, name: str, mode: str) -> Target:
    current = _module_device(model, inputs)
    device = device or current
    if device != current:
        model = model.to(device)  # the module's train/eval mode is the caller's choice; not changed
    if isinstance(inputs, Mapping):
        args, kwargs = (), {k: _to(v, device) for k, v in inputs.items()}
        cpu_inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    else:
        seq = inputs if isinstance(inputs, (list, tuple)) else (inputs,)
        args, kwargs = tuple(_to(v, device) for v in seq), {}
        cpu_inputs = {f"input_{i}": v for i, v in enumerate(seq) if isinstance(v, torch.Tensor)}

    def run() -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)

    program, notes = model, []
    original = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(original, torch.nn.Module):
        # compiled kernels are not aten ops: counting through them misses or doubles work
        program = original
        notes.append("torch.compile'd module: ops and modules are counted and timed on the original (eager) "
                     "module; whole-model latency is the compiled one")
    return Target(name=name, mode=mode, device=device, run=run, inputs=cpu_inputs, args=args, kwargs=kwargs,
                  program=program, flop_program=program, weights_bytes=weights_bytes(model), notes=notes)


def _engine_target(engine: Engine, inputs: Mapping[str, torch.Tensor] | None, batch: int | None, seq: int | None,
                   device: torch.device | None, seed: int) -> Target:
    source, source_note = load_engine_source(engine)
    sizes = _sizes(engine.inputs, batch, seq)
    if inputs is None:
        gen = torch.Generator().manual_seed(seed)
        inputs = source.make_inputs(sizes, gen) if source is not None else spec_inputs(engine.inputs, sizes, seed)
    inputs = {k: (torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    reason = engine.check_inputs(inputs)
    if reason:
        raise ConfigError(f"engine {engine.name} cannot profile these inputs: {reason}")
    notes = [source_note] if source_note else []
    loader = PROGRAM_LOADERS.get(engine.backend)
    if loader is not None:
        device = device or torch.device("cpu")
        program = loader(engine, device)
        target = _module_target(program, inputs, device, engine.name, f"engine:{engine.backend}")
        target.inputs = dict(inputs)
        target.notes = notes
        if not has_module_hierarchy(program):
            notes.append("the engine's program carries no module hierarchy (nn_module_stack holds only the root: "
                         "re-exporting a graph after passes drops it), so every op is attributed to the root and "
                         "per-layer numbers and --compare fall back to whole-model")
        if device.type != "cpu":
            try:
                target.run()
            except Exception as exc:  # e.g. a program exported with device="cpu" constants baked in
                raise ConfigError(f"engine {engine.name}'s program does not run on {device}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                  "profile it with --device cpu") from exc
        return target

    def run() -> Any:
        return engine.run(inputs)

    target = Target(name=engine.name, mode=f"engine:{engine.backend}", device=torch.device("cpu"), run=run,
                    inputs=dict(inputs), notes=notes, sample_device=device,
                    weights_bytes=sum((engine.path / rel).stat().st_size for rel in engine.manifest.payload))
    if source is not None:
        target.flop_program = _source_program(source, engine.manifest.config.precision).eval()
        target.kwargs = dict(inputs)
    else:
        target.notes.append(f"FLOPs and bytes not counted: {source_note or 'no source'}; "
                            f"{engine.backend} engines are profiled through their source-equivalent program")
    return target


def resolve(obj: Any, inputs: Any = None, *, batch: int | None = None, seq: int | None = None,
            device: str | torch.device | None = None, seed: int = 0) -> Target:
    """Turn what the user handed `optimize.profile` into a `Target`.

    `obj` is an `nn.Module` (then `inputs` is required: a dict of keyword tensors, a tuple of
    positional ones, or one tensor), an `Engine`, an engine directory, or a model source
    (HF directory, `.pt2`, `module:function`). For engines and sources, `inputs` default to
    random ones of `batch` × `seq` made by the source (or from the engine's specs).
    Raises `ConfigError` when inputs are missing or do not fit the engine.
    """
    dev = torch.device(device) if device is not None else None
    if isinstance(obj, torch.nn.Module):
        if inputs is None:
            raise ConfigError("profiling an nn.Module needs inputs: a dict of keyword tensors, a tuple or a tensor")
        return _module_target(obj, inputs, dev, type(obj).__name__, "module")
    if isinstance(obj, Engine):
        return _engine_target(obj, inputs, batch, seq, dev, seed)
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if path.is_dir() and (path / MANIFEST_FILE).is_file():
            return _engine_target(load(path), inputs, batch, seq, dev, seed)

        b, s = batch or DEFAULT_BATCH, seq or DEFAULT_SEQ
        source = load_source(str(obj), CompileConfig(max_batch=b, max_seq=s))
        if inputs is None:
            inputs = source.make_inputs({"batch": b, "seq": s}, torch.Generator().manual_seed(seed))
        target = _module_target(source.module, inputs, dev, source.name, "source")
        return target
    raise ConfigError(f"cannot profile a {type(obj).__name__}; expected an nn.Module, an Engine, an engine directory "
                      "or a model source")


__all__ = ["Target", "resolve", "PROGRAM_LOADERS", "spec_inputs", "load_engine_source"]
