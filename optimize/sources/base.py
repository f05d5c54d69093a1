"""What every model source hands to the compiler."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from optimize.runtime.specs import TensorSpec
from optimize.runtime.specs import torch_dtype

InputMaker = Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]


@dataclass
class Source:
    """A loaded model, ready to capture.

    `module` takes the inputs as keyword arguments named after `inputs` and returns a dict of
    named output tensors; run in fp32 it is the reference every engine is verified against.
    `make_inputs(sizes, generator)` makes realistic random inputs for dim sizes such as
    {"batch": 4, "seq": 17}. `pipeline` describes text pre/post-processing whose files lie in
    `pipeline_dir`.
    """

    name: str
    kind: str
    location: str
    digest: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    make_inputs: InputMaker
    metadata: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] | None = None
    pipeline_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "digest": self.digest, **self.metadata}


class NamedOutputs(torch.nn.Module):
    """Wraps a model so it returns a flat dict of named tensors whatever it returned before
    (tensor → "output", tuple → "output_0".., dict / dataclass → its keys)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return flatten_outputs(self.model(**inputs))


def flatten_outputs(out: Any) -> dict[str, torch.Tensor]:
    """Flatten any pytree of tensors into {name: tensor}, naming leaves by their key path."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # transformers ModelOutput
        out = {k: out[k] for k in out.keys()}
    leaves, _ = pytree.tree_flatten_with_path(out)
    named: dict[str, torch.Tensor] = {}
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in path:
            if isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.SequenceKey):
                parts.append(str(key.idx))
            else:
                parts.append(str(getattr(key, "name", key)))
        name = "_".join(parts) if parts else "output"
        if parts and parts[0].isdigit():
            name = "output_" + name
        named[name] = leaf
    return named


def digest_files(paths: list[Path]) -> str:
    """sha256 over the given files' names and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def digest_state(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def random_like_spec(
    spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator, int_range: tuple[int, int] | None = None
) -> torch.Tensor:
    """Random values of `spec`'s dtype: normal floats; integers across `int_range`, else the
    spec's `value_range`, else [0, 100]."""
    dtype = torch_dtype(spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    lo, hi = int_range or spec.value_range or (0, 100)
    return torch.randint(lo, hi + 1, shape, generator=generator, dtype=dtype)
