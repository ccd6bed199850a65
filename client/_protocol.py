"""The sans-I/O core both clients share: request building, response decoding, SSE parsing.

`_sync.LoraplexClient` and `_async.AsyncLoraplexClient` only send the `Request`s built here and
feed the answers back; nothing about the wire format is written twice. The split follows the
"sans-I/O" pattern of h11 and httpcore.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from .errors import error_from_event, error_from_response

M = TypeVar("M", bound=BaseModel)

# A job in one of these states never changes again.
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

# The two files of a PEFT adapter, sent under their own names as form fields.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

_CONTENT_TYPES = {".json": "application/json", ".jsonl": "application/jsonl", ".zip": "application/zip"}


@dataclass(frozen=True)
class Upload:
    """One file of a multipart body: its form field and local path (whose name is sent)."""

    field: str
    path: Path

    @property
    def content_type(self) -> str:
        if self.path.name.endswith((".tar.gz", ".tgz")):
            return "application/gzip"
        return _CONTENT_TYPES.get(self.path.suffix, "application/octet-stream")


@dataclass(frozen=True)
class Request:
    """Everything needed to send one HTTP request; `uploads` makes it multipart with `form`."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    form: dict[str, str] | None = None
    uploads: tuple[Upload, ...] = ()


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "loraplex-client"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def path_segment(value: str) -> str:
    """`value` quoted so it stays one segment of the URL path."""
    return quote(value, safe="")


# --- generation --------------------------------------------------------------------------


def generation_request(path: str, body: dict[str, Any], options: dict[str, Any], *, stream: bool) -> Request:
    """A completions or chat request: `body` plus every option that is not None.

    `options` are the named parameters and the caller's `**extra` (vLLM extensions such as
    `ignore_eos`, or `stream_options`); `stream` is set by choosing the streaming method.
    """
    if "stream" in options:
        raise TypeError("pass no 'stream' argument; call the stream_* method to stream")
    body = {**body, **{key: value for key, value in options.items() if value is not None}}
    if stream:
        body["stream"] = True
    return Request("POST", path, json=body)


def completion_request(
    model: str, prompt: str | list[str], options: dict[str, Any], *, stream: bool = False
) -> Request:
    return generation_request("/v1/completions", {"model": model, "prompt": prompt}, options, stream=stream)


def chat_request(
    model: str, messages: list[dict[str, Any]], options: dict[str, Any], *, stream: bool = False
) -> Request:
    return generation_request("/v1/chat/completions", {"model": model, "messages": messages}, options, stream=stream)


# --- adapters, files, jobs -----------------------------------------------------------------


def adapter_upload_request(
    name: str, directory: str | Path | None, archive: str | Path | None, overwrite: bool
) -> Request:
    """`POST /v1/adapters`: the two PEFT files of `directory`, or the one `archive` file."""
    if directory is not None and archive is None:
        uploads = tuple(Upload(filename, Path(directory) / filename) for filename in ADAPTER_FILES)
    elif archive is not None and directory is None:
        uploads = (Upload("archive", Path(archive)),)
    else:
        raise ValueError("pass exactly one of directory= or archive=")
    missing = [str(upload.path) for upload in uploads if not upload.path.is_file()]
    if missing:
        raise FileNotFoundError(f"adapter file(s) not found: {', '.join(missing)}")
    params = {"overwrite": "true"} if overwrite else None
    return Request("POST", "/v1/adapters", params=params, form={"name": name}, uploads=uploads)


def file_upload_request(path: str | Path, purpose: str) -> Request:
    """`POST /v1/files`: one training or validation JSONL file."""
    upload = Upload("file", Path(path))
    if not upload.path.is_file():
        raise FileNotFoundError(f"file not found: {upload.path}")
    return Request("POST", "/v1/files", form={"purpose": purpose}, uploads=(upload,))


def job_request(
    training_file: str,
    adapter_name: str,
    method: dict[str, Any] | None,
    validation_file: str | None,
    seed: int | None,
) -> Request:
    """`POST /v1/fine_tuning/jobs`; the server fills in the default method when none is given."""
    options = {"method": method, "validation_file": validation_file, "seed": seed}
    body = {"training_file": training_file, "adapter_name": adapter_name}
    body.update({key: value for key, value in options.items() if value is not None})
    return Request("POST", "/v1/fine_tuning/jobs", json=body)


@contextlib.contextmanager
def opened_uploads(request: Request) -> Iterator[list[tuple[str, tuple[str, Any, str]]] | None]:
    """The `files=` argument for httpx, with each file open for exactly as long as the send."""
    if not request.uploads:
        yield None
        return
    with contextlib.ExitStack() as stack:
        yield [
            (upload.field, (upload.path.name, stack.enter_context(upload.path.open("rb")), upload.content_type))
            for upload in request.uploads
        ]


# --- responses -----------------------------------------------------------------------------


def check_response(response: httpx.Response) -> httpx.Response:
    """`response` itself if it is 2xx; otherwise raise the mapped `LoraplexError`."""
    if not response.is_success:
        raise error_from_response(response)
    return response


def parse_list(body: Any, model: type[M]) -> list[M]:
    """Items of `{"object": "list", "data": [...]}`; a bare JSON list is accepted too."""
    items = body["data"] if isinstance(body, dict) else body
    return [model.model_validate(item) for item in items]


class SSEDecoder(Generic[M]):
    """Turns the lines of a `text/event-stream` body into `model` objects, one per event.

    Follows the WHATWG event-stream rules the server needs: `data:` lines (joined by newlines),
    a blank line ends an event, `:` lines are comments, other fields are ignored. `done` turns
    True at `data: [DONE]`; an `{"error": {...}}` payload raises `LoraplexError`.
    """

    def __init__(self, model: type[M]) -> None:
        self._model = model
        self._data: list[str] = []
        self.done = False

    def feed(self, line: str) -> M | None:
        """The event this line completes, if any."""
        if not line:
            return self._dispatch()
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def close(self) -> M | None:
        """The event left unterminated when the body ended, if any."""
        return self._dispatch()

    def _dispatch(self) -> M | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        if data == "[DONE]":
            self.done = True
            return None
        payload = json.loads(data)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            raise error_from_event(payload)
        return self._model.model_validate(payload)


def download_target(name: str, dest: str | Path) -> Path:
    """Where `download_adapter` writes: `dest` itself, or `<dest>/<name>.tar.gz` for a directory."""
    dest = Path(dest)
    return dest / f"{name}.tar.gz" if dest.is_dir() else dest


@contextlib.contextmanager
def open_download(target: Path) -> Iterator[BinaryIO]:
    """A file to write a download into; it becomes `target` only if the download completes."""
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as file:
            yield file
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


def poll_delay(job_id: str, status: str, deadline: float | None, poll_interval: float) -> float:
    """Seconds to sleep before polling a job again; `TimeoutError` once `deadline` has passed."""
    if deadline is None:
        return poll_interval
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"job {job_id} is still {status} at the wait_job timeout")
    return min(poll_interval, remaining)
