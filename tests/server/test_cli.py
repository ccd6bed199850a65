"""`loraplex adapters ...` against a real server."""

from __future__ import annotations

import tarfile

from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()


def test_adapters_commands(live_server, adapter_dir, tmp_path):
    url = ["--url", live_server.url]
    r = runner.invoke(app, ["adapters", "upload", "cli-one", str(adapter_dir / "alpha"), *url])
    assert r.exit_code == 0, r.output
    assert "cli-one" in r.output
    r = runner.invoke(app, ["adapters", "upload", "cli-one", str(adapter_dir / "alpha"), *url])
    assert r.exit_code == 1 and "exists" in r.output  # the server's message, not a traceback
    r = runner.invoke(app, ["adapters", "list", *url])
    assert r.exit_code == 0 and "cli-one" in r.output and "alpha" in r.output
    r = runner.invoke(app, ["adapters", "show", "cli-one", *url])
    assert r.exit_code == 0 and '"rank": 4' in r.output
    r = runner.invoke(app, ["adapters", "download", "cli-one", str(tmp_path), *url])
    assert r.exit_code == 0
    with tarfile.open(tmp_path / "cli-one.tar.gz") as t:
        assert sorted(m.name for m in t.getmembers() if m.isfile()) == [
            "cli-one/adapter_config.json", "cli-one/adapter_model.safetensors"]
    r = runner.invoke(app, ["adapters", "delete", "cli-one", *url])
    assert r.exit_code == 0
    r = runner.invoke(app, ["adapters", "show", "cli-one", *url])
    assert r.exit_code == 1 and "does not exist" in r.output
