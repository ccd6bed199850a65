"""Output processing: from a step's logits to each sequence's next token, its stop and length rules, its released
text, and the `RequestOutput` it emits (vLLM's output processor and stop checker, in the engine thread).

The rows' sampling parameters go to the device with the step's other inputs (`stage`, before the runner's
forward uploads the step buffers); the chosen tokens, with their logprobs when asked for, come back in one copy.
"""

from __future__ import annotations

import torch

from server.engine.buffers import StepBuffers
from server.engine.request import RequestOutput
from server.engine.sampling import TokenLogprob, packed, sample, unpack
from server.engine.scheduler import Sequence


class OutputProcessor:
    def __init__(self, eos_ids: list[int], max_len: int, buffers: StepBuffers):
        self.eos_ids, self.max_len, self.buffers = eos_ids, max_len, buffers
        self.eos = frozenset(eos_ids)
        self.tokens_generated = 0  # read by the metrics

    def stage(self, seqs: list[Sequence]) -> None:
        """Stage the sampling parameters of `seqs` (rows 0..len-1) for the next upload."""
        host = self.buffers.write()
        host["temperature"][: len(seqs)] = [s.req.params.temperature for s in seqs]
        host["top_p"][: len(seqs)] = [s.req.params.top_p for s in seqs]

    def process(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], list[RequestOutput]]:
        """Sample one token for each of `seqs` from its row of `logits` (B, vocab); returns the finished sequences
        and every sequence's output, to be emitted once the finished ones have left the batch (`emit`). The
        sequences' parameters were staged (`stage`) and uploaded with the step's forward."""
        tokens = self._sample(seqs, logits)
        k = max((s.req.params.logprobs for s in seqs if s.req.params.logprobs is not None), default=None)
        rows = packed(logits, tokens, k).tolist()  # the step's one copy to the host
        finished, outputs = [], []
        for s, row in zip(seqs, rows):
            tok, chosen = unpack(row, k)
            s.output_ids.append(tok)
            self.tokens_generated += 1
            p = s.req.params
            lp = None
            if chosen is not None and p.logprobs is not None:
                lp = [TokenLogprob(chosen.token_id, chosen.logprob, chosen.top[: p.logprobs])]
            reason = None
            if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
                reason = "stop"
            delta, stopped = s.stream.push(s.output_ids)
            if stopped:
                reason = "stop"
            elif reason is None and (len(s.output_ids) >= p.max_tokens or s.num_cached + 1 >= self.max_len):
                reason = "length"
            if reason is not None and not stopped:
                delta += s.stream.flush(s.output_ids)
            out = RequestOutput(s.req.request_id, delta, [tok], lp, reason, len(s.req.prompt_ids), len(s.output_ids))
            outputs.append(out)
            if reason is not None:
                finished.append(s)
        return finished, outputs

    @staticmethod
    def emit(seqs: list[Sequence], outputs: list[RequestOutput]) -> None:
        for s, out in zip(seqs, outputs):
            s.req.emit(out)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        n, dev = len(seqs), self.buffers.dev
        temps, top_ps = dev["temperature"][:n], dev["top_p"][:n]
        banned = None
        short = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.req.params.min_tokens]
        if short:  # min_tokens: no end of sequence yet
            banned = torch.zeros_like(logits, dtype=torch.bool)
            for i in short:
                banned[i, self.eos_ids + sorted(seqs[i].req.params.stop_token_ids)] = True
        any_sampled = any(s.req.params.temperature > 0 for s in seqs)
        return sample(logits, temps, top_ps, [s.generator for s in seqs], banned, any_sampled)

    @staticmethod
    def finish(seq: Sequence, reason: str, error: str | None = None) -> None:
        """End `seq` without a new token (aborted, refused, failed)."""
        req = seq.req
        req.emit(RequestOutput(req.request_id, "", [], None, reason, len(req.prompt_ids), len(seq.output_ids), error))
