"""Unit tests of `client/` against an in-process fake of the server (httpx.MockTransport).

The fake answers with the shapes API.md fixes; no server, no model, no network. Streaming
against a real uvicorn server is the integration tests' job.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import (
    APIError,
    AsyncLoraplexClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletionChunk,
    CompletionChunk,
    ConflictError,
    InternalServerError,
    LoraplexClient,
    LoraplexError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)

Handler = Callable[[httpx.Request], httpx.Response]
REPO_ROOT = Path(__file__).resolve().parents[2]

ADAPTER = {
    "id": "french",
    "object": "adapter",
    "parent": "SmolLM2-135M-Instruct",
    "rank": 8,
    "alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "size_bytes": 1234,
    "sha256": "ab" * 32,
    "version": 1,
    "created_at": 1700000000,
}
COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "french",
    "choices": [{"text": " bonjour", "index": 0, "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    "system_fingerprint": "new-server-field",
}
CHAT_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "french",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Salut"}, "finish_reason": "stop", "logprobs": None}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


def job(status: str) -> dict[str, Any]:
    return {
        "id": "ftjob-1",
        "object": "fine_tuning.job",
        "status": status,
        "adapter_name": "french",
        "created_at": 1700000000,
        "started_at": None,
        "finished_at": None,
        "trained_tokens": None,
        "error": None,
        "metrics": None,
    }


def error_response(status: int, message: str = "nope", code: str | None = None, **headers: str) -> httpx.Response:
    envelope = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return httpx.Response(status, json=envelope, headers=headers)


def sse_body(*payloads: dict[str, Any] | str) -> bytes:
    """An event-stream body: one `data:` event per payload (a str is sent verbatim)."""
    events = [p if isinstance(p, str) else json.dumps(p) for p in payloads]
    return "".join(f"data: {event}\n\n" for event in events).encode()


def sse_response(body: bytes, piece: int | None = None) -> httpx.Response:
    """`body` as a streamed response; `piece` cuts it into chunks that split lines and events."""
    headers = {"content-type": "text/event-stream"}
    if piece is None:
        return httpx.Response(200, content=body, headers=headers)
    return httpx.Response(200, content=iter([body[i : i + piece] for i in range(0, len(body), piece)]), headers=headers)


def completion_chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "french", "choices": [choice]}


def chat_chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "french", "choices": [choice]}


def parse_multipart(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """The form of a multipart request: field name -> (file name or None, content)."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + request.content)
    form = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        form[name] = (part.get_filename(), part.get_payload(decode=True))
    return form


