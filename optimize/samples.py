"""Real input data for calibration and accuracy checks.

Quantization ranges and accuracy judged on random token ids are misleading: random ids make
activations no sentence ever produces, which exaggerates int8 error (measured: ORT dynamic
int8 scored cosine 0.989 on random ids where real sentences score far higher). So text engines
are calibrated on sentences — a user data set, or the built-in ones below — and judged on a
held-out set of sentences the calibration never saw.

A data set is a `.txt` file (one text per line), a `.jsonl` file (one object with a "text"
field per line) or, for models that do not take text, a `.safetensors` file holding one tensor
per engine input whose first axis is the sample axis.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError
from optimize.runtime.pipeline import Pipeline
from optimize.sources.base import Source

Feeds = dict[str, torch.Tensor]

# Built-in calibration sentences: everyday topics, questions, numbers, names, long and short,
# so activation ranges cover what an embedding model is fed in practice.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the street corner.",
    "The new phone has a larger screen and a faster processor than last year's model.",
    "How do I reset my password if I no longer have access to my email?",
    "Interest rates rose by a quarter of a percentage point on Wednesday.",
    "The children built a sandcastle while their parents read on the beach.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "She finished the marathon in 3 hours, 42 minutes and 10 seconds.",
    "Add two cups of flour, a pinch of salt and mix until the dough is smooth.",
    "The committee will publish its final report at the end of the month.",
    "Is it safe to take ibuprofen together with paracetamol?",
    "The river flooded the lower part of the village after a week of heavy rain.",
    "Python's garbage collector frees objects that are no longer referenced.",
    "The museum's new exhibition explores two centuries of Japanese woodblock prints.",
    "He apologized for missing the meeting and promised to send his notes.",
    "Quarterly revenue grew 12% to $4.1 billion, beating analyst expectations.",
    "A dog chased a red ball across the park.",
    "Turn left at the second traffic light and the pharmacy is on your right.",
    "The vaccine trial enrolled 30,000 volunteers across six countries.",
    "Thanks!",
    "What is the capital of Australia?",
    "The orchestra tuned their instruments as the audience took their seats.",
    "Solar panels on the roof now cover most of the building's electricity needs.",
    "I would like to cancel my subscription and get a refund for this month.",
    "The defendant pleaded not guilty to all charges in federal court.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "Please find attached the invoice for the consulting work completed in March.",
    "The team scored twice in the final ten minutes to win the championship.",
    "Mix the blue and yellow paint to get a soft shade of green.",
    "Servers in the eu-west region returned HTTP 503 errors for about twenty minutes.",
    "A cat is sleeping on the windowsill in the afternoon sun.",
    "The novel follows three generations of a family living on a remote island.",
    "Can you recommend a good Italian restaurant near the train station?",
    "Engineers replaced the bridge's steel cables after the inspection found corrosion.",
    "The students presented their research on coral reef bleaching to the class.",
    "Heavy snowfall closed the mountain pass for the second time this winter.",
    "The update fixes a bug that caused the app to crash when uploading photos.",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
    "Two women are chatting over coffee in a busy cafe.",
    "The central bank warned that inflation could remain high well into next year.",
    "Remember to water the tomatoes every morning during the heat wave.",
    "The telescope captured images of a galaxy more than ten billion light years away.",
    "My laptop battery drains quickly even when the screen brightness is low.",
    "Local volunteers planted four hundred trees along the river bank on Saturday.",
    "The contract may be terminated by either party with thirty days' written notice.",
    "Where can I buy tickets for the concert on Friday night?",
    "A chef is slicing onions in a restaurant kitchen.",
    "The startup raised 20 million euros to expand its delivery robots to new cities.",
)

# Held out: never used for calibration, so an accuracy check on them is not flattered by it.
# Paraphrase pairs, unrelated sentences and a very short one (the hardest case for int8),
# like the queries an embedding engine serves.
VERIFICATION_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply on Monday.",
    "A woman is slicing a tomato in the kitchen.",
    "How can I change the password of my account?",
    "The weather forecast predicts heavy rain for the weekend.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The train to Berlin leaves from platform nine at 7:45.",
    "He spent the whole evening fixing the leaking kitchen tap.",
    "Our company reported record profits in the third quarter of 2024.",
    "The toddler giggled as the puppy licked her face.",
    "Which programming language should I learn first for data analysis?",
    "The government announced new funding for rural hospitals.",
    "An old lighthouse stands at the end of the rocky peninsula.",
    "Please remember to bring your passport and a printed copy of the booking.",
    "Good morning!",
)


def read_texts(path: str | Path) -> list[str]:
    """Texts from a `.txt` (one per line) or `.jsonl` (field "text") file; blank lines are
    skipped. Raises `ConfigError` with one line when the file is missing, empty or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration data {path}: no such file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"calibration data {path}: line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"calibration data {path}: line {number} has no string field 'text'")
            texts.append(record["text"])
        lines = texts
    elif path.suffix != ".txt":
        raise ConfigError(f"calibration data {path}: expected a .txt, .jsonl or .safetensors file")
    if not lines:
        raise ConfigError(f"calibration data {path}: no texts in the file")
    return lines


