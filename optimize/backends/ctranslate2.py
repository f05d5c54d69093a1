"""Backend `ctranslate2`: CTranslate2's encoder, converted from the Hugging Face weights.

CTranslate2 runs BERT-family encoders with its own kernels and skips padding (each sequence is
computed at its own length), which made it the fastest fp32 CPU engine at small batches in
kiln's measurements (bench/results/). It converts from the model directory, not from the captured program, so it takes
Hugging Face sources of the encoders its `TransformersConverter` knows (BERT, DistilBERT,
RoBERTa, XLM-RoBERTa, CamemBERT); other families (ELECTRA, MPNet, ModernBERT, DeBERTa) and
the decoders it converts for generation (GPT-2, Llama, Qwen2) are refused by name. The sentence
pooling and normalization kiln folds into the graph for other backends are applied here after
the encoder, as the manifest's source records them. Each row is run at its length
(`attention_mask.sum()`), so the engine expects right padding, as kiln's pipeline and server
produce it.

Precisions: `fp32` (compute type float32) and `int8` (int8 weights and dynamically quantized
int8 activations in the linear layers, float32 elsewhere: compute type int8_float32).
Option `threads` (0 = CTranslate2's choice): intra-op threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.capture import model_family
from optimize.runtime.backends.ctranslate2 import MODEL_DIR, compute_type, OPTIONS, CTranslate2Engine
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.manifest import Manifest


def _encoder_converter(family: str) -> type:
    """CTranslate2's `TransformersConverter` for a model of `family` (named in the refusal),
    refusing what it converts to anything but an encoder (GPT-2, Llama, Qwen2 become decoders,
    which `ctranslate2.Encoder` cannot open)."""
    # why: optional (kiln[cpu-engines])
    from ctranslate2.converters import TransformersConverter
    from ctranslate2.specs.transformer_spec import TransformerEncoderModelSpec

    class EncoderConverter(TransformersConverter):
        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            # transformers 5 dropped `position_embedding_type` (every BERT-family model it builds
            # has absolute positions); CTranslate2's BERT and RoBERTa loaders still assert it is
            # "absolute", so directories saved by transformers 5 failed to convert.
            if not hasattr(model.config, "position_embedding_type"):
                model.config.position_embedding_type = "absolute"
            return model

        def _load(self) -> Any:
            spec = super()._load()
            if not isinstance(spec, TransformerEncoderModelSpec):
                raise ConfigError(f"backend 'ctranslate2' runs encoders; CTranslate2 converts {family} to a "
                                  f"{type(spec).__name__}; use onnxruntime, openvino, eager or triton")
            return spec

    return EncoderConverter


@register_backend
class CTranslate2Backend(Backend):
    name: ClassVar[str] = "ctranslate2"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "int8"})  # what compute_type maps
    tasks: ClassVar[frozenset[str] | None] = frozenset({"feature-extraction"})  # its converters have no heads
    options: ClassVar[dict[str, Any]] = OPTIONS

    captures_precision: ClassVar[bool] = False

    def can_run_here(self) -> tuple[bool, str]:
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            return False, "ctranslate2 is not installed"
        return True, ""

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        try:
            # why: optional (kiln[cpu-engines])
            import ctranslate2
            import ctranslate2.converters  # noqa: F401  (what _encoder_converter subclasses)
        except ImportError:
            raise ConfigError("backend 'ctranslate2' needs CTranslate2: pip install 'kiln[cpu-engines]'") from None
        source = ctx.source
        if source is None or source.kind != "huggingface":
            raise ConfigError("backend 'ctranslate2' converts Hugging Face model directories; "
                              f"this source is {source.kind if source else 'unknown'}")
        refusal = self.refuses_task(source.metadata.get("task", "feature-extraction"))
        if refusal is not None:
            raise ConfigError(f"backend {refusal}")
        names = {s.name for s in ctx.outputs}
        if not {s.name for s in ctx.inputs} == {"input_ids", "attention_mask"} or not names <= {"last_hidden_state", "sentence_embedding"}:
            raise ConfigError("backend 'ctranslate2' runs encoders with inputs input_ids/attention_mask")
        quantization = "int8" if (ctx.plan or self.precision_plan(ctx.config)).quantized else None
        family = model_family(source)
        try:
            converter = _encoder_converter(family)(source.location)
            converter.convert(str(directory / MODEL_DIR), quantization=quantization, force=True)
        except ConfigError:
            raise
        except Exception as exc:  # the converter raises ValueError/NotImplementedError for unknown models
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if reason.startswith("No conversion is registered"):
                reason = "CTranslate2 has no converter for it"
            raise ConfigError(f"backend 'ctranslate2' cannot convert {family}: {reason.split(' (supported')[0]}; "
                              "it builds the BERT, DistilBERT, RoBERTa, XLM-RoBERTa and CamemBERT encoders") from exc
        ctx.record["ctranslate2"] = {"version": ctranslate2.__version__,
                                     "compute_type": compute_type(ctx.config.precision),
                                     "pooling": source.metadata.get("pooling"),
                                     "normalize": bool(source.metadata.get("normalize"))}
        return sorted(str(p.relative_to(directory)) for p in (directory / MODEL_DIR).rglob("*") if p.is_file())

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return CTranslate2Engine(directory, manifest)


__all__ = ["CTranslate2Backend"]
