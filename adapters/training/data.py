"""Training data: JSONL examples, checked line by line, tokenized with loss masks.

Two shapes, one per line (API.md, Training jobs): `{"prompt": str, "completion": str}` or
`{"messages": [{"role", "content"}, ...]}` rendered with the tokenizer's chat template. Every
bad line is reported with its number, all at once. Labels are -100 (ignored by the loss)
everywhere except on completion tokens, or on the tokens of assistant turns: a chat's assistant
spans are found by rendering the conversation up to each turn, so templates without
`{% generation %}` markers (SmolLM2's, most) work too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

IGNORE = -100
ROLES = {"system", "developer", "user", "assistant", "tool"}


class DataError(ValueError):
    """A training file that cannot be used; `problems` lists every reason, with line numbers."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class Example:
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict] | None = None


def _check_line(obj: object) -> str | None:
    """Why one parsed line is not an example (None when it is one)."""
    if not isinstance(obj, dict):
        return "is not a JSON object"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"message {i} needs a role ({', '.join(sorted(ROLES))}) and a string content"
        if not any(m["role"] == "assistant" for m in msgs):
            return "has no assistant message to learn from"
        return None
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return None if obj["completion"] else "'completion' is empty"
    return "needs either 'prompt' and 'completion' strings or a 'messages' list"


def read_jsonl(path: Path, max_examples: int | None = None, max_problems: int = 20) -> list[Example]:
    """Parse and check a JSONL training file; raises DataError naming every bad line (up to max_problems)."""
    examples: list[Example] = []
    problems: list[str] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(["the file is not UTF-8 text"]) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not valid JSON ({e.msg})")
            continue
        except RecursionError:
            problems.append(f"line {n}: nests too deeply")
            continue
        why = _check_line(obj)
        if why:
            problems.append(f"line {n}: {why}")
        elif "messages" in obj:
            examples.append(Example(messages=[{"role": m["role"], "content": m["content"]} for m in obj["messages"]]))
        else:
            examples.append(Example(prompt=obj["prompt"], completion=obj["completion"]))
    if not examples and not problems:
        problems.append("the file holds no examples")
    if max_examples is not None and len(examples) > max_examples:
        problems.append(f"the file holds {len(examples)} examples, over the limit of {max_examples}")
    if problems:
        extra = len(problems) - max_problems
        raise DataError(problems[:max_problems] + ([f"... and {extra} more"] if extra > 0 else []))
    return examples


def tokenize(tokenizer: PreTrainedTokenizerBase, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, truncated to max_len; labels mark the tokens to learn."""
    if ex.messages is None:
        prompt = tokenizer(ex.prompt)["input_ids"]
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        ids, labels = [], []
        for i, m in enumerate(ex.messages):
            full = _render(tokenizer, ex.messages[: i + 1], add_generation_prompt=False)
            if m["role"] == "assistant" and i > 0:
                # the context, generation prompt included ("<|im_start|>assistant\n"), is not learned
                context = _render(tokenizer, ex.messages[:i], add_generation_prompt=True)
                start = len(context) if full[: len(context)] == context else len(ids)
                labels += [IGNORE] * (start - len(ids)) + full[start:]
            else:
                labels += [IGNORE] * (len(full) - len(ids))
            ids = full
    return ids[:max_len], labels[:max_len]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
