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


def test_one_token_a_step_gives_the_whole_decode():
    """DecodeStream, one token a step, releases exactly what decoding the whole output gives, multi-byte
    characters split across byte tokens included; a tokenizer without it (decoding everything each step) too."""
    from transformers import PreTrainedTokenizerFast

    slow = PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, clean_up_tokenization_spaces=True)
    for text in ("Hello world! How are you today?", "Héllo wörld — 你好 ✓ 🙂 done.", "0 1 2 3\\n\\tend"):
        ids = TOK(text)["input_ids"]
        for tok in (TOK, slow):
            s = TextStream(tok, [])
            assert (s._stream is None) == (tok is slow)
            out = "".join(s.push(ids[:n])[0] for n in range(1, len(ids) + 1)) + s.flush(ids)
            assert out == TOK.decode(ids, skip_special_tokens=True), (text, tok is slow)