def text_batches(
    tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: list[str], config: CompileConfig, pad_id: int = 0
) -> list[Feeds]:
    """Tokenized batches of at most `config.max_batch` texts, each padded to its longest text
    and to at least `config.min_seq` (shorter batches would fall outside the engine's range)."""
    batches = []
    for start in range(0, len(texts), config.max_batch):
        feeds = tokenize(texts[start:start + config.max_batch])
        seq = next(iter(feeds.values())).shape[1]
        if seq < config.min_seq:
            grow = config.min_seq - seq
            feeds = {k: np.pad(v, ((0, 0), (0, grow)), constant_values=pad_id if k == "input_ids" else 0)
                     for k, v in feeds.items()}
        batches.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return [b for b in batches if next(iter(b.values())).shape[0] >= config.min_batch]


def _tokenizer(source: Source, config: CompileConfig) -> tuple[Callable[[list[str]], dict[str, np.ndarray]], int]:
    """The source's tokenizer, capped at `config.max_seq`. Pair models get each text paired
    with the next one, so real samples exercise both segments."""
    assert source.pipeline is not None and source.pipeline_dir is not None
    entry = dict(source.pipeline, max_length=min(int(source.pipeline["max_length"]), config.max_seq))
    pipeline = Pipeline.from_manifest(source.pipeline_dir, entry, directory="")
    if pipeline.pair:
        return (lambda texts: pipeline.tokenize_pairs(texts, texts[1:] + texts[:1])), pipeline.pad_id
    return pipeline.tokenize, pipeline.pad_id


def _tensor_samples(path: Path, source: Source, config: CompileConfig) -> list[Feeds]:
    tensors = load_file(str(path))
    names = [s.name for s in source.inputs]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConfigError(f"calibration data {path}: no tensor for input(s) {', '.join(missing)}")
    count = min(int(tensors[n].shape[0]) for n in names)
    return [{n: tensors[n][i:i + config.max_batch] for n in names} for i in range(0, count, config.max_batch)]


def calibration_feeds(source: Source, config: CompileConfig, batches: int = 8) -> list[Feeds]:
    """Batches to calibrate on: `config.calibration` when given, else the built-in sentences
    for text models, else `batches` random batches at the `opt` shape (models without a
    tokenizer have no better data kiln could know of)."""
    if config.calibration:
        path = Path(config.calibration)
        if path.suffix == ".safetensors":
            return _tensor_samples(path, source, config)
        if source.pipeline is None:
            raise ConfigError(f"calibration data {path}: text needs a model with a tokenizer; "
                              "give a .safetensors file of input tensors instead")
        tokenize, pad_id = _tokenizer(source, config)
        return text_batches(tokenize, read_texts(path)[: config.calibration_samples], config, pad_id)
    if source.pipeline is not None:
        tokenize, pad_id = _tokenizer(source, config)
        return text_batches(tokenize, list(CALIBRATION_SENTENCES), config, pad_id)
    generator = torch.Generator().manual_seed(config.seed + 3)
    sizes = {d.name: d.opt for s in source.inputs for d in s.dims}
    return [source.make_inputs(sizes, generator) for _ in range(batches)]


def verification_feeds(source: Source, config: CompileConfig) -> list[Feeds]:
    """Held-out real sentences for text models (empty for models without a tokenizer)."""
    if source.pipeline is None:
        return []
    tokenize, pad_id = _tokenizer(source, config)
    return text_batches(tokenize, list(VERIFICATION_SENTENCES), config, pad_id)