class Recorder:
    """A MockTransport handler that records each request and answers with `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handler(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def last_json(self) -> dict[str, Any]:
        return json.loads(self.last.content)


Serve = Callable[..., tuple[LoraplexClient, Recorder]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """`serve(handler, api_key=None)` -> a sync client talking to `handler`, and its recorder."""
    clients = []

    def make(handler: Handler, api_key: str | None = None) -> tuple[LoraplexClient, Recorder]:
        recorder = Recorder(handler)
        client = LoraplexClient("http://loraplex.test", api_key=api_key, transport=httpx.MockTransport(recorder),
                                max_retries=0)
        clients.append(client)
        return client, recorder

    yield make
    for client in clients:
        client.close()


def make_async(handler: Handler) -> tuple[AsyncLoraplexClient, Recorder]:
    recorder = Recorder(handler)
    return AsyncLoraplexClient("http://loraplex.test", transport=httpx.MockTransport(recorder), max_retries=0), recorder


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "french"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(b"\x00safetensors-bytes")
    return directory


# --- dependencies and construction ---------------------------------------------------------


def test_client_imports_no_server_or_torch() -> None:
    code = (
        "import sys, client; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'server', 'adapters'}); "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


def test_bearer_header_only_with_api_key(serve: Serve) -> None:
    client, recorder = serve(lambda r: httpx.Response(200, json={"object": "list", "data": []}), api_key="sk-1")
    client.models()
    assert recorder.last.headers["authorization"] == "Bearer sk-1"
    client, recorder = serve(lambda r: httpx.Response(200, json={"object": "list", "data": []}))
    client.models()
    assert "authorization" not in recorder.last.headers


def test_context_manager_closes() -> None:
    with LoraplexClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
        assert client.health() is True
    assert client._http.is_closed


# --- health and models ---------------------------------------------------------------------


def test_health_true_on_200_false_on_503(serve: Serve) -> None:
    client, recorder = serve(lambda r: httpx.Response(200, json={"status": "ready"}))
    assert client.health() is True
    assert recorder.last.url.path == "/health/ready"
    client, _ = serve(lambda r: error_response(503, "draining", **{"Retry-After": "1"}))
    assert client.health() is False


def test_models_parses_base_and_adapters(serve: Serve) -> None:
    body = {
        "object": "list",
        "data": [
            {"id": "SmolLM2-135M-Instruct", "object": "model", "created": 1, "owned_by": "loraplex"},
            {
                "id": "french",
                "object": "model",
                "created": 2,
                "owned_by": "loraplex",
                "parent": "SmolLM2-135M-Instruct",
            },
        ],
    }
    client, recorder = serve(lambda r: httpx.Response(200, json=body))
    models = client.models()
    assert recorder.last.method == "GET" and recorder.last.url.path == "/v1/models"
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct", "french"]
    assert models.data[1].parent == "SmolLM2-135M-Instruct"


# --- generation bodies ---------------------------------------------------------------------


def test_completions_body_omits_none_and_passes_adapters_and_extra(serve: Serve) -> None:
    client, recorder = serve(lambda r: httpx.Response(200, json=COMPLETION))
    adapters = [{"name": "french", "weight": 0.7}, {"name": "formal", "weight": 0.3}]
    completion = client.completions(
        "SmolLM2-135M-Instruct", "Hello", max_tokens=4, temperature=0, adapters=adapters, ignore_eos=True, top_k=None
    )
    assert recorder.last.method == "POST" and recorder.last.url.path == "/v1/completions"
    assert recorder.last_json() == {
        "model": "SmolLM2-135M-Instruct",
        "prompt": "Hello",
        "max_tokens": 4,
        "temperature": 0,
        "adapters": adapters,
        "ignore_eos": True,
    }
    assert completion.choices[0].text == " bonjour"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.total_tokens == 3
    assert completion.system_fingerprint == "new-server-field"  # unknown fields are kept


def test_completions_minimal_body_and_prompt_list(serve: Serve) -> None:
    client, recorder = serve(lambda r: httpx.Response(200, json=COMPLETION))
    client.completions("french", ["a", "b"])
    assert recorder.last_json() == {"model": "french", "prompt": ["a", "b"]}


def test_completions_logprobs_parsed(serve: Serve) -> None:
    logprobs = {"tokens": [" bon"], "token_logprobs": [-0.1], "top_logprobs": [{" bon": -0.1}], "text_offset": [0]}
    body = {**COMPLETION, "choices": [{**COMPLETION["choices"][0], "logprobs": logprobs}]}
    client, recorder = serve(lambda r: httpx.Response(200, json=body))
    completion = client.completions("french", "Hi", logprobs=1)
    assert recorder.last_json()["logprobs"] == 1
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.token_logprobs == [-0.1]


def test_chat_body_and_response(serve: Serve) -> None:
    client, recorder = serve(lambda r: httpx.Response(200, json=CHAT_COMPLETION))
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat("french", messages, max_tokens=8, seed=3, stop=["\n"], logprobs=None, min_tokens=2)
    assert recorder.last.url.path == "/v1/chat/completions"
    assert recorder.last_json() == {
        "model": "french",
        "messages": messages,
        "max_tokens": 8,
        "seed": 3,
        "stop": ["\n"],
        "min_tokens": 2,
    }
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "Salut"
    assert chat.choices[0].finish_reason == "stop"


def test_stream_argument_is_rejected(serve: Serve) -> None:
    client, _ = serve(lambda r: httpx.Response(200, json=COMPLETION))
    with pytest.raises(TypeError, match="stream"):
        client.completions("french", "Hi", stream=True)


# --- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [None, 1, 7])
def test_stream_completions_parses_sse_until_done(serve: Serve, piece: int | None) -> None:
    usage_chunk = {**completion_chunk(""), "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    body = (
        b": keep-alive comment\n\n"
        + sse_body(completion_chunk(" bon"), completion_chunk("jour", "length"), usage_chunk, "[DONE]")
        + b"data: this is not json and must never be read\n\n"
    )
    client, recorder = serve(lambda r: sse_response(body, piece))
    chunks = list(client.stream_completions("french", "Hi", max_tokens=2, stream_options={"include_usage": True}))
    assert recorder.last_json() == {
        "model": "french",
        "prompt": "Hi",
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
        "stream": True,
    }
    assert all(isinstance(chunk, CompletionChunk) for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " bonjour"
    assert chunks[1].choices[0].finish_reason == "length"
    assert chunks[2].choices == [] and chunks[2].usage is not None and chunks[2].usage.completion_tokens == 2


def test_stream_chat_yields_deltas(serve: Serve) -> None:
    body = sse_body(
        chat_chunk({"role": "assistant"}),
        chat_chunk({"content": "Sa"}),
        chat_chunk({"content": "lut"}),
        chat_chunk({}, "stop"),
        "[DONE]",
    )
    client, recorder = serve(lambda r: sse_response(body))
    chunks = list(client.stream_chat("french", [{"role": "user", "content": "Hi"}], temperature=0.5))
    assert recorder.last_json()["stream"] is True and recorder.last_json()["temperature"] == 0.5
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Salut"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_multiline_data_and_unterminated_last_event(serve: Serve) -> None:
    chunk = json.dumps(completion_chunk("x"), indent=1)  # a JSON object over several data: lines
    event = "".join(f"data: {line}\n" for line in chunk.splitlines()).encode()
    client, _ = serve(lambda r: sse_response(event + b"\n" + event))  # the second has no closing blank line
    # WHATWG event-stream rules (httpx-sse): an event the body ends inside of is discarded, never half-read
    assert [c.choices[0].text for c in client.stream_completions("french", "Hi")] == ["x"]


def test_mid_stream_error_raises_from_iterator(serve: Serve) -> None:
    error = {"error": {"message": "engine failed", "type": "server_error", "param": None, "code": "engine_error"}}
    body = sse_body(completion_chunk("a"), error, "[DONE]")
    client, _ = serve(lambda r: sse_response(body))
    stream = client.stream_completions("french", "Hi")
    assert next(stream).choices[0].text == "a"
    with pytest.raises(LoraplexError) as info:
        next(stream)
    assert type(info.value) is LoraplexError
    assert info.value.status_code is None
    assert (info.value.message, info.value.type, info.value.code) == ("engine failed", "server_error", "engine_error")


def test_stream_error_status_raises_mapped_error(serve: Serve) -> None:
    client, _ = serve(lambda r: error_response(404, "model 'nope' not found", code="model_not_found"))
    with pytest.raises(NotFoundError) as info:
        list(client.stream_chat("nope", [{"role": "user", "content": "Hi"}]))
    assert info.value.code == "model_not_found" and info.value.status_code == 404


# --- error mapping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (503, ServiceUnavailableError),
        (500, InternalServerError),
        (502, InternalServerError),
        (418, APIError),
    ],
)
def test_status_maps_to_exception(serve: Serve, status: int, exception: type[LoraplexError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        envelope = {"error": {"message": "bad thing", "type": "some_type", "param": "prompt", "code": "some_code"}}
        return httpx.Response(status, json=envelope)

    client, _ = serve(handler)
    with pytest.raises(exception) as info:
        client.completions("french", "Hi")
    error = info.value
    assert type(error) is exception and isinstance(error, LoraplexError)
    assert (error.status_code, error.message, error.type, error.param, error.code) == (
        status,
        "bad thing",
        "some_type",
        "prompt",
        "some_code",
    )
    assert "bad thing" in str(error)


def test_503_carries_retry_after_seconds(serve: Serve) -> None:
    client, _ = serve(lambda r: error_response(503, "overloaded", **{"Retry-After": "7"}))
    with pytest.raises(ServiceUnavailableError) as info:
        client.models()
    assert info.value.retry_after == 7.0


def test_503_retry_after_http_date_and_missing(serve: Serve) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    client, _ = serve(lambda r: error_response(503, "draining", **{"Retry-After": when}))
    with pytest.raises(ServiceUnavailableError) as info:
        client.models()
    assert info.value.retry_after is not None and 100 < info.value.retry_after <= 120
    client, _ = serve(lambda r: error_response(503, "draining"))
    with pytest.raises(ServiceUnavailableError) as info:
        client.models()
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        httpx.Response(500),
    ],
)
def test_non_envelope_body_is_api_error(serve: Serve, response: httpx.Response) -> None:
    client, _ = serve(lambda r: response)
    with pytest.raises(APIError) as info:
        client.models()
    assert info.value.status_code == response.status_code
    assert info.value.message


# --- adapters ------------------------------------------------------------------------------


def test_upload_adapter_directory_multipart(serve: Serve, adapter_dir: Path) -> None:
    client, recorder = serve(lambda r: httpx.Response(201, json=ADAPTER))
    adapter = client.upload_adapter("french", directory=adapter_dir)
    request = recorder.last
    assert request.method == "POST" and request.url.path == "/v1/adapters"
    assert request.url.params.get("overwrite") is None
    form = parse_multipart(request)
    assert form["name"] == (None, b"french")
    assert form["adapter_config.json"] == ("adapter_config.json", b'{"r": 8}')
    assert form["adapter_model.safetensors"] == ("adapter_model.safetensors", b"\x00safetensors-bytes")
    assert (adapter.id, adapter.rank, adapter.alpha, adapter.version) == ("french", 8, 16.0, 1)
    assert adapter.target_modules == ["q_proj", "v_proj"]


def test_upload_adapter_archive_with_overwrite(serve: Serve, tmp_path: Path) -> None:
    archive = tmp_path / "french.tar.gz"
    archive.write_bytes(b"\x1f\x8barchive")
    client, recorder = serve(lambda r: httpx.Response(201, json=ADAPTER))
    client.upload_adapter("french", archive=archive, overwrite=True)
    assert recorder.last.url.params["overwrite"] == "true"
    form = parse_multipart(recorder.last)
    assert set(form) == {"name", "archive"}
    assert form["archive"] == ("french.tar.gz", b"\x1f\x8barchive")


def test_upload_adapter_checks_arguments_before_sending(serve: Serve, adapter_dir: Path, tmp_path: Path) -> None:
    client, recorder = serve(lambda r: httpx.Response(201, json=ADAPTER))
    with pytest.raises(ValueError, match="exactly one"):
        client.upload_adapter("french")
    with pytest.raises(ValueError, match="exactly one"):
        client.upload_adapter("french", directory=adapter_dir, archive=adapter_dir / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "adapter_config.json").write_text("{}")
        client.upload_adapter("french", directory=tmp_path / "half")
    assert recorder.requests == []


def test_upload_adapter_conflict(serve: Serve, adapter_dir: Path) -> None:
    client, _ = serve(lambda r: error_response(409, "adapter 'french' exists", code="adapter_exists"))
    with pytest.raises(ConflictError, match="exists"):
        client.upload_adapter("french", directory=adapter_dir)


def test_list_get_delete_adapter(serve: Serve) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/adapters":
            return httpx.Response(200, json={"object": "list", "data": [ADAPTER]})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=ADAPTER)

    client, recorder = serve(handler)
    assert [a.id for a in client.list_adapters()] == ["french"]
    assert client.get_adapter("french").sha256 == "ab" * 32
    assert recorder.last.url.path == "/v1/adapters/french"
    assert client.delete_adapter("french") is None
    assert (recorder.last.method, recorder.last.url.path) == ("DELETE", "/v1/adapters/french")


def test_download_adapter_writes_file(serve: Serve, tmp_path: Path) -> None:
    payload = b"\x1f\x8b" + bytes(range(256)) * 64
    client, recorder = serve(
        lambda r: httpx.Response(200, content=payload, headers={"content-type": "application/gzip"})
    )
    dest = tmp_path / "out.tar.gz"
    assert client.download_adapter("french", dest) == dest
    assert recorder.last.url.path == "/v1/adapters/french/download"
    assert dest.read_bytes() == payload
    assert client.download_adapter("french", tmp_path, extract=False) == tmp_path / "french.tar.gz"  # into a folder
    assert (tmp_path / "french.tar.gz").read_bytes() == payload


def test_download_adapter_writes_the_folder(serve: Serve, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [("french/adapter_config.json", b"{}"), ("french/adapter_model.safetensors", b"w"),
                           ("../../evil", b"x")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    client, _ = serve(lambda r: httpx.Response(200, content=buf.getvalue()))
    # a name that does not exist yet (trailing slash or not) is the folder itself; an existing folder gets <name>/
    assert client.download_adapter("french", tmp_path / "missing") == tmp_path / "missing"
    assert sorted(p.name for p in (tmp_path / "missing").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert client.download_adapter("french", str(tmp_path) + "/") == tmp_path / "french"
    assert (tmp_path / "french" / "adapter_model.safetensors").read_bytes() == b"w"
    assert not (tmp_path.parent / "evil").exists()
    with pytest.raises(FileExistsError):
        client.download_adapter("french", tmp_path)  # never writes over a folder with files in it


def test_download_adapter_error_leaves_no_file(serve: Serve, tmp_path: Path) -> None:
    client, _ = serve(lambda r: error_response(404, "adapter 'gone' not found"))
    with pytest.raises(NotFoundError):
        client.download_adapter("gone", tmp_path / "gone.tar.gz")
    assert list(tmp_path.iterdir()) == []


# --- files and fine-tuning jobs ------------------------------------------------------------


def test_upload_file_multipart(serve: Serve, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    answer = {"id": "file-1", "object": "file", "bytes": 35, "filename": "train.jsonl", "purpose": "fine-tune"}
    client, recorder = serve(lambda r: httpx.Response(200, json={**answer, "created_at": 1}))
    file = client.upload_file(data)
    assert recorder.last.url.path == "/v1/files"
    form = parse_multipart(recorder.last)
    assert form["purpose"] == (None, b"fine-tune")
    assert form["file"] == ("train.jsonl", data.read_bytes())
    assert (file.id, file.bytes) == ("file-1", 35)


def test_create_job_body(serve: Serve) -> None:
    client, recorder = serve(lambda r: httpx.Response(201, json=job("queued")))
    method = {"type": "lora", "hyperparameters": {"rank": 8, "n_epochs": 1}}
    created = client.create_job("file-1", "french", method=method, seed=0)
    assert recorder.last.url.path == "/v1/fine_tuning/jobs"
    assert recorder.last_json() == {"training_file": "file-1", "adapter_name": "french", "method": method, "seed": 0}
    assert created.status == "queued"
    client.create_job("file-1", "french")
    assert recorder.last_json() == {"training_file": "file-1", "adapter_name": "french"}


def test_list_get_cancel_job_and_events(serve: Serve) -> None:
    event = {"created_at": 1, "level": "info", "message": "step 1", "data": {"step": 1, "loss": 2.5, "lr": 1e-4}}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/fine_tuning/jobs":
            return httpx.Response(200, json={"object": "list", "data": [job("running")], "has_more": False})
        if path.endswith("/cancel"):
            return httpx.Response(200, json=job("cancelled"))
        if path.endswith("/events"):
            return httpx.Response(200, json={"object": "list", "data": [event]})
        return httpx.Response(200, json=job("running"))

    client, recorder = serve(handler)
    assert [j.id for j in client.list_jobs()] == ["ftjob-1"]
    assert client.get_job("ftjob-1").status == "running"
    assert client.cancel_job("ftjob-1").status == "cancelled"
    assert (recorder.last.method, recorder.last.url.path) == ("POST", "/v1/fine_tuning/jobs/ftjob-1/cancel")
    events = client.job_events("ftjob-1")
    assert events[0].data == {"step": 1, "loss": 2.5, "lr": 1e-4}


def test_stream_job_events(serve: Serve) -> None:
    events = [{"created_at": i, "level": "info", "message": f"step {i}", "data": {"step": i}} for i in range(3)]
    client, recorder = serve(lambda r: sse_response(sse_body(*events)))  # ends without [DONE]
    assert [e.data["step"] for e in client.stream_job_events("ftjob-1")] == [0, 1, 2]
    assert recorder.last.url.path == "/v1/fine_tuning/jobs/ftjob-1/events"
    assert recorder.last.url.params["stream"] == "true"


def test_wait_job_polls_until_terminal(serve: Serve) -> None:
    statuses = iter(["queued", "running", "running", "succeeded"])
    client, recorder = serve(lambda r: httpx.Response(200, json=job(next(statuses))))
    assert client.wait_job("ftjob-1", poll_interval=0).status == "succeeded"
    assert len(recorder.requests) == 4


def test_wait_job_timeout(serve: Serve) -> None:
    client, _ = serve(lambda r: httpx.Response(200, json=job("running")))
    with pytest.raises(TimeoutError, match="running"):
        client.wait_job("ftjob-1", poll_interval=0.01, timeout=0.05)


# --- async ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_stream_completions_and_chat() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            return sse_response(sse_body(completion_chunk("a"), completion_chunk("b", "stop"), "[DONE]"))
        return sse_response(sse_body(chat_chunk({"role": "assistant", "content": "c"}), "[DONE]"))

    client, recorder = make_async(handler)
    async with client:
        texts = [c.choices[0].text async for c in client.stream_completions("french", "Hi", adapters=[])]
        assert texts == ["a", "b"]
        assert recorder.last_json() == {"model": "french", "prompt": "Hi", "adapters": [], "stream": True}
        deltas = [c.choices[0].delta.content async for c in client.stream_chat("french", [])]
        assert deltas == ["c"]
    assert client._http.is_closed


@pytest.mark.asyncio
async def test_async_mid_stream_error() -> None:
    error = {"error": {"message": "out of memory", "type": "server_error", "param": None, "code": None}}
    client, _ = make_async(lambda r: sse_response(sse_body(completion_chunk("a"), error, "[DONE]")))
    seen = []
    async with client:
        with pytest.raises(LoraplexError, match="out of memory") as info:
            async for chunk in client.stream_completions("french", "Hi"):
                seen.append(chunk.choices[0].text)
    assert seen == ["a"] and info.value.status_code is None


@pytest.mark.asyncio
async def test_async_requests_and_errors(tmp_path: Path, adapter_dir: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health/ready":
            return httpx.Response(200)
        if path == "/v1/chat/completions":
            return httpx.Response(200, json=CHAT_COMPLETION)
        if path == "/v1/adapters" and request.method == "POST":
            return httpx.Response(201, json=ADAPTER)
        if path.endswith("/download"):
            return httpx.Response(200, content=b"tarball")
        if path.startswith("/v1/fine_tuning/jobs/"):
            return httpx.Response(200, json=job("failed"))
        return error_response(429, "slow down", **{"Retry-After": "3"})

    client, recorder = make_async(handler)
    async with client:
        assert await client.health() is True
        chat = await client.chat("french", [{"role": "user", "content": "Hi"}], max_tokens=None, top_p=0.9)
        assert recorder.last_json() == {
            "model": "french",
            "messages": [{"role": "user", "content": "Hi"}],
            "top_p": 0.9,
        }
        assert chat.choices[0].message.content == "Salut"
        adapter = await client.upload_adapter("french", directory=adapter_dir, overwrite=True)
        assert adapter.id == "french" and recorder.last.url.params["overwrite"] == "true"
        assert set(parse_multipart(recorder.last)) == {"name", "adapter_config.json", "adapter_model.safetensors"}
        dest = await client.download_adapter("french", tmp_path / "f.tar.gz")
        assert dest.read_bytes() == b"tarball"
        assert (await client.wait_job("ftjob-1", poll_interval=0)).status == "failed"
        with pytest.raises(RateLimitError) as info:
            await client.models()
        assert info.value.status_code == 429


# --- retries (tenacity), as the openai package retries ---------------------------------------


def test_retries_honour_retry_after_then_succeed() -> None:
    answers = iter([error_response(503, "loading", **{"Retry-After": "0"}), error_response(429, "slow down",
                    **{"Retry-After": "0"}), httpx.Response(200, json={"object": "list", "data": []})])  # fmt: skip
    recorder = Recorder(lambda r: next(answers))
    with LoraplexClient("http://loraplex.test", transport=httpx.MockTransport(recorder), max_retries=2) as client:
        assert client.models().data == []
    assert len(recorder.requests) == 3


@pytest.mark.parametrize(
    ("response", "sent"),
    [
        (error_response(429, "Request too large"), 1),  # no Retry-After: it can never fit, not retried
        (error_response(400, "bad"), 1),
        (error_response(503, "draining", **{"Retry-After": "3600"}), 1),  # a hint past a minute: the caller decides
        (error_response(502, "bad gateway"), 3),  # 2 retries with backoff, then the error
    ],
)
def test_what_is_not_retried(response: httpx.Response, sent: int) -> None:
    recorder = Recorder(lambda r: response)
    with LoraplexClient("http://loraplex.test", transport=httpx.MockTransport(recorder), max_retries=2) as client:
        with pytest.raises(LoraplexError):
            client.models()
    assert len(recorder.requests) == sent


def test_a_refused_connection_is_an_api_connection_error_naming_the_url() -> None:
    import socket

    from client import APIConnectionError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with LoraplexClient(url, max_retries=1) as client, pytest.raises(APIConnectionError) as info:
        client.list_adapters()
    assert url in str(info.value) and info.value.url.rstrip("/") == url


@pytest.mark.asyncio
async def test_async_retries_too() -> None:
    answers = iter([error_response(503, "loading", **{"Retry-After": "0"}),
                    httpx.Response(200, json={"object": "list", "data": []})])  # fmt: skip
    recorder = Recorder(lambda r: next(answers))
    client = AsyncLoraplexClient("http://loraplex.test", transport=httpx.MockTransport(recorder), max_retries=1)
    async with client:
        assert (await client.models()).data == []
    assert len(recorder.requests) == 2
