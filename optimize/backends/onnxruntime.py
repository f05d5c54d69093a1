"""Backend `onnxruntime`: the captured program exported to ONNX, prepared by kiln's ONNX passes,
run by ONNX Runtime.

Precision is part of the graph, so capture is always fp32: `fp16` is the mixed-precision pass
(fp32 islands for norms, softmax, reductions and overflowing tensors), `int8` is static Q/DQ
quantization calibrated on real samples (uint8 activations × int8 per-channel weights, the
combination x86 kernels run fastest), `int8-weight` is ORT's dynamic quantization (no
calibration). Execution providers are chosen at load time from what the machine's ORT build
has, in the order TensorRT, CUDA, CPU, unless the `providers` option names them.

Options (`CompileConfig.backend_options`):
- `providers`: "auto" or a list of ORT provider names, in preference order;
- `ort_fusions` (default True): ONNX Runtime contrib-op fusions (Attention, SkipLayerNorm, ...);
- `threads` (default 0 = ORT's choice): intra-op threads of the session;
- `int8_activations` ("uint8" | "int8"), `int8_reduce_range` (7-bit weights for CPUs without
  VNNI), `int8_keep_sensitive` (keep the worst-quantizing MatMuls in float until the
  calibration samples are within tolerance): static int8 details.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.onnx import prepare_onnx
from optimize.onnx.export import example_inputs, export_program, save_model
from optimize.runtime.backends.onnxruntime import MODEL_FILE, OPTIONS, OnnxRuntimeEngine, session_providers
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.manifest import Manifest

PASSES = ("onnx_fold_constants", "onnx_fuse_layernorm", "onnx_fuse_gelu", "onnx_ort_fusions", "onnx_attention",
          "onnx_mixed_precision", "onnx_quantize")


def export_onnx(program: ExportedProgram, ctx: BuildContext, path: Path) -> Any:
    """Export `program` to `path` without passes (kept for callers of the first version)."""
    model = export_program(program, ctx.inputs, ctx.outputs)
    save_model(model, path)
    return model


@register_backend
class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "int8", "int8-weight"})
    options: ClassVar[dict[str, Any]] = OPTIONS

    def capture_precision(self, precision: str) -> str:
        return "fp32"

    def resolve_options(self, config: Any) -> dict[str, Any]:
        options = super().resolve_options(config)
        if options["int8_activations"] not in ("uint8", "int8"):
            raise ConfigError(f"backend option int8_activations must be uint8 or int8; got {options['int8_activations']!r}")
        return options

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        options = self.resolve_options(ctx.config)
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as workdir:
            model = prepare_onnx(program, ctx, Path(workdir), PASSES,
                                 {**options, "int8_weight_mode": "dynamic"}, backend=self.name)
        save_model(model, directory / MODEL_FILE)
        ctx.record["providers_preference"] = session_providers(options["providers"])
        return [MODEL_FILE]

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OnnxRuntimeEngine(directory, manifest)


__all__ = ["OnnxRuntimeBackend", "export_onnx", "example_inputs"]
