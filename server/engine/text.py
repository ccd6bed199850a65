"""Incremental detokenization with stop strings, for one sequence.

Byte-level BPE can only settle a character once its last byte has arrived, so a token's text is not a function of
the token alone. With a fast tokenizer, `tokenizers`' `DecodeStream` decodes one new token a step (it keeps the
few trailing tokens a character may span); otherwise each step decodes the whole output and holds back a trailing
U+FFFD (an incomplete UTF-8 sequence). Either way the text released is the text that can no longer change, minus
any tail that could still grow into a stop string: a stop string never reaches the client, not even in part.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.sent = ""  # text already released to the client
        # one token a step where the tokenizer allows it (a fast one, without transformers' space clean-up)
        self._fast = getattr(tokenizer, "_tokenizer", None)
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._fast = None
        self._stream = DecodeStream(skip_special_tokens=True) if self._fast is not None else None
        self._text, self._fed = "", 0  # what the stream has decoded, from how many tokens

    def _decode(self, token_ids: list[int]) -> str:
        if self._stream is None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for token in token_ids[self._fed :]:
            self._text += self._stream.step(self._fast, token) or ""
        self._fed = len(token_ids)
        return self._text

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Given all output tokens so far: (newly released text, whether a stop string matched)."""
        text = self._decode(token_ids)
        if self.stop:
            start = max(0, len(self.sent) - max(len(s) for s in self.stop))
            hits = [p for p in (text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                final = text[: min(hits)]
                delta, self.sent = final[len(self.sent) :], final
                return delta, True
        end = len(text)
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0  # the longest tail that is the start of some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, end - len(self.sent)), hold, -1):
                if text[end - k : end] == s[:k]:
                    hold = k
                    break
        end -= hold
        delta = text[len(self.sent) : end]
        self.sent += delta
        return delta, False

    def flush(self, token_ids: list[int]) -> str:
        """At the end of a sequence that did not stop on a string: release everything (an incomplete last
        character as U+FFFD, as a whole decode gives it)."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if not text.startswith(self.sent):  # a decoder whose streamed text differs: keep what was sent consistent
            text = self._decode(token_ids)
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
