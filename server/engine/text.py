"""Incremental detokenization with stop strings, for one sequence.

Each step decodes the whole output (byte-level BPE can only settle a character once its last
byte has arrived) and releases the text that can no longer change: it holds back a trailing
U+FFFD (an incomplete UTF-8 sequence) and any tail that could still grow into a stop string,
so a stop string never reaches the client, not even in part.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.sent = ""  # text already released to the client

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

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
        """At the end of a sequence that did not stop on a string: release everything."""
        text = self._decode(token_ids)
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
