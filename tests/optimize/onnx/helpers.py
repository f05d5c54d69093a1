"""Helpers for the ONNX-pass tests: run a model with ONNX Runtime, compare with eager."""

from __future__ import annotations

import numpy as np
import onnx
import torch


def run_ort(model: onnx.ModelProto, feeds: dict[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` with ONNX Runtime on CPU; outputs by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def embedding_cosines(model: onnx.ModelProto, reference: torch.nn.Module,
                      batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """Per-sentence cosine similarity of `model`'s sentence embeddings to the eager fp32 ones."""
    cosines = []
    for feeds in batches:
        got = run_ort(model, feeds)["sentence_embedding"].astype(np.float64)
        with torch.inference_mode():
            want = reference(**feeds)["sentence_embedding"].double().numpy()
        cosines.append((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1))
    return np.concatenate(cosines)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
