"""Saving a captured program as graph (`program.pt2`) + weights (`weights.safetensors`).

`torch.export.save` would embed the weights in the archive; kiln keeps them in safetensors so
every engine's weights are inspectable, mmap-able and never unpickled. The archive is written
with weights replaced by meta tensors (a few KB of graph) and the real ones are put back on load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.export import ExportedProgram

PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "weights.safetensors"
_CONSTANT_PREFIX = "__constant__."


def _on_meta(value: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(value, device="meta")
    return torch.nn.Parameter(meta, requires_grad=False) if isinstance(value, torch.nn.Parameter) else meta


def save_program(program: ExportedProgram, directory: Path) -> list[str]:
    """Write `program.pt2` (graph only) and `weights.safetensors`; return both file names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in program.state_dict.items():
        tensors[name] = value.detach().contiguous().clone()
    for name, value in program.constants.items():
        if isinstance(value, torch.Tensor):
            tensors[_CONSTANT_PREFIX + name] = value.detach().contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "kiln-program-weights"})

    real_state = dict(program.state_dict)
    real_constants = dict(program.constants)
    # The archive would also torch.save (pickle) the example inputs; they are not needed.
    examples = program._example_inputs
    program._example_inputs = None
    try:
        for name, value in real_state.items():
            program.state_dict[name] = _on_meta(value)
        for name, value in real_constants.items():
            if isinstance(value, torch.Tensor):
                program.constants[name] = _on_meta(value)
        torch.export.save(program, str(directory / PROGRAM_FILE))
    finally:
        program._example_inputs = examples
        program.state_dict.update(real_state)
        program.constants.update(real_constants)
    return [PROGRAM_FILE, WEIGHTS_FILE]


def load_program(directory: Path, device: str | torch.device = "cpu") -> ExportedProgram:
    """Read back what `save_program` wrote, with weights on `device`."""
    program = torch.export.load(str(directory / PROGRAM_FILE))
    weights = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    for name, value in weights.items():
        if name.startswith(_CONSTANT_PREFIX):
            program.constants[name[len(_CONSTANT_PREFIX):]] = value
        elif isinstance(program.state_dict[name], torch.nn.Parameter):
            program.state_dict[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            program.state_dict[name] = value
    return program
