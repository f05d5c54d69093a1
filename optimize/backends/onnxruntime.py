"""Backend `onnxruntime`: the captured program exported to ONNX, prepared by kiln's ONNX passes
(the build's ONNX stage), run by ONNX Runtime.

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

from pathlib import Path
from typing import Any, ClassVar

from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.onnx.export import save_model
from optimize.passes.base import GENERIC_PASSES
from optimize.runtime.backends.onnxruntime import MODEL_FILE, OPTIONS, OnnxRuntimeEngine, session_providers
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.manifest import Manifest


@register_backend
class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "int8", "int8-weight"})
    options: ClassVar[dict[str, Any]] = OPTIONS
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES | {
        "onnx_fold_constants", "onnx_fuse_layer_norm", "onnx_fuse_gelu", "onnx_ort_fusions", "onnx_simplify_attention",
        "onnx_quantize", "onnx_mixed_precision"}
    consumes_onnx: ClassVar[bool] = True
    captures_precision: ClassVar[bool] = False

    def resolve_options(self, config: Any) -> dict[str, Any]:
        options = super().resolve_options(config)
        if options["int8_activations"] not in ("uint8", "int8"):
            raise ConfigError(f"backend option int8_activations must be uint8 or int8; got {options['int8_activations']!r}")
        return options

    def onnx_options(self, config: CompileConfig) -> dict[str, Any]:
        return {**self.resolve_options(config), "int8_weight_mode": "dynamic"}  # ORT's dynamic quantization

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        options = self.resolve_options(ctx.config)
        save_model(self.prepared_onnx(ctx), directory / MODEL_FILE)
        ctx.record["providers_preference"] = session_providers(options["providers"])
        return [MODEL_FILE]

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OnnxRuntimeEngine(directory, manifest)


__all__ = ["OnnxRuntimeBackend"]
