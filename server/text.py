"""Text requests: byte limits, truncation on a bounded prefix, and tokenization off the
instance threads.

Tokenizing costs time and memory in proportion to a text's bytes, not to the tokens the model
keeps: Hugging Face `tokenizers` encodes the whole text and truncates afterwards (measured on
MiniLM's WordPiece: 10 MB of English takes 15 s and about 1 GB). The engine reads at most the
pipeline's `max_length` tokens, so bytes beyond a generous multiple of it can only be cut
away. Hence every text and every request has a byte limit (`ModelConfig.max_text_bytes`,
`max_request_text_bytes`); a request over one is refused with INVALID_ARGUMENT, or — when it
sends the parameter `truncate` — each text over the per-text limit is cut to that many bytes
before anything tokenizes it.

Tokenization runs in a `TokenizerPool` of its own, before the request is queued, so a text
never occupies the event loop or a model instance (requests of tokens queued behind it used to
wait for it).

What a text request sends and gets back depends on the engine's task; the engine's pipeline
says it (`TextTask`, made by optimize's `Pipeline.text_interface`), and turns the engine's
outputs into the task's answer once the request's batch has run. That post-processing is
small numpy and Python that holds the GIL (measured on 4 sentences: 35 µs for labels and
scores, 0.4 ms for entities, 0.6 ms for 8 sentences' entities), so it runs on the event loop: a
thread would hold the GIL just the same, and add its hand-off (36 µs a round trip); it never
occupies a model instance.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from server.errors import InvalidArgument, TextTooLong

# Default bytes of UTF-8 text allowed per token of the model's maximum length. Measured on
# all-MiniLM-L6-v2's WordPiece tokenizer, bytes per token over the first 62 tokens: English
# prose 5.4, German 3.0, Chinese 3.0, Russian 2.3, code 2.4, URLs 2.0, base64 1.5, emoji-heavy
# text 17-21 (each emoji word is one [UNK]). 32 (8 characters of the widest UTF-8 encoding per
# token) keeps every one of them whole up to the model's maximum, with room to spare, while
# bounding the work: 64 tokens → 2 KiB, 512 tokens → 16 KiB, a few milliseconds to tokenize.
# Texts that pack far fewer tokens into their bytes (long whitespace runs, words over 100
# characters that become one [UNK]) are refused, or cut and then hold fewer tokens than the
# maximum.
BYTES_PER_TOKEN = 32
# Threads that tokenize. `tokenizers` parallelizes a batch over every core itself and releases
# the GIL while it works, so more threads add no throughput; two let a second request's texts
# start while one is encoding. Byte limits bound each job, so the wait for a thread is bounded
# by the jobs ahead of it.
TOKENIZER_THREADS = min(2, os.cpu_count() or 1)
# A UTF-8 continuation byte is 0b10xxxxxx; a character has at most 3 of them.
_CONTINUATION_MASK, _CONTINUATION = 0xC0, 0x80
_MAX_CONTINUATIONS = 3

Tensors = dict[str, np.ndarray]


class Encoded(Protocol):
    """Texts tokenized by a pipeline: `feeds` are the engine's token inputs ([n, longest]);
    `truncated` the indices of texts cut to the pipeline's maximum tokens."""

    feeds: Tensors
    truncated: tuple[int, ...]


class TextPipeline(Protocol):
    """The part of optimize's `Pipeline` tokenization needs."""

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
        """`texts` (with their second texts `pairs`, for pair engines) tokenized for the
        engine, with what post-processing needs (offsets)."""


class TextTask(Protocol):
    """What a task's text requests send and get (optimize's `TextInterface`): `inputs` and
    `outputs` (each with `name`, `dtype` (numpy's name; "object" is BYTES) and `shape` per
    text), the request parameters it takes (`options`), and its post-processing."""

    task: str
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    options: tuple[str, ...]
    labels: tuple[str, ...]

    def check_options(self, values: Mapping[str, Any], text: bool = True) -> Any:
        """The request's options among `values`; raises `ValueError` naming a bad one."""

    def postprocess(self, outputs: Mapping[str, np.ndarray], encoded: Any, options: Any,
                    names: Sequence[str]) -> Tensors:
        """The outputs `names` of a text request, from the engine's `outputs` for it."""


