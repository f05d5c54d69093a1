"""Small `module:function` factories the optimize tests compile (importable as
`tests.optimize.factories:<name>`)."""

from __future__ import annotations

import torch


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) + self.shift


class TinyTokenModel(torch.nn.Module):
    """Embedding + one attention layer over [batch, seq] ids; returns a tuple."""

    def __init__(self, vocab: int = 50, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.attn = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        return h, h.mean(dim=1)


def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP(), {"x": torch.randn(2, 16)}


def tiny_mlp_positional():
    torch.manual_seed(0)
    return TinyMLP(), (torch.randn(3, 16),)


def tiny_tokens():
    return TinyTokenModel(), {"ids": torch.randint(0, 50, (2, 8))}, {"ids": {0: "batch", 1: "seq"}}


def not_a_model():
    return "model", {"x": torch.randn(2, 16)}


def bad_dims():
    return TinyMLP(), {"x": torch.randn(2, 16)}, {"x": {0: "time"}}


class Doubler(torch.nn.Module):
    def forward(self, INPUT0: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: N803 - Triton-style names
        return {"OUTPUT0": INPUT0 * 2}


def upper_case_names():
    """Triton-style upper-case tensor names (torch.export lower-cases its placeholders)."""
    return Doubler(), {"INPUT0": torch.randn(2, 4)}
