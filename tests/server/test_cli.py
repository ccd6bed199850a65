"""`loraplex adapters ...` against a real server, and the command line's first-hour stumbles (issue 17): one line
for every user error, connection errors that say where and how to change it, downloads as folders, `--json`, all
settings as `serve` options, adapters pulled from folders, archives, HTTP (fsspec) and the hub's cache."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import tarfile
import threading
import zipfile

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.settings import Settings

runner = CliRunner()


def one_line_error(r, *wanted: str) -> str:
    """The command failed with exactly one line of output (no traceback) holding every `wanted` text."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert "Traceback" not in r.output
    for w in wanted:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_adapters_commands(live_server, adapter_dir, tmp_path):
    url = ["--url", live_server.url]
    r = runner.invoke(app, ["adapters", "upload", "cli-one", str(adapter_dir / "alpha"), *url])
    assert r.exit_code == 0, r.output
    assert "cli-one" in r.output
    r = runner.invoke(app, ["adapters", "upload", "cli-one", str(adapter_dir / "alpha"), *url])
    # the server's message, and the CLI's own flag for what to do (not the HTTP API's ?overwrite=true)
    assert "--overwrite" in one_line_error(r, "exists") and "?overwrite" not in r.output
    r = runner.invoke(app, ["adapters", "upload", "cli-one", str(adapter_dir / "alpha"), "--overwrite", *url])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["adapters", "list", *url])
    assert r.exit_code == 0 and "cli-one" in r.output and "alpha" in r.output
    r = runner.invoke(app, ["adapters", "list", "--json", *url])
    listed = {a["id"]: a for a in json.loads(r.output)}
    assert listed["cli-one"]["rank"] == 4 and listed["cli-one"]["version"] == 2
    r = runner.invoke(app, ["adapters", "show", "cli-one", *url])
    assert r.exit_code == 0 and json.loads(r.output)["rank"] == 4
    # download: a folder when given one (missing or existing), an archive when given a .tar.gz name
    r = runner.invoke(app, ["adapters", "download", "cli-one", str(tmp_path / "new-dir") + "/", *url])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "new-dir").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    r = runner.invoke(app, ["adapters", "download", "cli-one", str(tmp_path), *url])
    assert r.exit_code == 0 and (tmp_path / "cli-one" / "adapter_model.safetensors").is_file()
    r = runner.invoke(app, ["adapters", "download", "cli-one", str(tmp_path / "x.tar.gz"), *url])
    assert r.exit_code == 0
    with tarfile.open(tmp_path / "x.tar.gz") as t:
        assert sorted(m.name for m in t.getmembers() if m.isfile()) == [
            "cli-one/adapter_config.json", "cli-one/adapter_model.safetensors"]
    r = runner.invoke(app, ["adapters", "delete", "cli-one", *url])
    assert r.exit_code == 0
    one_line_error(runner.invoke(app, ["adapters", "show", "cli-one", *url]), "does not exist")


def test_user_errors_are_one_line(live_server, tmp_path):
    url = ["--url", live_server.url]
    one_line_error(runner.invoke(app, ["adapters", "upload", "x", str(tmp_path / "nope"), *url]), "nope",
                   "no such file")  # fmt: skip
    (tmp_path / "empty").mkdir()
    one_line_error(runner.invoke(app, ["adapters", "upload", "x", str(tmp_path / "empty"), *url]),
                   "not a PEFT adapter folder", "adapter_config.json")  # fmt: skip
    (tmp_path / "notes.txt").write_text("hi")
    one_line_error(runner.invoke(app, ["adapters", "upload", "x", str(tmp_path / "notes.txt"), *url]), "not an archive")
    one_line_error(runner.invoke(app, ["serve", "--max-num-seqs", "0"]), "max_num_seqs")
    one_line_error(runner.invoke(app, ["serve", "--api-keys-file", str(tmp_path / "keys")]), "api_keys_file", "does not point to a file")
    one_line_error(runner.invoke(app, ["serve"], env={"LORAPLEX_ALLOWED_HOSTS": "not json"}), "allowed_hosts")
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]),
                   "none.jsonl")  # fmt: skip
    r = runner.invoke(app, ["--debug", "adapters", "upload", "x", str(tmp_path / "notes.txt"), *url])
    assert isinstance(r.exception, ValueError)  # --debug: the exception itself, traceback and all


