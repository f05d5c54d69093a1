"""Factories for the load-test models (`python -m optimize compile bench.server.models:identity`)."""

from __future__ import annotations

import torch


class Identity(torch.nn.Module):
    """Triton's identity test model (`identity_fp32`): the output is the input. Lower-case
    tensor names: optimize's capture does not find upper-case ones (INPUT0) in the exported
    program."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x.clone()}


def identity() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """FP32 [batch, 16] → the same tensor; axis 0 is the batch."""
    return Identity(), {"x": torch.zeros(1, 16)}
