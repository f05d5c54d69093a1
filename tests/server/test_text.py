"""Text limits, truncation on a bounded prefix and the tokenizer pool (`server/text.py`)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from server.errors import InvalidArgument
from server.text import BYTES_PER_TOKEN, TextLimits, TokenizerPool, default_max_text_bytes, utf8_prefix

LIMITS = TextLimits("minilm", max_text_bytes=10, max_request_text_bytes=25)


def test_the_default_limit_is_max_tokens_times_the_bytes_per_token_factor():
    assert default_max_text_bytes(64) == 64 * BYTES_PER_TOKEN == 2048


@pytest.mark.parametrize("text", ["ascii", "é" * 9, "日本語のテキスト", "🎸🎉🚀", "a🎸bé日c" * 3])
@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 7, 11, 13])
def test_utf8_prefix_never_cuts_a_character_and_keeps_all_that_fits(text: str, limit: int):
    data = text.encode()
    prefix = utf8_prefix(data, limit)
    assert len(prefix) <= limit and data.startswith(prefix)
    decoded = prefix.decode("utf-8")  # whole characters only
    following = text[len(decoded):len(decoded) + 1]
    assert len(data) <= limit or len(prefix) + len(following.encode()) > limit  # the next one did not fit


def test_texts_within_the_limits_pass_untouched():
    assert LIMITS.apply("text", [b"0123456789", b"short"]) == [b"0123456789", b"short"]


def test_a_text_over_the_limit_is_refused_naming_the_limit_its_size_and_truncate():
    with pytest.raises(InvalidArgument, match=r"input 'text' element 1 is 11 bytes, more than model 'minilm' accepts "
                                              r"per text \(max_text_bytes 10\); send the request parameter "
                                              r"truncate=true"):
        LIMITS.apply("text", [b"ok", b"01234567890"])


def test_truncate_cuts_each_long_text_to_the_limit_at_a_character_boundary():
    assert LIMITS.apply("text", [b"0123456789abc", "ééééé é".encode(), b"x"], truncate=True) == [
        b"0123456789", "ééééé".encode(), b"x"]


def test_a_request_over_its_limit_is_refused_even_after_truncation():
    with pytest.raises(InvalidArgument, match=r"input 'text' holds 30 bytes of text, more than model 'minilm' accepts "
                                              r"per request \(max_request_text_bytes 25\)"):
        LIMITS.apply("text", [b"a" * 40, b"b" * 40, b"c" * 10], truncate=True)


class RecordingPipeline:
    def __init__(self) -> None:
        self.threads: list[str] = []

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> SimpleNamespace:
        self.threads.append(threading.current_thread().name)
        lengths = [len(t) + len(p) for t, p in zip(texts, pairs or [""] * len(texts), strict=True)]
        return SimpleNamespace(feeds={"input_ids": np.array([[n] for n in lengths])})


def test_the_pool_tokenizes_in_threads_of_its_own():
    pipeline, pool = RecordingPipeline(), TokenizerPool(threads=2)
    try:
        encoded = asyncio.run(pool.encode(pipeline, np.array(["ab", "cde"], dtype=object)))
        pairs = asyncio.run(pool.encode(pipeline, ["ab", "cde"], np.array(["x", "yz"], dtype=object)))
    finally:
        pool.close()
    assert encoded.feeds["input_ids"].tolist() == [[2], [3]]
    assert pairs.feeds["input_ids"].tolist() == [[3], [5]]
    assert pipeline.threads and all(name.startswith("kiln-tokenize") for name in pipeline.threads)


def test_both_texts_of_a_pair_count_towards_the_request_limit():
    assert LIMITS.apply("text_pair", [b"0123456789"], counted=15) == [b"0123456789"]
    with pytest.raises(InvalidArgument, match=r"the request's text inputs hold 26 bytes of text, more than model "
                                              r"'minilm' accepts per request \(max_request_text_bytes 25\)"):
        LIMITS.apply("text_pair", [b"0123456789", b"x"], counted=15)
