"""Bad adapter uploads are refused (4xx, a message that names the problem) and change nothing;
uploads, overwrites and deletes made while requests stream do not disturb those requests."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from tests.tiny import make_peft_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LIMIT = 2 * 2**20
PREFIX = "base_model.model.model.layers."
QA = PREFIX + "0.self_attn.q_proj.lora_A.weight"
QB = PREFIX + "0.self_attn.q_proj.lora_B.weight"


# ---- helpers (self-contained: no imports from other test modules) ----------------------------


def files_of(d: Path) -> dict:
    return {
        CONFIG: (CONFIG, (d / CONFIG).read_bytes()),
        WEIGHTS: (WEIGHTS, (d / WEIGHTS).read_bytes()),
    }


def greedy(http: httpx.Client, model: str, max_tokens: int = 8) -> str:
    r = http.post(
        "/v1/completions",
        json={"model": model, "prompt": "Hello world", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def config_of(d: Path) -> dict:
    return json.loads((d / CONFIG).read_text())


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / WEIGHTS)


def two(config: dict | bytes, weights: dict[str, torch.Tensor] | bytes) -> list:
    c = config if isinstance(config, bytes) else json.dumps(config).encode()
    w = weights if isinstance(weights, bytes) else st_save(weights)
    return [(CONFIG, (CONFIG, c)), (WEIGHTS, (WEIGHTS, w))]


def zip_of(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            if name == symlink:
                info.external_attr = 0o120777 << 16
            z.writestr(info, data)
    return buf.getvalue()


def targz_of(members: list[tuple[str, bytes]], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            t.addfile(info)
    return buf.getvalue()


def archive(blob: bytes, filename: str = "a.zip") -> list:
    return [("archive", (filename, blob))]


def crafted_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


# ---- fixtures ---------------------------------------------------------------------------------


SERVER_SETTINGS = dict(max_upload_bytes=LIMIT)  # the module's `server` (tests/conftest.py)


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_models):
    """Real PEFT adapters: `one` (all linears, r=4), `two` (q,v, r=8), `r32` (q, r=32) and `gpt2` (another base)."""
    root = tmp_path_factory.mktemp("bad-sources")
    llama = tiny_models["llama"]
    return {
        "one": make_peft_adapter(llama, root / "one", "llama", r=4, seed=41),
        "two": make_peft_adapter(llama, root / "two", "llama", r=8, seed=42, targets=["q_proj", "v_proj"]),
        "r32": make_peft_adapter(llama, root / "r32", "llama", r=32, alpha=32, seed=43, targets=["q_proj"]),
        "gpt2": make_peft_adapter(tiny_models["gpt2"], root / "gpt2", "gpt2", r=4, seed=44),
    }


@pytest.fixture(scope="module")
def keeper(server, src):
    """One good adapter uploaded before the bad ones: its greedy text must never change."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/adapters", data={"name": "keeper"}, files=files_of(src["one"]))
        assert r.status_code == 201, r.text
        return greedy(c, "keeper")


# ---- the corpus of bad uploads ------------------------------------------------------------------


@dataclass
class Bad:
    files: list | None = None  # httpx multipart files (a list, so a field may repeat)
    status: int = 400
    expect: list[str] = field(default_factory=list)  # substrings of the error message (case-insensitive)
    name: str | None = "bad-upload"  # None: no name field
    raw: Callable[[], object] | None = None  # a chunked multipart body (an iterator of bytes)


def _one(s) -> tuple[dict, dict]:
    return config_of(s["one"]), tensors_of(s["one"])


def _edit_tensors(s, fn) -> list:
    c, t = _one(s)
    fn(t)
    return two(c, t)


def _edit_config(s, **changes) -> list:
    c, t = _one(s)
    return two(c | changes, t)


def _set(key: str, value: float):
    def fn(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value

    return fn


def _rename_module(old: str, new: str):
    def fn(t):
        for k in [k for k in t if f".{old}." in k and k.startswith(PREFIX + "0.")]:
            t[k.replace(f".{old}.", f".{new}.")] = t.pop(k)

    return fn


def _header_beyond_file(s) -> list:
    header = {
        QA: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
        QB: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]},
    }
    return two(config_of(s["one"]), crafted_safetensors(header, b"\0" * 16))


def _header_length_beyond_file(s) -> list:
    blob = struct.pack("<Q", 10**6) + b'{"__metadata__": {}}'
    return two(config_of(s["one"]), blob)


