"""`LoraplexClient`: the blocking client, one `httpx.Client` sending the requests `_protocol` builds.

The method set mirrors the `openai` package's resources (models, completions, chat, files,
fine-tuning jobs) plus the loraplex adapter routes; see API.md for the contract.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import EventSource
from tenacity import Retrying

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


class LoraplexClient:
    """Blocking client for a loraplex server; use as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 2,
    ) -> None:
        """`max_retries`: how often a request is sent again after a refused connection, a 429 or 503 with
        `Retry-After`, or a 502 / 503 / 504 (the `openai` package's default: 2), backing off in between."""
        self._http = httpx.Client(
            base_url=base_url, headers=protocol.default_headers(api_key), timeout=timeout, transport=transport
        )
        self.max_retries = max_retries

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- I/O: the only part that differs from the async client ----------------------------

    def _request(self, request: Request, stream: bool = False) -> httpx.Response:
        """Send `request` (again, as `retry_policy` says); a 2xx response, else the mapped error. With `stream` the
        body is left unread: the caller closes the response."""
        for attempt in Retrying(**protocol.retry_policy(self.max_retries)):
            with attempt:
                with protocol.opened_uploads(request) as files:
                    try:
                        built = self._http.build_request(request.method, request.path, json=request.json,
                                                         params=request.params, data=request.form, files=files)
                        response = self._http.send(built, stream=stream)
                    except httpx.TransportError as e:
                        raise protocol.connection_error(e, self._http.base_url) from e
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
        return response

    def _send(self, request: Request) -> httpx.Response:
        return self._request(request)

    def _json(self, request: Request) -> Any:
        return (self._send(request)).json()

    @contextlib.contextmanager
    def _open_stream(self, request: Request) -> Iterator[httpx.Response]:
        """The response with its body not yet read; raises the mapped error on a non-2xx status."""
        response = self._request(request, stream=True)
        try:
            yield response
        except httpx.TransportError as e:
            raise protocol.connection_error(e, self._http.base_url) from e
        finally:
            response.close()

    def _stream(self, request: Request, model: type[M]) -> Iterator[M]:
        with self._open_stream(request) as response:
            for event in EventSource(response).iter_sse():
                try:
                    yield protocol.decode_event(event.data, model)
                except protocol.Done:
                    return

    # --- health and models ------------------------------------------------------------------

    def health(self) -> bool:
        """True when the server is ready (200), False while loading or draining (503)."""
        response = self._http.get("/health/ready")
        if response.status_code == 503:
            return False
        check_response(response)
        return True

    def models(self) -> ModelList:
        """The base model and every adapter, as `GET /v1/models` lists them."""
        return ModelList.model_validate(self._json(Request("GET", "/v1/models")))

    # --- generation -------------------------------------------------------------------------

    def completions(
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
        return Completion.model_validate(self._json(protocol.completion_request(model, prompt, options)))

    def stream_completions(
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
    ) -> Iterator[CompletionChunk]:
        """`completions` with `stream: true`: yields chunks until `data: [DONE]`.

        Pass `stream_options={"include_usage": True}` for a final chunk carrying usage.
        """
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
            logprobs=logprobs, adapters=adapters, **extra,
        )  # fmt: skip
        request = protocol.completion_request(model, prompt, options, stream=True)
        yield from self._stream(request, CompletionChunk)

    def chat(
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
        return ChatCompletion.model_validate(self._json(protocol.chat_request(model, messages, options)))

    def stream_chat(
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
    ) -> Iterator[ChatCompletionChunk]:
        """`chat` with `stream: true`: yields chunks (with a `delta`) until `data: [DONE]`."""
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
            logprobs=logprobs, top_logprobs=top_logprobs, adapters=adapters, **extra,
        )  # fmt: skip
        request = protocol.chat_request(model, messages, options, stream=True)
        yield from self._stream(request, ChatCompletionChunk)

    # --- adapters ---------------------------------------------------------------------------

    def upload_adapter(
        self,
        name: str,
        *,
        directory: str | Path | None = None,
        archive: str | Path | None = None,
        overwrite: bool = False,
    ) -> Adapter:
        """Register a PEFT adapter from a directory (its two files) or a `.zip`/`.tar.gz` archive."""
        request = protocol.adapter_upload_request(name, directory, archive, overwrite)
        return Adapter.model_validate(self._json(request))

    def list_adapters(self) -> list[Adapter]:
        return parse_list(self._json(Request("GET", "/v1/adapters")), Adapter)

    def get_adapter(self, name: str) -> Adapter:
        return Adapter.model_validate(self._json(Request("GET", f"/v1/adapters/{path_segment(name)}")))

    def delete_adapter(self, name: str) -> None:
        """Unregister an adapter; requests already running on it finish first."""
        self._send(Request("DELETE", f"/v1/adapters/{path_segment(name)}"))

    def download_adapter(self, name: str, dest: str | Path, extract: bool | None = None) -> Path:
        """Save the adapter's PEFT files to `dest`: as the adapter's folder, or as a `.tar.gz` when `dest` is named
        so (`extract` forces either; see `_protocol.download_target`). Returns the path written."""
        target, as_folder = protocol.download_target(name, dest, extract)
        request = Request("GET", f"/v1/adapters/{path_segment(name)}/download")
        with self._open_stream(request) as response:
            with (tempfile.TemporaryFile() if as_folder else protocol.open_download(target)) as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
                if as_folder:
                    file.seek(0)
                    protocol.extract_adapter(file, target)
        return target

    # --- files and fine-tuning jobs ---------------------------------------------------------

    def upload_file(self, path: str | Path, purpose: str = "fine-tune") -> FileObject:
        """Upload a JSONL training file; its `id` is what `create_job` takes."""
        return FileObject.model_validate(self._json(protocol.file_upload_request(path, purpose)))

    def delete_file(self, id: str) -> None:
        """Remove an uploaded file (one no unfinished job reads)."""
        self._send(Request("DELETE", f"/v1/files/{path_segment(id)}"))

    def create_job(
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
        return FineTuningJob.model_validate(self._json(request))

    def list_jobs(self) -> list[FineTuningJob]:
        return parse_list(self._json(Request("GET", "/v1/fine_tuning/jobs")), FineTuningJob)

    def get_job(self, id: str) -> FineTuningJob:
        return FineTuningJob.model_validate(self._json(Request("GET", f"/v1/fine_tuning/jobs/{path_segment(id)}")))

    def cancel_job(self, id: str) -> FineTuningJob:
        request = Request("POST", f"/v1/fine_tuning/jobs/{path_segment(id)}/cancel")
        return FineTuningJob.model_validate(self._json(request))

    def job_events(self, id: str) -> list[JobEvent]:
        """The job's log so far: step, loss and learning rate in each event's `data`."""
        return parse_list(self._json(Request("GET", f"/v1/fine_tuning/jobs/{path_segment(id)}/events")), JobEvent)

    def stream_job_events(self, id: str) -> Iterator[JobEvent]:
        """The job's events as the server sends them (SSE), until the stream ends."""
        request = Request("GET", f"/v1/fine_tuning/jobs/{path_segment(id)}/events", params={"stream": "true"})
        yield from self._stream(request, JobEvent)

    def wait_job(
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
            job = self.get_job(id)
            if on_update is not None:
                on_update(job)
            if job.status in protocol.TERMINAL_JOB_STATUSES:
                return job
            time.sleep(protocol.poll_delay(id, job.status, deadline, poll_interval))
