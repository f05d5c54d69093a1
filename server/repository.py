"""The model repository: `<repo>/<model>/config.toml` and numeric version directories holding
engines, laid out like Triton Inference Server's so its users already know it.

    engines/
      minilm/
        config.toml      # optional: max_batch_size, max_queue_delay_us, instances, ...
        1/               # an engine directory (manifest.json, payload)
        2/               # the latest version is the one served

A model that cannot be served (no version directory, a bad config.toml, an engine that does
not load) is logged and skipped; the others are served. Models are also loaded one at a time
by name (explicit model control); a name is always one directory entry of the repository,
never a path that could reach outside it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimize import runtime
from optimize.runtime.errors import OptimizeError
from optimize.runtime.specs import Dim, TensorSpec
from server import layout as layouts
from server.config import CONFIG_FILE, ModelConfig
from server.errors import ConfigError, InvalidArgument, NotFound
from server.text import TextLimits, TextTask
from server.warmup import warm_up

log = logging.getLogger(__name__)

EngineLoader = Callable[[Path], runtime.Engine]
TEXT_INPUT = "text"
# A model name is one directory entry: letters, digits, '_', '-', '.', not starting with '.',
# so neither '..' nor a path separator nor a hidden directory can be named.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


@dataclass
class Model:
    """One served model: the engine of its latest version and its resolved serving config
    (`config.max_batch_size` is concrete)."""

    name: str
    version: int
    engine: runtime.Engine
    config: ModelConfig
    path: Path | None = None

    def __post_init__(self) -> None:
        self.pipeline = self.engine.pipeline
        # The text interface of the engine's task (optimize.runtime.pipeline.TextInterface): its BYTES
        # inputs, its outputs, the options its requests take and the post-processing. None
        # without a pipeline, or for a task the pipeline has no text interface for
        # (`text_refusal` says why; its token inputs are still served).
        self.text: TextTask | None = None
        self.text_refusal: str | None = None
        if self.pipeline is not None:
            try:
                self.text = self.pipeline.text_interface(self.engine.outputs)
            except ValueError as exc:
                self.text_refusal = str(exc)
        text_inputs = len(self.text.inputs) if self.text is not None else 1
        max_tokens = self.pipeline.max_length if self.text is not None else None
        self.config = self.config.resolve(self.engine.max_batch_size, source=f"model '{self.name}'",
                                          max_tokens=max_tokens, text_inputs=text_inputs)
        self._inputs = {spec.name: spec for spec in self.engine.inputs}
        self._outputs = {spec.name: spec for spec in self.engine.outputs}
        if self.config.interface == "text" and self.text is None:
            reason = self.text_refusal or "the engine has no text pipeline (compile it from a directory with a tokenizer)"
            raise ConfigError(f"model '{self.name}': interface = \"text\" but {reason}")
        self.layout = self._token_layout()
        self.text_layout: layouts.Layout | None = None
        self.text_limits: TextLimits | None = None
        if self.text is not None and not {t.name for t in self.text.inputs} & set(self._inputs):
            self.text_layout = layouts.Text(self.layout, self.engine.outputs, pad_id=self.pipeline.pad_id,
                                            buckets=self.config.text_buckets(self.engine.backend),
                                            max_length=self.pipeline.max_length)
            assert self.config.max_text_bytes is not None and self.config.max_request_text_bytes is not None
            self.text_limits = TextLimits(self.name, self.config.max_text_bytes, self.config.max_request_text_bytes)

    def _token_layout(self) -> layouts.Layout:
        if self.max_batch_size == 0:
            return layouts.Unbatched()
        if getattr(self.engine, "accepts_packed", False):  # the engine takes cu_seqlens: no padding at all
            return layouts.Packed(self.engine.inputs, self.engine.outputs)
        if self.config.sequence_buckets:
            return layouts.BucketPadding(self.engine.inputs, self.engine.outputs, self.config.sequence_buckets)
        return layouts.Concatenate()

    @property
    def text_inputs(self) -> tuple[str, ...]:
        """Names of the BYTES inputs a text request sends: ("text",), or ("text", "text_pair")
        for a sentence-pair engine; () when the model takes no text."""
        return tuple(t.name for t in self.text.inputs) if self.text is not None and self.text_layout else ()

    @property
    def text_input(self) -> str | None:
        """Name of the (first) BYTES input that takes texts ("text"), None when the model takes
        no text."""
        return TEXT_INPUT if self.text_layout is not None else None

    @property
    def advertises_text(self) -> bool:
        """True when ModelMetadata/ModelConfig list the text interface instead of the engine's."""
        return self.text_input is not None and self.config.interface == "text"

    @property
    def task(self) -> str | None:
        """What the engine's pipeline computes ("feature-extraction", "text-classification", ...;
        optimize.sources.tasks), None without a text pipeline."""
        return getattr(self.pipeline, "task", "feature-extraction") if self.pipeline is not None else None

    @property
    def text_outputs(self) -> tuple[str, ...]:
        """The outputs a text request gets by default (`label` and `score` for a classifier, the
        sentence embedding for an embedder, ...); () when the model takes no text."""
        return tuple(t.name for t in self.text.outputs) if self.text is not None and self.text_layout else ()

    @property
    def text_output(self) -> str | None:
        """The first of `text_outputs` (the embedding, for a feature-extraction engine)."""
        return self.text_outputs[0] if self.text_outputs else None

    @property
    def max_batch_size(self) -> int:
        """Largest batch the server forms; 0 when it does not batch this model."""
        assert self.config.max_batch_size is not None
        return self.config.max_batch_size

    @property
    def inputs(self) -> Mapping[str, TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Mapping[str, TensorSpec]:
        return self._outputs

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Validate a request's decoded inputs against the engine's specs and this model's
        `max_batch_size`; return its size in samples (1 when the model does not batch).
        Raises `InvalidArgument` naming the input and the problem."""
        first = self.engine.inputs[0]
        value = inputs.get(first.name)
        # The server's own limit first (it may be below the engine's), worded in its terms.
        batched = self.max_batch_size > 0 and value is not None and value.ndim == len(first.shape)
        if batched and value.shape[0] > self.max_batch_size:
            raise InvalidArgument(
                f"input '{first.name}' has batch size {value.shape[0]}, more than model '{self.name}' accepts "
                f"(max_batch_size {self.max_batch_size})"
            )
        reason = self.engine.check_inputs(inputs)
        if reason:
            raise InvalidArgument(f"model '{self.name}': {reason}")
        # Inputs that share a named dim (ids and mask share `seq`) must agree on its size; the
        # engine would otherwise fail on the batch (or broadcast silently).
        seen: dict[str, tuple[str, int]] = {}
        for spec in self.engine.inputs:
            for axis, dim in enumerate(spec.shape):
                if not isinstance(dim, Dim):
                    continue
                size = int(inputs[spec.name].shape[axis])
                first_name, first_size = seen.setdefault(dim.name, (spec.name, size))
                if size != first_size:
                    raise InvalidArgument(
                        f"model '{self.name}': input '{spec.name}' dim {axis} ({dim.name}) is {size}, "
                        f"but input '{first_name}' has {first_size}")
        return int(inputs[first.name].shape[0]) if self.max_batch_size > 0 else 1

    def check_text(self, texts: Mapping[str, np.ndarray]) -> int:
        """Validate a request's decoded texts (for each of `text_inputs`, an object array of
        str, one text per sample); return its size in samples. Raises `InvalidArgument`.
        (Their byte lengths were checked against `text_limits` while decoding.)"""
        first = texts[TEXT_INPUT]
        limit = self.config.max_texts(self.engine.max_batch_size)
        if first.size == 0:
            raise InvalidArgument(f"input '{TEXT_INPUT}' holds no text")
        if first.size > limit:
            raise InvalidArgument(
                f"input '{TEXT_INPUT}' has {first.size} texts, more than model '{self.name}' accepts "
                f"(max_batch_size {limit})"
            )
        for name, other in texts.items():
            if other.size != first.size:
                raise InvalidArgument(f"input '{name}' has {other.size} texts and input '{TEXT_INPUT}' {first.size}; "
                                      f"model '{self.name}' scores pairs: one '{name}' per '{TEXT_INPUT}'")
        return int(first.size) if self.max_batch_size > 0 else 1


@dataclass
class Repository:
    """The models a server serves, and why the others are not (`failures`: name → reason)."""

    models: dict[str, Model] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path, loader: EngineLoader = runtime.load, only: Iterable[str] = ("*",)) -> Repository:
        """Load the latest version of every model under `path` (of those named in `only`;
        "*" is every model).

        Raises `ConfigError` when `path` is not a directory. A model that cannot be loaded is
        recorded in `failures` and logged; the server still starts with the rest. `loader`
        turns a version directory into an Engine (tests inject fakes).
        """
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a directory")
        repo = cls(path=root)
        wanted = set(only)
        for name in repo.names_on_disk():
            if "*" not in wanted and name not in wanted:
                continue
            model_dir = root / name
            try:
                model = _load_model(model_dir, loader)
            except Exception as exc:  # one broken model must not keep the others from being served
                reason = load_failure_reason(exc)
                repo.failures[model_dir.name] = reason
                log.error("model '%s' is not served: %s", model_dir.name, reason, extra={"model": model_dir.name})
                continue
            repo.models[model.name] = model
            log.info(
                "model '%s' version %d loaded: %s engine, max_batch_size %d, max_queue_delay_us %d, instances %d",
                model.name, model.version, model.engine.backend, model.max_batch_size,
                model.config.max_queue_delay_us, model.config.instances, extra={"model": model.name},
            )
        if not repo.models:
            log.warning("model repository %s has no servable model", root)
        return repo

    def model_dir(self, name: str) -> Path:
        """The directory of model `name`: always a direct child of the repository. Raises
        `InvalidArgument` for a name that is not one plain directory entry (a path, '..', a
        hidden name), `NotFound` when the repository has no such model directory."""
        if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
            raise InvalidArgument(
                f"invalid model name {name!r}: a model name is one directory entry of the repository "
                "(letters, digits, '_', '-', '.'; not starting with '.')"
            )
        if self.path is None:
            raise NotFound(f"Request for unknown model: '{name}' is not found (the server has no repository directory)")
        directory = self.path / name
        if not directory.is_dir():
            raise NotFound(f"Request for unknown model: '{name}' has no directory in the model repository")
        return directory

    def names_on_disk(self) -> list[str]:
        """Model directories in the repository (empty without a repository directory)."""
        if self.path is None or not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and _MODEL_NAME.fullmatch(p.name))

    def read_model(self, name: str, loader: EngineLoader = runtime.load) -> Model:
        """Load model `name` from the repository directory (not yet served: the caller swaps it
        in). Raises `InvalidArgument`/`NotFound` for a bad or unknown name, `ConfigError` or
        `OptimizeError` when it cannot be loaded."""
        return _load_model(self.model_dir(name), loader)

    def get(self, name: str, version: str = "") -> Model:
        """The model called `name`; `version` "" means the served one. Raises `NotFound` with
        Triton's wording ("Request for unknown model: ...")."""
        model = self.models.get(name)
        if model is None:
            if name in self.failures:
                raise NotFound(f"Request for unknown model: '{name}' is not available: {self.failures[name]}")
            served = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"Request for unknown model: '{name}' is not found (served models: {served})")
        if version and version != str(model.version):
            raise NotFound(
                f"Request for unknown model: '{name}' version {version} is not found (serving version {model.version})"
            )
        return model


def load_failure_reason(exc: BaseException) -> str:
    """Why a model did not load, in one line: the message of the errors loading is expected to
    raise (`ConfigError`, `OptimizeError`), the type and message of anything else."""
    expected = isinstance(exc, (ConfigError, OptimizeError))
    reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
    return " ".join(reason.split()) or type(exc).__name__


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def _load_model(model_dir: Path, loader: EngineLoader) -> Model:
    config = ModelConfig.read(model_dir)
    versions = _versions(model_dir)
    if not versions:
        raise ConfigError(f"{model_dir} has no version directory (expected {model_dir}/<version>/ holding an engine)")
    version = versions[-1]  # version policy "latest": only the newest is served
    engine = loader(model_dir / str(version))
    config = config.resolve(engine.max_batch_size, source=str(model_dir / CONFIG_FILE))
    model = Model(name=model_dir.name, version=version, engine=engine, config=config, path=model_dir / str(version))
    try:
        warm_up(engine, model.config.warmup, model.name)
    except ConfigError as exc:
        raise ConfigError(f"{model_dir / CONFIG_FILE}: {exc}") from exc.__cause__
    return model
