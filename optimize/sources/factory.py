"""Source: a `module:function` factory returning a model and example inputs.

The function returns `(model, example_inputs)` or `(model, example_inputs, dims)`:
- `example_inputs`: a dict name → tensor (a tuple is named `input_0`, `input_1`, ...);
- `dims` (optional): name → {axis: "batch" | "seq"} marking dynamic axes. Without it, axis 0 of
  every input is the batch axis and everything else is static.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import SourceError
from optimize.runtime.specs import Dim, TensorSpec, dtype_name
from optimize.sources.base import NamedOutputs, Source, digest_state, random_like_spec

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(text: str) -> bool:
    return bool(FACTORY_PATTERN.match(text))


class _PositionalToKeywords(torch.nn.Module):
    """Lets a model whose forward takes positional tensors be called with named inputs."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(*(inputs[n] for n in self.names))


def load_factory(text: str, config: CompileConfig) -> Source:
    """Import and call the factory named by `text` ("package.module:function")."""
    module_name, func_name = text.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"cannot import factory module {module_name!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SourceError(f"{module_name!r} has no callable {func_name!r}")
    result = func()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise SourceError(f"{text} must return (model, example_inputs) or (model, example_inputs, dims)")
    model, examples = result[0], result[1]
    dims_spec: dict[str, dict[int, str]] | None = result[2] if len(result) == 3 else None
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"{text} returned a {type(model).__name__}, expected a torch.nn.Module")
    if isinstance(examples, (tuple, list)):
        names = [f"input_{i}" for i in range(len(examples))]
        examples = dict(zip(names, examples))
        model = _PositionalToKeywords(model, names)
    elif isinstance(examples, dict):
        params = inspect.signature(model.forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [n for n in examples if n not in params and not takes_kwargs]
        if missing:
            raise SourceError(f"{text}: forward() has no parameter(s) {', '.join(missing)}")
    else:
        raise SourceError(f"{text}: example_inputs must be a dict or tuple of tensors")
    if not all(isinstance(v, torch.Tensor) for v in examples.values()):
        raise SourceError(f"{text}: every example input must be a torch.Tensor")

    known = config.dims
    specs: list[TensorSpec] = []
    for name, tensor in examples.items():
        axes = (dims_spec or {}).get(name, {0: "batch"} if dims_spec is None and tensor.dim() > 0 else {})
        shape: list[int | Dim] = list(tensor.shape)
        for axis, dim_name in axes.items():
            if dim_name not in known:
                raise SourceError(f"{text}: dims[{name!r}][{axis}] is {dim_name!r}; expected 'batch' or 'seq'")
            shape[axis] = known[dim_name]
        specs.append(TensorSpec(name, dtype_name(tensor.dtype), tuple(shape)))
    # Integer inputs (ids, indices) are drawn from the range the examples span: the factory
    # knows its valid range, kiln does not, so the engine does not enforce one.
    example_ranges = {
        name: (int(t.min()), int(t.max()))
        for name, t in examples.items()
        if not t.dtype.is_floating_point and t.dtype != torch.bool and t.numel()
    }

    def make_inputs(sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            s.name: random_like_spec(s, s.concrete(sizes), generator, example_ranges.get(s.name)) for s in specs
        }

    model.eval()
    return Source(
        name=func_name,
        kind="factory",
        location=text,
        digest=digest_state(model),
        module=NamedOutputs(model),
        inputs=specs,
        make_inputs=make_inputs,
        metadata={"architecture": type(model).__name__},
    )