def default_max_text_bytes(max_tokens: int) -> int:
    """The per-text byte limit of a model whose pipeline keeps `max_tokens` tokens."""
    return max_tokens * BYTES_PER_TOKEN


def utf8_prefix(data: bytes, limit: int) -> bytes:
    """The longest prefix of `data` with at most `limit` bytes that does not end inside a UTF-8
    character (a character cut by the limit is left out whole)."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and limit - end < _MAX_CONTINUATIONS and data[end] & _CONTINUATION_MASK == _CONTINUATION:
        end -= 1
    return data[:end]


@dataclass(frozen=True)
class TextLimits:
    """How many bytes of UTF-8 one text (`max_text_bytes`) and all texts of one request
    (`max_request_text_bytes`) may hold, for model `model`."""

    model: str
    max_text_bytes: int
    max_request_text_bytes: int

    def apply(self, name: str, elements: Sequence[bytes], truncate: bool = False, counted: int = 0) -> list[bytes]:
        """`elements` (the raw texts of input `name`) within the limits: as they are, or with
        each text over `max_text_bytes` cut to that many bytes when `truncate`; `counted` bytes
        of the request's other text inputs count towards its limit. Raises `InvalidArgument`
        naming the limit and the offending size otherwise."""
        bounded = []
        for index, element in enumerate(elements):
            if len(element) > self.max_text_bytes:
                if not truncate:
                    raise InvalidArgument(
                        f"input '{name}' element {index} is {len(element)} bytes, more than model '{self.model}' "
                        f"accepts per text (max_text_bytes {self.max_text_bytes}); send the request parameter "
                        f"truncate=true to cut it to its first {self.max_text_bytes} bytes")
                element = utf8_prefix(element, self.max_text_bytes)
            bounded.append(element)
        total = counted + sum(len(e) for e in bounded)
        if total > self.max_request_text_bytes:
            what = f"input '{name}' holds" if not counted else "the request's text inputs hold"
            raise InvalidArgument(
                f"{what} {total} bytes of text, more than model '{self.model}' accepts per request "
                f"(max_request_text_bytes {self.max_request_text_bytes})")
        return bounded


def check_tokens(model: str, encoded: Encoded, max_tokens: int, truncate: bool) -> None:
    """Refuse a request with a text the tokenizer had to cut to `max_tokens` (the most model
    `model` reads), unless it asked to `truncate`: a cut text's answer is that of its first
    tokens only, which a client must choose knowingly. Raises `TextTooLong` naming the text
    and the limit."""
    if encoded.truncated and not truncate:
        raise TextTooLong(
            f"input 'text' element {encoded.truncated[0]} holds more than {max_tokens} tokens, the most model "
            f"'{model}' reads; send the request parameter truncate=true to keep its first {max_tokens}")


class TokenizerPool:
    """Threads that turn a request's texts into the engine's token inputs before it is queued.

    Shared by every model of a server: the event loop never tokenizes (a long text would stall
    every RPC), neither do the model instances (a long text would hold up the batches behind
    it). `close` when the server stops.
    """

    def __init__(self, threads: int = TOKENIZER_THREADS) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kiln-tokenize")

    async def encode(self, pipeline: TextPipeline, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
        """`pipeline.encode(texts, pairs)`, in a pool thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, pipeline.encode, list(texts),
                                          None if pairs is None else list(pairs))

    def close(self) -> None:
        """Take no more work; the threads exit once the tokenizations already queued are done
        (their requests then find their model stopped and are answered UNAVAILABLE)."""
        self._executor.shutdown(wait=False)
