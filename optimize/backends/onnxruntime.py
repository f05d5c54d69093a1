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

import numpy as np
import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.engine import Engine
from optimize.errors import ConfigError, EngineError
from optimize.manifest import Manifest
from optimize.onnx.export import example_inputs, export_program, save_model
from optimize.specs import numpy_dtype

MODEL_FILE = "model.onnx"
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PASSES = ("onnx_fold_constants", "onnx_fuse_layernorm", "onnx_fuse_gelu", "onnx_ort_fusions", "onnx_attention",
          "onnx_mixed_precision", "onnx_quantize")


def export_onnx(program: ExportedProgram, ctx: BuildContext, path: Path) -> Any:
    """Export `program` to `path` without passes (kept for callers of the first version)."""
    model = export_program(program, ctx.inputs, ctx.outputs)
    save_model(model, path)
    return model


def session_providers(preference: str | list[str] = "auto") -> list[str]:
    """Execution providers in order of preference, restricted to those this ORT build has;
    CPU is always last. Raises `EngineError` when a named provider is not available."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if preference == "auto":
        return [p for p in PROVIDER_PREFERENCE if p in available] or ["CPUExecutionProvider"]
    wanted = [preference] if isinstance(preference, str) else list(preference)
    missing = [p for p in wanted if p not in available]
    if missing:
        raise EngineError(f"ONNX Runtime here has no {', '.join(missing)}; available: {', '.join(sorted(available))}")
    return wanted + (["CPUExecutionProvider"] if "CPUExecutionProvider" not in wanted else [])


class OnnxRuntimeEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        import onnxruntime as ort

        options = {**OnnxRuntimeBackend.options, **manifest.config.backend_options}
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if int(options.get("threads", 0)) > 0:
            session_options.intra_op_num_threads = int(options["threads"])
        spin = "1" if options.get("spinning") else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        providers = session_providers(options.get("providers", "auto"))
        try:
            self._session = ort.InferenceSession(str(path / MODEL_FILE), session_options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot open {path / MODEL_FILE}: {exc}") from exc
        self._output_names = [s.name for s in manifest.outputs]
        self._input_dtypes = {s.name: numpy_dtype(s.dtype) for s in manifest.inputs}

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=self._input_dtypes[k]) for k, v in inputs.items()}
        results = self._session.run(self._output_names, feeds)
        return {k: torch.from_numpy(v) for k, v in zip(self._output_names, results)}


@register_backend
class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "int8", "int8-weight"})
    options: ClassVar[dict[str, Any]] = {
        "providers": "auto",
        "ort_fusions": True,
        "threads": 0,
        # ORT's worker threads busy-wait between ops by default. On a small machine that also
        # runs a server's event loop they starve it: measured on the 2-core CI machine, turning
        # spinning off doubled served MiniLM throughput at concurrency 3 (~100 -> ~220 infer/s).
        "spinning": False,
        "int8_activations": "uint8",
        "int8_reduce_range": False,
        "int8_keep_sensitive": True,
    }

    def capture_precision(self, precision: str) -> str:
        return "fp32"

    def resolve_options(self, config: Any) -> dict[str, Any]:
        options = super().resolve_options(config)
        if options["int8_activations"] not in ("uint8", "int8"):
            raise ConfigError(f"backend option int8_activations must be uint8 or int8; got {options['int8_activations']!r}")
        return options

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        from optimize.onnx import prepare_onnx

        options = self.resolve_options(ctx.config)
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as workdir:
            model = prepare_onnx(program, ctx, Path(workdir), PASSES,
                                 {**options, "int8_weight_mode": "dynamic"}, backend=self.name)
        save_model(model, directory / MODEL_FILE)
        ctx.record["providers_preference"] = session_providers(options["providers"])
        return [MODEL_FILE]

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OnnxRuntimeEngine(directory, manifest)


__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeEngine", "export_onnx", "example_inputs", "session_providers", "MODEL_FILE"]
