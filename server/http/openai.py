"""The OpenAI translation layer: completions and chat completions on top of the async engine.

Translates a validated request into engine requests (one per prompt × n), and their outputs
into OpenAI response bodies or SSE chunks (vLLM's `OpenAIServingCompletion` / `OpenAIServingChat`).
Errors are raised as `APIError`; the routes only map them to HTTP. Prompts are bounded and tokenized off the
event loop (`server.http.prompts`), and so are whole response bodies; engine requests are counted against the
queue from the moment they are checked until the engine has them (so concurrent requests cannot overshoot
`max_waiting`). `shutdown()` ends every running request with a 503 error (a stream: an error event, then
`[DONE]`), for the end of a drain.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from adapters.tiers.registry import AdapterNotFound
from server.catalog import AdapterCatalog
from server.engine.async_engine import Overloaded
from server.engine.model import BaseModel
from server.engine.request import AdapterUse, RequestOutput
from server.engine.sampling import SamplingParams, TokenLogprob
from server.http.engine_client import EngineClient
from server.http.errors import APIError
from server.http.metrics import Metrics
from server.http.prompts import PromptBuilder
from server.http.protocol import ChatCompletionRequest, CompletionRequest
from server.tenants import OPERATOR, Tenant

Admit = Callable[[int], AbstractContextManager]
"""Called with a request's token cost (prompt + requested completion tokens) before it starts; held until it ends
(per-key limits: may raise APIError 429)."""
NO_LOGPROB = -9999.0  # what OpenAI reports for a probability of zero; JSON has no -Infinity or NaN


def _finite(x: float) -> float:
    return x if math.isfinite(x) else NO_LOGPROB


@dataclass
class _Choice:
    index: int
    prompt_len: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        if out.error:
            # "abort" with a reason: the server stopped it (shutdown); "error": the engine failed
            raise APIError(503 if out.finish_reason == "abort" else 500, out.error, "server_error")
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


class OpenAIServing:
    """The OpenAI endpoints over an engine client; `base` gives the model id and tokenizer only (the ingress of a Ray
    Serve application has no model: `server.ray.ingress`)."""

    def __init__(self, base: BaseModel, engine: EngineClient, catalog: AdapterCatalog, max_model_len: int,
                 metrics: Metrics):  # fmt: skip
        self.base = base
        self.tokenizer = base.tokenizer
        self.engine = engine
        self.catalog = catalog
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.prompts = PromptBuilder(base.tokenizer, max_model_len, engine.max_waiting)
        self._runs: set[asyncio.Queue] = set()  # the output queue of every running request
        self._token_texts: dict[int, str] = {}

    @property
    def active(self) -> int:
        """Requests running (streamed or not)."""
        return len(self._runs)

    def shutdown(self, message: str = "the server is shutting down") -> None:
        """End every running request now with a 503 (see the module docstring)."""
        for queue in self._runs:
            queue.put_nowait((None, APIError(503, message, "server_error")))

    # ---- request → engine -------------------------------------------------------------------

    async def resolve_adapters(self, req: CompletionRequest | ChatCompletionRequest, tenant: Tenant = OPERATOR
                               ) -> list[AdapterUse]:  # fmt: skip
        """The adapters a request names, as `tenant` sees them, with their weights (read from disk if the host tier
        dropped them)."""
        named: list[tuple[str, float, str]] = []
        if req.model != self.base.model_id:
            named.append((req.model, 1.0, "model"))
        named += [(a.name, a.weight, "adapters") for a in req.adapters or ()]
        uses = []
        for name, weight, param in named:
            try:
                adapter = await self.catalog.lookup(name, tenant)
            except AdapterNotFound:
                what = "model" if param == "model" else "adapter"
                raise APIError(404, f"The {what} '{name}' does not exist.", "invalid_request_error", param, "model_not_found") from None
            uses.append(AdapterUse(adapter, weight, await self.catalog.weights(adapter)))
        return uses

    def _check(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        problem = req.unsupported()
        if problem:
            raise APIError(400, problem, "invalid_request_error")

    def _params(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None, j: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + (max_tokens or 1)} tokens ({prompt_len} in the prompt, {max_tokens or 1} for the completion). "
                "Please reduce the length of the prompt or the completion.",
                "invalid_request_error",
                "max_tokens" if max_tokens else "messages",
                "context_length_exceeded",
            )
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in req.stop_token_ids or ()):
            raise APIError(400, "stop_token_ids must be token ids of the vocabulary", "invalid_request_error", "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens or room,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=None if req.seed is None else req.seed + j,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
        )

    async def _run(self, prompts: list[list[int]], req, max_tokens, logprobs, uses, admit: Admit | None
                   ) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        """Start every choice, then yield (choice index, output) as they come; closing aborts all."""
        self._check(req)
        params = [self._params(req, len(p), max_tokens, logprobs, j) for p in prompts for j in range(req.n)]
        cost = sum(len(p) for p in prompts) * req.n + sum(sp.max_tokens for sp in params)
        arrived = time.monotonic()
        with admit(cost) if admit else nullcontext():
            label = self.metrics.adapter_label(self.traffic_label(req))
            self.metrics.adapter_requests.labels(label).inc()
            async for item in self._outputs([prompts[i // req.n] for i in range(len(params))], params, uses, label):
                yield item
            self.metrics.e2e.observe(time.monotonic() - arrived)

    def traffic_label(self, req: CompletionRequest | ChatCompletionRequest) -> str:
        """The `adapter` label of a request's series: its adapter, the composed adapters joined by "+", or the base
        model's id (which no adapter may take) for none."""
        if req.model != self.base.model_id:
            return req.model
        return "+".join(sorted({a.name for a in req.adapters})) if req.adapters else self.base.model_id

    async def _outputs(self, prompts: list[list[int]], params: list[SamplingParams], uses: list[AdapterUse],
                       label: str) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        """The engine client's outputs for choices i (prompts[i], params[i]), through a queue that `shutdown` can
        end at once (a 503) whatever the engine is doing; closing it aborts every choice still running."""
        queue: asyncio.Queue = asyncio.Queue()
        outputs = self.engine.run(prompts, params, uses)

        async def pump() -> None:
            try:
                async for item in outputs:
                    queue.put_nowait(item)
                queue.put_nowait((None, None))
            except Exception as e:  # Overloaded, AdapterNotFound (a replica's catalog), anything: raised by the reader
                queue.put_nowait((None, e))

        task = asyncio.create_task(pump())
        self._runs.add(queue)
        try:
            while True:
                i, out = await queue.get()
                if i is None:  # the end, an error, or shutdown()
                    if out is None:
                        return
                    raise out
                if out.finish_reason is not None:
                    self.metrics.generation_tokens.inc(out.completion_tokens)
                    self.metrics.adapter_tokens.labels(label).inc(out.completion_tokens)
                    self.metrics.prompt_tokens.inc(out.prompt_tokens)
                yield i, out
        except Overloaded as e:
            raise APIError(503, str(e), "server_error", headers={"Retry-After": "1"}) from None
        finally:
            self._runs.discard(queue)
            task.cancel()  # a cancelled pump closes the engine client's iterator: it aborts what still runs
            await asyncio.gather(task, return_exceptions=True)
            await outputs.aclose()

    # ---- engine → response --------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:  # one entry per vocabulary token at most
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        tokens = [self._token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": [{self._token_text(t): _finite(v) for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            text = self._token_text(tid)
            return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode())}

        return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    async def complete(self, req: CompletionRequest, tenant: Tenant = OPERATOR, admit: Admit | None = None) -> dict:
        uses = await self.resolve_adapters(req, tenant)
        prompts = await self.prompts.completion_prompts(req)
        choices = [_Choice(i, len(prompts[i // req.n])) for i in range(len(prompts) * req.n)]
        async for i, out in self._run(prompts, req, req.max_tokens, req.logprobs, uses, admit):
            choices[i].add(out)
        return await asyncio.to_thread(self._completion_body, req, prompts, choices)  # decoding, off the loop

    def _completion_body(self, req: CompletionRequest, prompts: list[list[int]], choices: list[_Choice]) -> dict:
        body = []
        for c in choices:
            prefix = self.tokenizer.decode(prompts[c.index // req.n]) if req.echo else ""
            lp = self.completion_logprobs(c.logprobs, len(prefix)) if req.logprobs is not None else None
            body.append({"index": c.index, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": body,
            "usage": self.usage(sum(len(p) for p in prompts), sum(len(c.token_ids) for c in choices)),
        }

    async def chat(self, req: ChatCompletionRequest, tenant: Tenant = OPERATOR, admit: Admit | None = None) -> dict:
        uses = await self.resolve_adapters(req, tenant)
        prompt = await self.prompts.chat_prompt(req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        choices = [_Choice(i, len(prompt)) for i in range(req.n)]
        async for i, out in self._run([prompt], req, req.max_completion_tokens or req.max_tokens, k, uses, admit):
            choices[i].add(out)
        return await asyncio.to_thread(self._chat_body, req, prompt, choices)

    def _chat_body(self, req: ChatCompletionRequest, prompt: list[int], choices: list[_Choice]) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.chat_logprobs(c.logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": self.usage(len(prompt), sum(len(c.token_ids) for c in choices)),
        }

    async def stream_completion(self, req: CompletionRequest, tenant: Tenant = OPERATOR, admit: Admit | None = None
                                ) -> AsyncIterator[dict]:  # fmt: skip
        """Validate eagerly (errors before the stream starts become HTTP errors), then stream."""
        uses = await self.resolve_adapters(req, tenant)
        prompts = await self.prompts.completion_prompts(req)
        run = self._run(prompts, req, req.max_tokens, req.logprobs, uses, admit)
        first = await anext(run)  # starts the engine requests; raises APIError before any byte is sent
        return self._completion_chunks(req, prompts, run, first)

    async def _completion_chunks(self, req, prompts, run, first) -> AsyncIterator[dict]:
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion_tokens = 0
        offsets = [0] * (len(prompts) * req.n)
        echoed: set[int] = set()

        async for i, out in _prepend(first, run):
            if out.error:
                yield {"error": {"message": out.error, "type": "server_error", "param": None, "code": None}}
                return
            text = out.text
            if req.echo and i not in echoed:
                echoed.add(i)
                text = self.tokenizer.decode(prompts[i // req.n]) + text
            if not text and out.finish_reason is None and not out.logprobs:
                continue
            lp = self.completion_logprobs(out.logprobs or [], offsets[i]) if req.logprobs is not None else None
            offsets[i] += len(text)
            if out.finish_reason is not None:
                completion_tokens += out.completion_tokens
            chunk = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}],
            }
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": [],
                "usage": self.usage(sum(len(p) for p in prompts) * 1, completion_tokens),
            }

    async def stream_chat(self, req: ChatCompletionRequest, tenant: Tenant = OPERATOR, admit: Admit | None = None
                          ) -> AsyncIterator[dict]:  # fmt: skip
        uses = await self.resolve_adapters(req, tenant)
        prompt = await self.prompts.chat_prompt(req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        run = self._run([prompt], req, req.max_completion_tokens or req.max_tokens, k, uses, admit)
        first = await anext(run)
        return self._chat_chunks(req, prompt, run, first)

    async def _chat_chunks(self, req, prompt, run, first) -> AsyncIterator[dict]:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        extra = {"usage": None} if include_usage else {}
        for i in range(req.n):
            delta = {"role": "assistant", "content": ""}
            yield base | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]} | extra
        completion_tokens = 0

        async for i, out in _prepend(first, run):
            if out.error:
                yield {"error": {"message": out.error, "type": "server_error", "param": None, "code": None}}
                return
            if not out.text and out.finish_reason is None and not out.logprobs:
                continue
            if out.finish_reason is not None:
                completion_tokens += out.completion_tokens
            delta = {"content": out.text} if out.text else {}
            lp = self.chat_logprobs(out.logprobs or []) if req.logprobs else None
            yield base | {"choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}]} | extra
        if include_usage:
            yield base | {"choices": [], "usage": self.usage(len(prompt), completion_tokens)}
