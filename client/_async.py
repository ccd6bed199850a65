"""`AsyncLoraplexClient`: the asyncio twin of `LoraplexClient`, on one `httpx.AsyncClient`.

Same methods, same names, same `_protocol` requests; only the I/O is awaited. See API.md for
the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import EventSource
from tenacity import AsyncRetrying

from . import _protocol as protocol
from ._protocol import M, Request, check_response, parse_list, path_segment
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
        max_retries: int = 2,
    ) -> None:
        """`max_retries`: how often a request is sent again after a refused connection, a 429 or 503 with
        `Retry-After`, or a 502 / 503 / 504 (the `openai` package's default: 2), backing off in between."""
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=protocol.default_headers(api_key), timeout=timeout, transport=transport
        )
        self.max_retries = max_retries

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- I/O: the only part that differs from the sync client ----------------------------

    async def _request(self, request: Request, stream: bool = False) -> httpx.Response:
        """Send `request` (again, as `retry_policy` says); a 2xx response, else the mapped error. With `stream` the
        body is left unread: the caller closes the response."""
        async for attempt in AsyncRetrying(**protocol.retry_policy(self.max_retries)):
            with attempt:
                with protocol.opened_uploads(request) as files:
                    try:
                        built = self._http.build_request(request.method, request.path, json=request.json,
                                                         params=request.params, data=request.form, files=files)
                        response = await self._http.send(built, stream=stream)
                    except httpx.TransportError as e:
                        raise protocol.connection_error(e, self._http.base_url) from e
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
        return response

    async def _send(self, request: Request) -> httpx.Response:
        return await self._request(request)

    async def _json(self, request: Request) -> Any:
        return (await self._send(request)).json()

    @contextlib.asynccontextmanager
    async def _open_stream(self, request: Request) -> AsyncIterator[httpx.Response]:
        """The response with its body not yet read; raises the mapped error on a non-2xx status."""
        response = await self._request(request, stream=True)
        try:
            yield response
        except httpx.TransportError as e:
            raise protocol.connection_error(e, self._http.base_url) from e
        finally:
            await response.aclose()

    async def _stream(self, request: Request, model: type[M]) -> AsyncIterator[M]:
        async with self._open_stream(request) as response:
            async for event in EventSource(response).aiter_sse():
                try:
                    yield protocol.decode_event(event.data, model)
                except protocol.Done:
                    return

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

    async def download_adapter(self, name: str, dest: str | Path, extract: bool | None = None) -> Path:
        """Save the adapter's PEFT files to `dest`: as the adapter's folder, or as a `.tar.gz` when `dest` is named
        so (`extract` forces either; see `_protocol.download_target`). Returns the path written."""
        target, as_folder = protocol.download_target(name, dest, extract)
        request = Request("GET", f"/v1/adapters/{path_segment(name)}/download")
        async with self._open_stream(request) as response:
            with (tempfile.TemporaryFile() if as_folder else protocol.open_download(target)) as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)
                if as_folder:
                    file.seek(0)
                    await asyncio.to_thread(protocol.extract_adapter, file, target)
        return target

    # --- files and fine-tuning jobs ---------------------------------------------------------

    async def upload_file(self, path: str | Path, purpose: str = "fine-tune") -> FileObject:
        """Upload a JSONL training file; its `id` is what `create_job` takes."""
        return FileObject.model_validate(await self._json(protocol.file_upload_request(path, purpose)))

    async def delete_file(self, id: str) -> None:
        """Remove an uploaded file (one no unfinished job reads)."""
        await self._send(Request("DELETE", f"/v1/files/{path_segment(id)}"))

    async def create_job(
        self,
        training_file: str,
        adapter_name: str | None = None,
        method: dict[str, Any] | None = None,
        validation_file: str | None = None,
        seed: int | None = None,
        *,
        suffix: str | None = None,
        model: str | None = None,
        overwrite: bool = False,
    ) -> FineTuningJob:
        """Start training `adapter_name` (or OpenAI's `suffix`; neither: the server names it); `method` is
        `{"type": "lora", "hyperparameters": {...}}`; `overwrite` replaces an adapter of that name on success."""
        request = protocol.job_request(training_file, adapter_name, method, validation_file, seed, suffix=suffix,
                                       model=model, overwrite=overwrite)  # fmt: skip
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
