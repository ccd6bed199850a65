"""`AsyncLoraplexClient`: the asyncio twin of `LoraplexClient`, on one `httpx.AsyncClient`.

Same methods, same names, same `_protocol` requests; only the I/O is awaited. See API.md for
the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from . import _protocol as protocol
from ._protocol import M, Request, SSEDecoder, check_response, parse_list, path_segment
from .errors import error_from_response
from .types import (
    Adapter,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    FileObject,
    FineTuningJob,
    JobEvent,
    ModelList,
)


class AsyncLoraplexClient:
    """Asyncio client for a loraplex server; use with `async with` or call `aclose()`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=protocol.default_headers(api_key), timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- I/O: the only part that differs from the sync client ----------------------------

    async def _send(self, request: Request) -> httpx.Response:
        with protocol.opened_uploads(request) as files:
            response = await self._http.request(
                request.method, request.path, json=request.json, params=request.params, data=request.form, files=files
            )
        return check_response(response)

    async def _json(self, request: Request) -> Any:
        return (await self._send(request)).json()

    @contextlib.asynccontextmanager
    async def _open_stream(self, request: Request) -> AsyncIterator[httpx.Response]:
        """The response with its body not yet read; raises the mapped error on a non-2xx status."""
        async with self._http.stream(
            request.method, request.path, json=request.json, params=request.params
        ) as response:
            if not response.is_success:
                await response.aread()
                raise error_from_response(response)
            yield response

    async def _stream(self, request: Request, model: type[M]) -> AsyncIterator[M]:
        async with self._open_stream(request) as response:
            decoder = SSEDecoder(model)
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
                if decoder.done:
                    return
            event = decoder.close()
            if event is not None:
                yield event

    # --- health and models ------------------------------------------------------------------

    async def health(self) -> bool:
        """True when the server is ready (200), False while loading or draining (503)."""
        response = await self._http.get("/health/ready")
        if response.status_code == 503:
            return False
        check_response(response)
        return True

    async def models(self) -> ModelList:
        """The base model and every adapter, as `GET /v1/models` lists them."""
        return ModelList.model_validate(await self._json(Request("GET", "/v1/models")))

    # --- generation -------------------------------------------------------------------------

    async def completions(
        self,
        model: str,
        prompt: str | list[str],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        logprobs: int | None = None,
        adapters: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> Completion:
        """`POST /v1/completions`; `model` is the base id or an adapter name.

        `adapters=[{"name": ..., "weight": ...}]` composes several adapters for this request;
        `extra` goes into the body as is (e.g. `ignore_eos`, `min_tokens`).
        """
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
            logprobs=logprobs, adapters=adapters, **extra,
        )  # fmt: skip
        return Completion.model_validate(await self._json(protocol.completion_request(model, prompt, options)))

    async def stream_completions(
        self,
        model: str,
        prompt: str | list[str],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        logprobs: int | None = None,
        adapters: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> AsyncIterator[CompletionChunk]:
        """`completions` with `stream: true`: yields chunks until `data: [DONE]`.

        Pass `stream_options={"include_usage": True}` for a final chunk carrying usage.
        """
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
            logprobs=logprobs, adapters=adapters, **extra,
        )  # fmt: skip
        request = protocol.completion_request(model, prompt, options, stream=True)
        async for event in self._stream(request, CompletionChunk):
            yield event

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        adapters: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> ChatCompletion:
        """`POST /v1/chat/completions`; messages are `{"role", "content"}` dicts."""
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
            logprobs=logprobs, top_logprobs=top_logprobs, adapters=adapters, **extra,
        )  # fmt: skip
        return ChatCompletion.model_validate(await self._json(protocol.chat_request(model, messages, options)))

    async def stream_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        adapters: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> AsyncIterator[ChatCompletionChunk]:
        """`chat` with `stream: true`: yields chunks (with a `delta`) until `data: [DONE]`."""
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
            logprobs=logprobs, top_logprobs=top_logprobs, adapters=adapters, **extra,
        )  # fmt: skip
        request = protocol.chat_request(model, messages, options, stream=True)
        async for event in self._stream(request, ChatCompletionChunk):
            yield event

    # --- adapters ---------------------------------------------------------------------------

    async def upload_adapter(
        self,
        name: str,
        *,
        directory: str | Path | None = None,
        archive: str | Path | None = None,
        overwrite: bool = False,
    ) -> Adapter:
        """Register a PEFT adapter from a directory (its two files) or a `.zip`/`.tar.gz` archive."""
        request = protocol.adapter_upload_request(name, directory, archive, overwrite)
        return Adapter.model_validate(await self._json(request))

    async def list_adapters(self) -> list[Adapter]:
        return parse_list(await self._json(Request("GET", "/v1/adapters")), Adapter)

    async def get_adapter(self, name: str) -> Adapter:
        return Adapter.model_validate(await self._json(Request("GET", f"/v1/adapters/{path_segment(name)}")))

    async def delete_adapter(self, name: str) -> None:
        """Unregister an adapter; requests already running on it finish first."""
        await self._send(Request("DELETE", f"/v1/adapters/{path_segment(name)}"))

    async def download_adapter(self, name: str, dest: str | Path) -> Path:
        """Save the adapter's PEFT files as `.tar.gz` to `dest` (or into it, if a directory)."""
        target = protocol.download_target(name, dest)
        request = Request("GET", f"/v1/adapters/{path_segment(name)}/download")
        async with self._open_stream(request) as response:
            with protocol.open_download(target) as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)
        return target

    # --- files and fine-tuning jobs ---------------------------------------------------------

    async def upload_file(self, path: str | Path, purpose: str = "fine-tune") -> FileObject:
        """Upload a JSONL training file; its `id` is what `create_job` takes."""
        return FileObject.model_validate(await self._json(protocol.file_upload_request(path, purpose)))

    async def create_job(
        self,
        training_file: str,
        adapter_name: str,
        method: dict[str, Any] | None = None,
        validation_file: str | None = None,
        seed: int | None = None,
    ) -> FineTuningJob:
        """Start training `adapter_name`; `method` is `{"type": "lora", "hyperparameters": {...}}`."""
        request = protocol.job_request(training_file, adapter_name, method, validation_file, seed)
        return FineTuningJob.model_validate(await self._json(request))

    async def list_jobs(self) -> list[FineTuningJob]:
        return parse_list(await self._json(Request("GET", "/v1/fine_tuning/jobs")), FineTuningJob)

    async def get_job(self, id: str) -> FineTuningJob:
        return FineTuningJob.model_validate(
            await self._json(Request("GET", f"/v1/fine_tuning/jobs/{path_segment(id)}"))
        )

    async def cancel_job(self, id: str) -> FineTuningJob:
        request = Request("POST", f"/v1/fine_tuning/jobs/{path_segment(id)}/cancel")
        return FineTuningJob.model_validate(await self._json(request))

    async def job_events(self, id: str) -> list[JobEvent]:
        """The job's log so far: step, loss and learning rate in each event's `data`."""
        return parse_list(await self._json(Request("GET", f"/v1/fine_tuning/jobs/{path_segment(id)}/events")), JobEvent)

    async def stream_job_events(self, id: str) -> AsyncIterator[JobEvent]:
        """The job's events as the server sends them (SSE), until the stream ends."""
        request = Request("GET", f"/v1/fine_tuning/jobs/{path_segment(id)}/events", params={"stream": "true"})
        async for event in self._stream(request, JobEvent):
            yield event

    async def wait_job(
        self,
        id: str,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[FineTuningJob], None] | None = None,
    ) -> FineTuningJob:
        """Poll until the job succeeds, fails or is cancelled; `TimeoutError` after `timeout` s.

        `on_update(job)` sees every poll's job (its `metrics` carry step, total_steps and train_loss):
        a progress bar hooks in there.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_job(id)
            if on_update is not None:
                on_update(job)
            if job.status in protocol.TERMINAL_JOB_STATUSES:
                return job
            await asyncio.sleep(protocol.poll_delay(id, job.status, deadline, poll_interval))
