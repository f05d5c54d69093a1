"""Log lines clients cannot forge: control characters escaped in the text format, one JSON object
per line in the JSON format, and events anyone can cause at will throttled to a few lines."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from server.logs import CONTINUATION, JsonFormatter, TextFormatter, Throttled, escape
from tests.server.fakes import FakeEngine
from tests.server.harness import fake_repository, int64_inputs, running_server

HOSTILE = "evil\n2030-01-01 00:00:00,000 INFO server.service: model 'x' loaded\r\x00\x1b[31m\x85\u2028\x7f\t"


def record(message: str = "model %s", *args: object, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("server.test", logging.INFO, __file__, 1, message, args or (HOSTILE,), None)
    made.__dict__.update(fields)
    return made


@pytest.mark.parametrize("char, escaped", [("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\x00", "\\x00"),
                                           ("\x1b", "\\x1b"), ("\x7f", "\\x7f"), ("\x85", "\\x85"),
                                           ("\x9f", "\\x9f"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")])
def test_every_control_character_is_escaped(char: str, escaped: str):
    assert escape(f"a{char}b") == f"a{escaped}b"


def test_printable_text_is_left_as_it_is():
    text = "model 'minilm' 4×8 ünïcödé \\n is two characters"
    assert escape(text) == text


def test_a_text_line_stays_one_line_with_hostile_messages_and_fields():
    line = TextFormatter().format(record(model=HOSTILE, request_id=HOSTILE, shapes=[[1, 2]]))
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\x85" not in line
    assert line.count("evil\\n2030-01-01") == 3  # message, model and request_id, each escaped
    assert line.endswith("[model=" + escape(HOSTILE) + " request_id=" + escape(HOSTILE) + " shapes=[[1, 2]]]")


def test_a_traceback_follows_on_marked_lines_that_cannot_pass_for_records():
    try:
        raise ValueError(f"bad model {HOSTILE}")
    except ValueError:
        failed = logging.LogRecord("server.test", logging.ERROR, __file__, 1, "it failed", (), sys.exc_info())
    first, *rest = TextFormatter().format(failed).split("\n")
    assert first.endswith("ERROR server.test: it failed")
    assert rest and all(line.startswith(CONTINUATION) for line in rest)
    assert any("ValueError: bad model evil" in line for line in rest)


def test_a_json_record_is_one_object_on_one_line_with_the_text_intact():
    line = JsonFormatter().format(record(model=HOSTILE))
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\u2028" not in line
    entry = json.loads(line)
    assert entry["message"] == f"model {HOSTILE}" and entry["model"] == HOSTILE and entry["level"] == "INFO"


def test_throttled_logs_the_first_then_one_summary_per_interval():
    now = [0.0]
    stream = io.StringIO()
    logger = logging.getLogger("tests.server.throttled")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    throttled = Throttled(logger, interval_s=60.0, clock=lambda: now[0])
    for second in range(0, 150):  # one event a second for 150 s
        now[0] = float(second)
        throttled.log("refused a call from %s", "10.0.0.1")
    assert stream.getvalue().splitlines() == [
        "refused a call from 10.0.0.1",
        "refused a call from 10.0.0.1 (and 59 more since the previous such line, logged at DEBUG)",
        "refused a call from 10.0.0.1 (and 59 more since the previous such line, logged at DEBUG)",
    ]


@pytest.fixture
def server_logs() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What the server logs, as `--log-format text` and `--log-format json` would write it."""
    text, structured = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(structured)]
    handlers[0].setFormatter(TextFormatter())
    handlers[1].setFormatter(JsonFormatter())
    logger = logging.getLogger("server")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield text, structured
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_model_name_sent_by_a_client_cannot_forge_a_log_line(server_logs: tuple[io.StringIO, io.StringIO]):
    text, structured = server_logs
    with running_server(fake_repository(FakeEngine(), max_batch_size=8)) as running:
        ids = np.zeros((1, 3), np.int64)
        with pytest.raises(InferenceServerException) as info:
            running.client().infer(HOSTILE, int64_inputs({"input_ids": ids, "attention_mask": ids}),
                                   request_id=HOSTILE)
        assert info.value.status() == "StatusCode.NOT_FOUND"
    lines = text.getvalue().splitlines()
    assert not [line for line in lines if line.startswith("2030-01-01")]  # nothing forged
    failed = [line for line in lines if "ModelInfer failed" in line]
    assert len(failed) == 1 and escape(HOSTILE) in failed[0] and "\x00" not in failed[0]
    entries = [json.loads(line) for line in structured.getvalue().splitlines()]  # every line one object
    (entry,) = [e for e in entries if "ModelInfer failed" in e["message"]]
    assert entry["model"] == HOSTILE and entry["request_id"] == HOSTILE and entry["code"] == "NOT_FOUND"