def _pickle_bytes(s) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors_of(s["one"]), buf)
    return buf.getvalue()


def _pair(s) -> list[tuple[str, bytes]]:
    return [(CONFIG, (s["one"] / CONFIG).read_bytes()), (WEIGHTS, (s["one"] / WEIGHTS).read_bytes())]


def _corrupt_zip(s) -> Bad:
    blob = bytearray(zip_of(_pair(s), method=zipfile.ZIP_STORED))
    blob[len(blob) // 2] ^= 0xFF  # inside the stored weights: the member's CRC no longer matches
    return Bad(archive(bytes(blob)), expect=["corrupt"])


def _chunked_oversize():
    b = "loraplexboundary"

    def body():
        yield f'--{b}\r\nContent-Disposition: form-data; name="name"\r\n\r\nchunked-huge\r\n'.encode()
        yield (
            f'--{b}\r\nContent-Disposition: form-data; name="archive"; filename="a.zip"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(12):
            yield b"\0" * 2**18  # 3 MiB in all, sent without a Content-Length
        yield f"\r\n--{b}--\r\n".encode()

    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


CASES: dict[str, Callable[[dict], Bad]] = {
    # --- weights format
    "pickle-bin": lambda s: Bad(
        [
            (CONFIG, (CONFIG, (s["one"] / CONFIG).read_bytes())),
            ("adapter_model.bin", ("adapter_model.bin", _pickle_bytes(s))),
        ],
        expect=["pickle"],
    ),
    "pickle-as-safetensors": lambda s: Bad(
        two(config_of(s["one"]), _pickle_bytes(s)), expect=["not a valid safetensors"]
    ),
    "truncated-safetensors": lambda s: Bad(
        two(config_of(s["one"]), (s["one"] / WEIGHTS).read_bytes()[:5000]), expect=["not a valid safetensors"]
    ),
    "garbage-safetensors": lambda s: Bad(
        two(config_of(s["one"]), bytes(range(256)) * 40), expect=["not a valid safetensors"]
    ),
    "empty-safetensors": lambda s: Bad(two(config_of(s["one"]), b""), expect=["not a valid safetensors"]),
    "header-offsets-beyond-file": lambda s: Bad(_header_beyond_file(s), expect=["not a valid safetensors"]),
    "header-length-beyond-file": lambda s: Bad(_header_length_beyond_file(s), expect=["not a valid safetensors"]),
    "int-dtype": lambda s: Bad(
        _edit_tensors(s, lambda t: t.__setitem__(QA, t[QA].to(torch.int32))), expect=["non-float dtype"]
    ),
    "a-without-b": lambda s: Bad(_edit_tensors(s, lambda t: t.pop(QB)), expect=["without its lora_b"]),
    "rank-zero": lambda s: Bad(
        _edit_tensors(s, lambda t: t.update({QA: t[QA][:0].clone(), QB: t[QB][:, :0].clone()})), expect=["rank"]
    ),
    # --- does not fit the base
    "wrong-in-features": lambda s: Bad(
        _edit_tensors(s, lambda t: t.__setitem__(QA, torch.randn(4, 32) * 0.1)),
        expect=["q_proj", "do not fit the base layer"],
    ),
    "gpt2-adapter": lambda s: Bad(
        two(config_of(s["gpt2"]), tensors_of(s["gpt2"])),
        expect=["transformer.h.0.attn.c_attn", "not an adaptable linear layer"],
    ),
    "rank-over-limit": lambda s: Bad(list(files_of(s["r32"]).items()), expect=["rank 32 is over the limit of 16"]),
    "unknown-target": lambda s: Bad(
        _edit_tensors(s, _rename_module("q_proj", "nope_proj")), expect=["nope_proj", "not an adaptable linear layer"]
    ),
    # --- unsupported LoRA variants
    "dora-config": lambda s: Bad(_edit_config(s, use_dora=True), expect=["dora"]),
    "dora-magnitude": lambda s: Bad(
        _edit_tensors(s, lambda t: t.__setitem__(PREFIX + "0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64))),
        expect=["dora weights"],
    ),
    "modules-to-save": lambda s: Bad(_edit_config(s, modules_to_save=["lm_head"]), expect=["modules_to_save"]),
    "embedding-lora": lambda s: Bad(
        _edit_tensors(
            s,
            lambda t: t.update(
                {
                    "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 320),
                    "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(64, 4),
                }
            ),
        ),
        expect=["embedding lora"],
    ),
    "peft-type-ia3": lambda s: Bad(_edit_config(s, peft_type="IA3"), expect=["peft_type", "ia3"]),
    "lora-bias": lambda s: Bad(_edit_config(s, bias="all"), expect=["bias"]),
    "nan-weights": lambda s: Bad(_edit_tensors(s, _set(QA, float("nan"))), expect=["q_proj", "nan or inf"]),
    "inf-weights": lambda s: Bad(_edit_tensors(s, _set(QB, float("inf"))), expect=["q_proj", "nan or inf"]),
    # --- config
    "config-invalid-json": lambda s: Bad(
        two(b'{"r": 4, "lora_alpha": ', tensors_of(s["one"])), expect=["adapter_config.json is not valid json"]
    ),
    "config-not-utf8": lambda s: Bad(two(b"\xff\xfe{}", tensors_of(s["one"])), expect=["not valid json"]),
    "config-not-object": lambda s: Bad(two(b"[1, 2]", tensors_of(s["one"])), expect=["json object"]),
    "config-r-not-number": lambda s: Bad(_edit_config(s, r="four"), expect=["r must be a number"]),
    "config-alpha-pattern-bad-regex": lambda s: Bad(_edit_config(s, alpha_pattern={"(": 16}), expect=["alpha_pattern"]),
    "config-alpha-pattern-not-dict": lambda s: Bad(_edit_config(s, alpha_pattern=["q_proj"]), expect=["alpha_pattern"]),
    # --- configs that lie about their tensors (issue 17: accepted, listed, and downloaded back lying)
    "lie-r": lambda s: Bad(_edit_config(s, r=128), expect=["r=128", "have rank 4"]),
    "lie-targets": lambda s: Bad(_edit_config(s, target_modules=["c_attn"]), expect=["target_modules", "c_attn",
                                                                                       "no lora tensors", "q_proj"]),
    "lie-targets-missing-one": lambda s: Bad(_edit_config(s, target_modules=["q_proj", "k_proj", "v_proj"]),
                                             expect=["do not name", "gate_proj"]),
    "lie-targets-absent": lambda s: Bad(_edit_config(s, target_modules=None), expect=["names no target_modules"]),
    "lie-targets-regex": lambda s: Bad(_edit_config(s, target_modules=".*proj"), expect=["a regex", "list the module names"]),
    "lie-rank-pattern": lambda s: Bad(_edit_config(s, rank_pattern={"q_proj": 16}),
                                      expect=["rank_pattern['q_proj']=16", "have rank 4"]),
    "lie-rank-pattern-unused": lambda s: Bad(_edit_config(s, rank_pattern={"c_attn": 4}), expect=["rank_pattern",
                                                                                                  "c_attn"]),
    "lie-alpha-pattern-unused": lambda s: Bad(_edit_config(s, alpha_pattern={"c_proj": 4}), expect=["alpha_pattern",
                                                                                                    "c_proj"]),
    "lie-rslora-not-bool": lambda s: Bad(_edit_config(s, use_rslora="yes"), expect=["use_rslora"]),
    # --- names
    "name-dotdot": lambda s: Bad(list(files_of(s["one"]).items()), name="../evil", expect=["invalid adapter name"]),
    "name-leading-dash": lambda s: Bad(list(files_of(s["one"]).items()), name="-x", expect=["invalid adapter name"]),
    "name-65-chars": lambda s: Bad(list(files_of(s["one"]).items()), name="a" * 65, expect=["invalid adapter name"]),
    "name-space": lambda s: Bad(list(files_of(s["one"]).items()), name="a b", expect=["invalid adapter name"]),
    "name-trailing-newline": lambda s: Bad(
        list(files_of(s["one"]).items()), name="abc\n", expect=["invalid adapter name"]
    ),
    "name-non-ascii": lambda s: Bad(
        list(files_of(s["one"]).items()), name="adapt\u00e9r", expect=["invalid adapter name"]
    ),
    "name-missing": lambda s: Bad(list(files_of(s["one"]).items()), name=None, status=422, expect=["'name'"]),
    # --- archives
    "zip-dotdot-member": lambda s: Bad(
        archive(zip_of([("../" + CONFIG, _pair(s)[0][1]), _pair(s)[1]])), expect=["leaves the archive"]
    ),
    "tar-dotdot-member": lambda s: Bad(
        archive(targz_of([("x/../../" + CONFIG, _pair(s)[0][1]), _pair(s)[1]]), "a.tar.gz"),
        expect=["leaves the archive"],
    ),
    "tar-absolute-member": lambda s: Bad(
        archive(targz_of([("/abs/" + CONFIG, _pair(s)[0][1]), _pair(s)[1]]), "a.tar.gz"), expect=["absolute path"]
    ),
    "zip-absolute-member": lambda s: Bad(
        archive(zip_of([("/" + CONFIG, _pair(s)[0][1]), _pair(s)[1]])), expect=["absolute path"]
    ),
    "tar-symlink-member": lambda s: Bad(
        archive(targz_of([_pair(s)[0]], links={WEIGHTS: "/etc/passwd"}), "a.tar.gz"), expect=["link"]
    ),
    "zip-symlink-member": lambda s: Bad(
        archive(zip_of([_pair(s)[0], (WEIGHTS, b"/etc/passwd")], symlink=WEIGHTS)), expect=["symbolic link"]
    ),
    "zip-extra-member": lambda s: Bad(
        archive(zip_of([*_pair(s), ("README.md", b"hi")])), expect=["unexpected archive member", "readme.md"]
    ),
    "tar-duplicate-member": lambda s: Bad(
        archive(targz_of([*_pair(s), ("x/" + CONFIG, b"{}")]), "a.tar.gz"), expect=["more than once"]
    ),
    "zip-bomb": lambda s: Bad(
        archive(zip_of([_pair(s)[0], (WEIGHTS, b"\0" * (3 * 2**20))])),
        expect=["decompresses to more than the upload limit"],
    ),
    "tar-bomb": lambda s: Bad(
        archive(targz_of([_pair(s)[0], (WEIGHTS, b"\0" * (3 * 2**20))]), "a.tar.gz"),
        expect=["decompresses to more than the upload limit"],
    ),
    "zip-corrupt-member-data": _corrupt_zip,
    "archive-garbage": lambda s: Bad(archive(b"this is not an archive" * 10), expect=["neither a valid .zip"]),
    "archive-truncated-tar": lambda s: Bad(archive(targz_of(_pair(s))[:3000], "a.tar.gz"), expect=["archive"]),
    "archive-lacks-weights": lambda s: Bad(archive(zip_of([_pair(s)[0]])), expect=["lacks " + WEIGHTS.lower()]),
    "archive-pickle-member": lambda s: Bad(
        archive(zip_of([_pair(s)[0], ("adapter_model.bin", _pickle_bytes(s))])), expect=["adapter_model.bin"]
    ),
    # --- the form
    "missing-weights": lambda s: Bad([list(files_of(s["one"]).items())[0]], expect=["missing file " + WEIGHTS.lower()]),
    "missing-config": lambda s: Bad([list(files_of(s["one"]).items())[1]], expect=["missing file " + CONFIG.lower()]),
    "archive-and-files": lambda s: Bad([*files_of(s["one"]).items(), *archive(zip_of(_pair(s)))], expect=["not both"]),
    "unknown-file-field": lambda s: Bad(
        [*files_of(s["one"]).items(), ("notes", ("notes.txt", b"hi"))], expect=["unexpected file field"]
    ),
    "too-many-files": lambda s: Bad(
        [*files_of(s["one"]).items(), *[(f"f{i}", (f"f{i}.txt", b"x")) for i in range(3)]], expect=["too many files"]
    ),
    "over-limit-files": lambda s: Bad(
        [(CONFIG, (CONFIG, (s["one"] / CONFIG).read_bytes())), (WEIGHTS, (WEIGHTS, b"\0" * (LIMIT + 2**20)))],
        status=413,
        expect=["limit"],
    ),
    "over-limit-chunked": lambda s: Bad(raw=_chunked_oversize, status=413, expect=["limit"]),
}

BUGS: dict[str, str] = {}  # case → reason, for known bugs (none open)


def store_listing(server) -> list[str]:
    root = Path(server.state.settings.data_dir) / "adapters"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" not in p.relative_to(root).parts)


def scratch_listing(server) -> list[str]:
    return sorted(p.name for p in (Path(server.state.settings.data_dir) / "adapters" / ".tmp").iterdir())


def post_upload(client: httpx.Client, bad: Bad, query: str = "") -> httpx.Response:
    if bad.raw is not None:
        body, headers = bad.raw()
        return client.post("/v1/adapters" + query, content=body(), headers=headers)
    data = {"name": bad.name} if bad.name is not None else {}
    return client.post("/v1/adapters" + query, data=data, files=bad.files)


def assert_error(r: httpx.Response, status: int, expect: list[str], server) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
    msg = err["message"].lower()
    for want in expect:
        assert want.lower() in msg, (want, err["message"])
    # messages are for humans: no tracebacks, file paths or memory addresses
    assert "traceback" not in msg and " at 0x" not in msg, err["message"]
    assert str(server.state.settings.data_dir).lower() not in msg and "/tmp/" not in msg, err["message"]
    return err["message"]


@pytest.mark.parametrize(
    "case", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=BUGS[k])) if k in BUGS else k for k in CASES]
)
def test_bad_upload_is_refused_and_changes_nothing(case, client, server, src, keeper):
    before = client.get("/v1/adapters").json()
    files_before = store_listing(server)
    bad = CASES[case](src)
    r = post_upload(client, bad)
    assert_error(r, bad.status, bad.expect, server)
    assert client.get("/v1/adapters").json() == before
    assert store_listing(server) == files_before  # no new adapter directory, no new version
    assert scratch_listing(server) == []  # the scratch copy is gone too
    if bad.name and bad.name.isprintable() and "/" not in bad.name:
        assert client.get(f"/v1/adapters/{bad.name}").status_code == 404
    assert greedy(client, "keeper") == keeper  # the server still serves, unchanged


def _multi(s, kind: str) -> Bad:
    if kind == "dora+nan":
        c, t = _one(s)
        _set(QA, float("nan"))(t)
        return Bad(two(c | {"use_dora": True}, t), expect=["dora", "nan or inf"])
    if kind == "nan+rank-over-limit":  # a format problem in one module, a fit problem in another
        c, t = config_of(s["r32"]), tensors_of(s["r32"])
        _set(QA, float("nan"))(t)
        return Bad(two(c, t), expect=["nan or inf", "rank 32 is over the limit"])
    if kind == "lie-r+lie-targets":  # the adapter: r=128 on c_attn, tensors rank 8 on q_proj/v_proj
        return Bad(two(config_of(s["two"]) | {"r": 128, "target_modules": ["c_attn"]}, tensors_of(s["two"])),
                   expect=["r=128", "rank 8", "['c_attn']", "['q_proj', 'v_proj']"])
    assert kind == "bad-name+dora"
    return Bad(_edit_config(s, use_dora=True), name="a b", expect=["invalid adapter name", "dora"])


@pytest.mark.parametrize(
    "kind",
    [
        "dora+nan",
        "nan+rank-over-limit",
        "bad-name+dora",
        "lie-r+lie-targets",
    ],
)
def test_several_problems_are_reported_in_one_message(kind, client, server, src, keeper):
    before = client.get("/v1/adapters").json()
    bad = _multi(src, kind)
    assert_error(post_upload(client, bad), 400, bad.expect, server)
    assert client.get("/v1/adapters").json() == before


# ---- live operations ----------------------------------------------------------------------------


class Stream(threading.Thread):
    """A streaming greedy completion read in a thread; `first` is set at its first token."""

    def __init__(self, url: str, model: str, max_tokens: int = 60):
        super().__init__(daemon=True)
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.first = threading.Event()
        self.text, self.tokens, self.finish, self.error, self.status, self.done = "", 0, None, None, None, False

    def run(self) -> None:
        body = {
            "model": self.model,
            "prompt": "Hello world",
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            with httpx.Client(base_url=self.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.error = event["error"]
                        continue
                    for choice in event.get("choices") or []:
                        self.text += choice.get("text") or ""
                        self.finish = choice.get("finish_reason") or self.finish
                    if event.get("usage"):
                        self.tokens = event["usage"]["completion_tokens"]
                    self.first.set()
        except Exception as e:  # reported by the test
            self.error = repr(e)
        finally:
            self.first.set()

    def result(self) -> str:
        self.join(60)
        assert not self.is_alive(), "the stream did not finish"
        assert self.status == 200 and self.error is None and self.done, (self.status, self.error)
        assert self.finish == "length" and self.tokens == 60, (self.finish, self.tokens)
        return self.text


@pytest.fixture
def slow_steps(server, monkeypatch):
    """10 ms more per engine step (in the engine thread), so a 60-token stream surely outlives an upload."""
    engine = server.state.engine
    step = engine._step

    def slow() -> None:
        step()
        time.sleep(0.01)

    monkeypatch.setattr(engine, "_step", slow)


def start_stream(server, model: str) -> Stream:
    s = Stream(server.url, model)
    s.start()
    assert s.first.wait(30) and s.error is None, s.error
    return s


def test_upload_while_a_stream_runs(client, server, src, keeper, slow_steps):
    s = start_stream(server, "keeper")
    r = client.post("/v1/adapters", data={"name": "live-new"}, files=files_of(src["two"]))
    assert r.status_code == 201, r.text
    overlapped = s.is_alive()
    assert greedy(client, "live-new")  # servable at once
    assert s.result()
    assert overlapped, "the stream ended before the upload: the test did not overlap them"


def test_overwrite_during_a_stream_finishes_on_the_old_version(client, server, src, keeper, slow_steps):
    assert client.post("/v1/adapters", data={"name": "ow"}, files=files_of(src["one"])).status_code == 201
    assert client.post("/v1/adapters", data={"name": "ow-ref2"}, files=files_of(src["two"])).status_code == 201
    v1 = greedy(client, "ow", max_tokens=60)
    v2_ref = greedy(client, "ow-ref2", max_tokens=60)
    assert v1 != v2_ref
    s = start_stream(server, "ow")
    r = client.post("/v1/adapters?overwrite=true", data={"name": "ow"}, files=files_of(src["two"]))
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    running = server.state.engine.num_running
    assert s.result() == v1  # the running request kept version 1
    assert running >= 1, "the stream ended before the overwrite: the test did not overlap them"
    assert greedy(client, "ow", max_tokens=60) == v2_ref != v1


def test_delete_during_a_stream(client, server, src, keeper, slow_steps):
    pool = server.state.engine.pool
    assert client.post("/v1/adapters", data={"name": "doomed"}, files=files_of(src["two"])).status_code == 201
    s = start_stream(server, "doomed")
    resident = pool.resident_count()
    assert client.delete("/v1/adapters/doomed").status_code == 204
    running = server.state.engine.num_running
    s.result()  # finishes normally
    assert running >= 1, "the stream ended before the delete: the test did not overlap them"
    r = client.post("/v1/completions", json={"model": "doomed", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert client.get("/v1/adapters/doomed").status_code == 404
    deadline = time.monotonic() + 5
    while pool.resident_count() >= resident and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.resident_count() < resident  # its pages were given back
    assert "doomed" not in store_listing(server)


def test_delete_of_an_idle_resident_adapter_frees_its_pages(client, server, src, keeper):
    pool = server.state.engine.pool
    assert client.post("/v1/adapters", data={"name": "idle"}, files=files_of(src["two"])).status_code == 201
    greedy(client, "idle")
    resident = pool.resident_count()
    assert client.delete("/v1/adapters/idle").status_code == 204
    deadline = time.monotonic() + 3
    while pool.resident_count() >= resident and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.resident_count() < resident


@pytest.mark.parametrize("overwrite", [True, False])
def test_concurrent_uploads_of_one_name_leave_one_whole_adapter(overwrite, client, server, src, keeper):
    name = f"race-{overwrite}".lower()
    sources = {"one": src["one"], "two": src["two"]}
    expected = {}
    for k, d in sources.items():  # each source's own greedy output, under a private name
        assert client.post("/v1/adapters", data={"name": f"{name}-{k}"}, files=files_of(d)).status_code == 201
        expected[sha256((d / WEIGHTS).read_bytes())] = greedy(client, f"{name}-{k}")
    assert len(set(expected.values())) == 2
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def upload(d: Path) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            q = "?overwrite=true" if overwrite else ""
            statuses.append(c.post(f"/v1/adapters{q}", data={"name": name}, files=files_of(d)).status_code)

    threads = [threading.Thread(target=upload, args=(sources[k],)) for k in ("one", "two", "one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if overwrite:
        assert statuses == [201] * 4
    else:
        assert sorted(statuses) == [201, 409, 409, 409]
    got = client.get(f"/v1/adapters/{name}").json()
    assert got["sha256"] in expected
    assert got["version"] == (4 if overwrite else 1)
    assert greedy(client, name) == expected[got["sha256"]]  # no mixed state
    versions = [p for p in store_listing(server) if p.startswith(name + "/") and p.count("/") == 1]
    assert versions == [f"{name}/{got['version']}"]  # older versions pruned, one whole version on disk
