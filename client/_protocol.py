"""The sans-I/O core both clients share: request building, response decoding, SSE events, retries.

`_sync.LoraplexClient` and `_async.AsyncLoraplexClient` only send the `Request`s built here and
feed the answers back; nothing about the wire format is written twice. The split follows the
"sans-I/O" pattern of h11 and httpcore. Server-sent events are parsed by `httpx-sse`; retries (as the
`openai` package's: 429/502/503/504 and refused connections, exponential backoff with jitter, the server's
`Retry-After` honoured) are `tenacity` policies.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt

from .errors import APIConnectionError, APIStatusError, APITimeoutError, error_from_event, error_from_response

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
    adapter_name: str | None,
    method: dict[str, Any] | None,
    validation_file: str | None,
    seed: int | None,
    *,
    suffix: str | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> Request:
    """`POST /v1/fine_tuning/jobs`; the server fills in the default method when none is given."""
    options = {"adapter_name": adapter_name, "suffix": suffix, "model": model, "method": method,
               "validation_file": validation_file, "seed": seed, "overwrite": overwrite or None}  # fmt: skip
    body = {"training_file": training_file}
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


class Done(Exception):
    """`data: [DONE]`: the stream is over."""


def decode_event(data: str, model: type[M]) -> M:
    """One SSE event's `data` as `model`; `Done` at `[DONE]`, the mapped `LoraplexError` for an
    `{"error": {...}}` payload (an error after the stream started)."""
    if data == "[DONE]":
        raise Done
    payload = json.loads(data)
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        raise error_from_event(payload)
    return model.model_validate(payload)


# --- retries -------------------------------------------------------------------------------

RETRIED_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER = 60.0  # a longer hint is not waited for: the error goes to the caller (as the openai package does)


def retryable(error: BaseException) -> bool:
    """Whether sending again may succeed: nothing was done (a refused connection), or the server said to come back
    (429 / 503 with Retry-After, 502 / 503 / 504 from a proxy or a loading server)."""
    if isinstance(error, APIConnectionError):
        return not isinstance(error, APITimeoutError)  # a request that timed out may have been acted on
    if isinstance(error, APIStatusError) and error.status_code in RETRIED_STATUSES:
        if error.retry_after is not None:
            return error.retry_after <= MAX_RETRY_AFTER
        return error.status_code != 429  # 429 without a hint: a request that can never fit
    return False


def retry_wait(state: RetryCallState) -> float:
    """The server's Retry-After when it sent one, else 0.5 s doubling to 8 s, less up to a quarter of jitter."""
    error = state.outcome.exception() if state.outcome else None
    hint = getattr(error, "retry_after", None)
    if hint is not None:
        return hint
    return min(0.5 * 2 ** (state.attempt_number - 1), 8.0) * (1 - 0.25 * random.random())


def retry_policy(max_retries: int) -> dict[str, Any]:
    """tenacity's arguments for `max_retries` retries of one request (the last error is raised as it is)."""
    return dict(stop=stop_after_attempt(max_retries + 1), wait=retry_wait, retry=retry_if_exception(retryable),
                reraise=True)  # fmt: skip


def connection_error(error: httpx.TransportError, base_url: httpx.URL) -> APIConnectionError:
    """A transport failure as the error type callers catch, naming the server's address."""
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return APITimeoutError(f"the server at {base_url} did not answer in time ({error.__class__.__name__})",
                               url=str(base_url))  # fmt: skip
    reason = str(error) or error.__class__.__name__
    return APIConnectionError(f"cannot reach the server at {base_url} ({reason})", url=str(base_url))


# --- downloads -----------------------------------------------------------------------------

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def download_target(name: str, dest: str | Path, extract: bool | None = None) -> tuple[Path, bool]:
    """Where `download_adapter` writes, and whether as the PEFT folder (True) or a `.tar.gz` (False).

    `extract` None decides by `dest`: a name ending in `.tar.gz` / `.tgz` is the archive; anything else is a
    folder, `dest` itself when it does not exist yet, `<dest>/<name>` inside an existing directory (as `cp -r`).
    """
    dest = Path(dest)
    as_folder = not dest.name.endswith(ARCHIVE_SUFFIXES) if extract is None else extract
    if as_folder:
        return (dest / name if dest.is_dir() else dest), True
    return (dest / f"{name}.tar.gz" if dest.is_dir() else dest), False


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


def extract_adapter(archive: BinaryIO, target: Path) -> None:
    """Write the two PEFT files of a downloaded `.tar.gz` into the folder `target` (created; nothing else of the
    archive is written, whatever its member names say)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        with tarfile.open(fileobj=archive, mode="r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in ADAPTER_FILES and (source := tar.extractfile(member)) is not None:
                    with source, (tmp / name).open("wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
        missing = [f for f in ADAPTER_FILES if not (tmp / f).is_file()]
        if missing:
            raise ValueError(f"the downloaded archive lacks {', '.join(missing)}")
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def poll_delay(job_id: str, status: str, deadline: float | None, poll_interval: float) -> float:
    """Seconds to sleep before polling a job again; `TimeoutError` once `deadline` has passed."""
    if deadline is None:
        return poll_interval
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"job {job_id} is still {status} at the wait_job timeout")
    return min(poll_interval, remaining)
