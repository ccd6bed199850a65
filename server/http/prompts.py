"""From a request to prompt token ids: bounded before any tokenization, tokenized off the event loop.

A client can send megabytes of text, tens of thousands of prompts or thousands of messages; tokenizing them all
before finding that they cannot fit would stall the event loop (every other client, `/health/live`) for seconds.
So every bound that needs no tokenizer comes first: prompts × n at most the server's queue, messages at most the
context's tokens (each renders to one token at least), and the characters of each prompt at most what the context
could hold. That last bound is exact, not a guess: no token of the vocabulary covers more characters than its
longest spelling (`chars_per_token`), so a text longer than `max_model_len × chars_per_token` characters cannot fit
(× 4 for normalizers that compose characters). The chat template and the tokenizer then run in a worker thread
(`asyncio.to_thread`: the Rust tokenizer and Jinja release the event loop; no torch runs here).
"""

from __future__ import annotations

import asyncio

from server.http.errors import APIError
from server.http.protocol import ChatCompletionRequest, CompletionRequest

NORMALIZER_SLACK = 4  # characters a normalizer may fold into one (NFKC composition), on top of the longest token


def chars_per_token(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for: its longest token's spelling (byte-level BPE spells
    each byte as one character, SentencePiece each character as one; special tokens as themselves)."""
    longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t)
    return max(longest, *(len(t) for t in tokenizer.all_special_tokens))


def too_long(max_model_len: int, param: str, detail: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, {detail}. "
                    "Please reduce the length of the prompt.", "invalid_request_error", param,
                    "context_length_exceeded")  # fmt: skip


class PromptBuilder:
    def __init__(self, tokenizer, max_model_len: int, max_waiting: int):
        self.tokenizer, self.max_model_len, self.max_waiting = tokenizer, max_model_len, max_waiting
        self.vocab = len(tokenizer)
        self.max_chars = max_model_len * chars_per_token(tokenizer) * NORMALIZER_SLACK

    def _check_choices(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_waiting:
            raise APIError(400, f"{prompts} prompts × n={n} is {prompts * n} sequences, more than this server queues "
                           f"({self.max_waiting}); send fewer per request", "invalid_request_error", "prompt")  # fmt: skip

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise too_long(self.max_model_len, param, f"your {param} holds {chars} characters, more than that many "
                           "tokens can spell")  # fmt: skip

    async def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(t, int) for t in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "invalid_request_error", "prompt")
        self._check_choices(len(prompts), req.n)
        for x in prompts:
            if isinstance(x, str):
                self._check_chars(len(x), "prompt")
            elif len(x) >= self.max_model_len:
                raise too_long(self.max_model_len, "prompt", f"your prompt holds {len(x)} tokens")
        return await asyncio.to_thread(self._encode_prompts, prompts)

    def _encode_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        texts = [x for x in prompts if isinstance(x, str)]
        encoded = iter(self.tokenizer(texts)["input_ids"] if texts else [])
        out = [next(encoded) if isinstance(x, str) else list(x) for x in prompts]
        for ids in out:
            if not ids or max(ids) >= self.vocab:
                raise APIError(400, "prompt is empty or holds token ids outside the vocabulary", "invalid_request_error",
                               "prompt")  # fmt: skip
        return out

    async def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        self._check_choices(1, req.n)
        if len(req.messages) >= self.max_model_len:
            raise too_long(self.max_model_len, "messages", f"your messages are {len(req.messages)}, a token each at least")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        return await asyncio.to_thread(self._encode_chat, messages, req.add_generation_prompt)

    def _encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {str(e)[:200]}", "invalid_request_error",
                           "messages") from None  # fmt: skip
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
