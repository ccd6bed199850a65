"""Training data: line-numbered validation and loss masks on completion / assistant tokens."""

from __future__ import annotations

import json

import pytest

from adapters.training.data import IGNORE, DataError, Example, read_jsonl, tokenize
from tests.tiny import make_tokenizer

TOK = make_tokenizer()


def write(tmp_path, lines: list[str]):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_reads_both_shapes(tmp_path):
    p = write(tmp_path, [
        json.dumps({"prompt": "Hello", "completion": " world"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]}),
    ])
    examples = read_jsonl(p)
    assert examples[0].completion == " world" and examples[1].messages[1]["content"] == "fine"


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    p = write(tmp_path, [
        json.dumps({"prompt": "ok", "completion": "fine"}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"prompt": "no completion"}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
    ])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    problems = e.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert "not valid JSON" in problems[0] and "no assistant message" in problems[3]


def test_limits_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(write(tmp_path, [""]))
    lines = [json.dumps({"prompt": "p", "completion": "c"})] * 5
    with pytest.raises(DataError, match="over the limit of 3"):
        read_jsonl(write(tmp_path, lines), max_examples=3)


def test_completion_tokens_only_are_learned():
    ids, labels = tokenize(TOK, Example(prompt="The capital of France is", completion=" Paris."), max_len=64)
    prompt_len = len(TOK("The capital of France is")["input_ids"])
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    learned = [t for t in labels if t != IGNORE]
    assert TOK.decode(learned, skip_special_tokens=True) == " Paris."
    assert learned[-1] == TOK.eos_token_id  # the model learns to stop


def test_only_assistant_turns_are_learned_in_a_chat():
    msgs = [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "I am fine"},
            {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "thank you"}]
    ids, labels = tokenize(TOK, Example(messages=msgs), max_len=256)
    rendered = TOK(TOK.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == rendered and len(labels) == len(ids)
    learned = TOK.decode([t for t in labels if t != IGNORE])
    assert "I am fine" in learned and "thank you" in learned
    assert "Hello" not in learned and "How are" not in learned and "assistant" not in learned


def test_truncation():
    ids, labels = tokenize(TOK, Example(prompt="Hello " * 50, completion="world"), max_len=16)
    assert len(ids) == len(labels) == 16
