"""Incremental detokenization: stop strings never reach the client, not even in part."""

from __future__ import annotations

from server.engine.text import TextStream
from tests.tiny import make_tokenizer

TOK = make_tokenizer()


def stream_all(text: str, stop: list[str]) -> tuple[list[str], bool]:
    ids = TOK(text)["input_ids"]
    s = TextStream(TOK, stop)
    deltas = []
    for n in range(1, len(ids) + 1):
        delta, stopped = s.push(ids[:n])
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(s.flush(ids))
    return deltas, False


def test_stop_string_truncates_and_is_never_sent_in_part():
    deltas, stopped = stream_all("Hello world! How are you today?", ["How are"])
    assert stopped
    assert "".join(deltas) == "Hello world! "
    assert not any("How" in d for d in deltas)


def test_without_stop_everything_arrives_in_order():
    text = "The capital of France is Paris."
    deltas, stopped = stream_all(text, ["zzz"])
    assert not stopped and "".join(deltas) == text


def test_multibyte_characters_are_not_split():
    text = "Paris é à 東京"
    deltas, _ = stream_all(text, [])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