def test_a_refused_connection_names_the_url_and_how_to_change_it():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args in (["adapters", "list", "--url", url], ["jobs", "list"]):
        env = {"LORAPLEX_URL": url}
        line = one_line_error(runner.invoke(app, args, env=env), url, "--url", "LORAPLEX_URL", "loraplex serve")
        assert "Traceback" not in line


def test_serve_offers_every_setting_with_its_choices_and_default():
    r = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in r.output, name
        assert f"LORAPLEX_{name.upper()}" in r.output, name
    assert "<open|key|admin>" in r.output and "<text|json>" in r.output  # choices shown
    assert "default: 8000" in r.output and "default: key" in r.output
    assert "KEY [scope,scope] [tenant=NAME]" in r.output  # brackets are text, not markup


# --- adapters pull ------------------------------------------------------------------------


@pytest.fixture
def file_server(adapter_dir, tmp_path):
    """A plain HTTP file server on 127.0.0.1 serving `adapter_dir` and an archive of `alpha`."""
    root = tmp_path / "www"
    shutil.copytree(adapter_dir, root)
    with tarfile.open(root / "alpha.tar.gz", "w:gz") as t:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            t.add(adapter_dir / "alpha" / f, arcname=f"alpha/{f}")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # not into the CLI's captured output
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def hub_cache(root, repo: str, files: dict, revision: str = "main", commit: str = "a" * 40):
    """huggingface_hub's cache layout (models--ORG--REPO/{refs,snapshots,blobs}), as its downloads leave it."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / revision).write_text(commit)
    (base / "blobs").mkdir()
    for rel, source in files.items():
        blob = base / "blobs" / f"{abs(hash(rel)):x}"
        shutil.copyfile(source, blob)
        link = base / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return root


def test_pull_from_a_folder_an_archive_http_and_the_hub(live_server, adapter_dir, file_server, tmp_path, monkeypatch):
    url = ["--url", live_server.url]
    archive = tmp_path / "beta.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(adapter_dir / "beta" / f, f)
    names = {"pulled-dir": str(adapter_dir / "alpha"), "pulled-zip": str(archive),
             "pulled-http-dir": f"{file_server}/beta/", "pulled-http-tgz": f"{file_server}/alpha.tar.gz"}  # fmt: skip
    files = {f"adapters/beta/{f}": adapter_dir / "beta" / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    cache = hub_cache(tmp_path / "hub", "acme/loras", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub path, through huggingface_hub's own cache lookup
    names["pulled-hub"] = "hf://acme/loras/adapters/beta@main"
    for name, source in names.items():
        r = runner.invoke(app, ["adapters", "pull", name, source, "--json", *url])
        assert r.exit_code == 0, (name, r.output)
        assert json.loads(r.output)[0]["id"] == name
    listed = {a["id"]: a for a in json.loads(runner.invoke(app, ["adapters", "list", "--json", *url]).output)}
    assert listed["pulled-hub"]["sha256"] == listed["beta"]["sha256"] == listed["pulled-http-dir"]["sha256"]
    assert listed["pulled-http-tgz"]["sha256"] == listed["alpha"]["sha256"]
    one_line_error(runner.invoke(app, ["adapters", "pull", "x", f"{file_server}/nothing/", *url]), "does not exist")
    one_line_error(runner.invoke(app, ["adapters", "pull", "x", "hf://acme/other", *url]), "acme/other",
                   "local hub cache")  # fmt: skip
    for name in names:
        runner.invoke(app, ["adapters", "delete", name, *url])
