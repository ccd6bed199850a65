"""The console's files and routes without a browser: /ui serves the page and every file it loads, from this server
only; the vendored libraries are the pinned versions with their licences; the wheel ships them; the console's own
routes say what a key may do and where adapters live."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import httpx
import pytest

from server.http.routes.ui import CSP, UI_DIR
from tests.live import REPO

VENDORED = {"uplot": ("uPlot.iife.min.js", "v1.6.32"), "eventsource-parser": ("README.md", "eventsource-parser 4.1.3")}
IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["'](\.{1,2}/[^"']+)["']""")


@pytest.fixture
def http(client):
    return client


def test_ui_serves_the_page_with_a_strict_policy(http):
    r = http.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "ui/"  # relative: works behind a path prefix
    r = http.get("/ui/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    assert "script-src 'self';" in CSP and "connect-src 'self'" in CSP
    assert http.get("/ui/static/nothing.js").status_code == 404


def test_every_file_the_page_loads_is_served_from_here(http):
    html = http.get("/ui/").text
    referenced = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert referenced and all(ref.startswith(("static/", "data:")) for ref in referenced), referenced
    seen, todo = set(), [f"/ui/{ref}" for ref in referenced if ref.startswith("static/")]
    while todo:  # the page's files and, for scripts, every module they import
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        r = http.get(path)
        assert r.status_code == 200, path
        if path.endswith(".js"):
            assert "javascript" in r.headers["content-type"], path
            base = path.rsplit("/", 1)[0]
            for rel in IMPORT.findall(r.text):
                todo.append(str(httpx.URL(f"http://x{base}/").join(rel).path))
    assert {"/ui/static/js/app.js", "/ui/static/js/prom.js", "/ui/static/vendor/eventsource-parser/parse.js"} <= seen
    scripts = {p.relative_to(UI_DIR).as_posix() for p in UI_DIR.rglob("*.js")}
    assert {p.removeprefix("/ui/static/") for p in seen if p.endswith(".js")} == scripts  # nothing unused


@pytest.mark.parametrize("library", sorted(VENDORED))
def test_vendored_libraries_are_pinned_with_their_licence(library):
    folder = UI_DIR / "vendor" / library
    name, version = VENDORED[library]
    assert version in (folder / name).read_text()
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert version.split()[-1].lstrip("v") in (folder / "README.md").read_text()


def test_the_wheel_ships_the_console(tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info behind
    for package in ("server", "adapters", "client"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("loraplex-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in UI_DIR.rglob("*") if p.is_file()}
    assert expected and expected <= shipped, sorted(expected - shipped)


def test_session_says_what_the_server_allows_and_its_training_limits(http, server):
    s = http.get("/ui/api/session").json()
    settings = server.state.settings
    assert s["auth"] is False and s["scopes"] == ["admin", "inference", "train"] and all(s["can"].values())
    assert s["model"] == server.state.base.model_id and s["max_model_len"] == settings.max_model_len
    assert s["limits"]["max_lora_rank"] == settings.max_lora_rank
    assert s["limits"]["max_train_steps"] == settings.max_train_steps
    assert s["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    props = s["hyperparameters"]["properties"]
    assert props["rank"]["default"] == 8 and props["rank"]["minimum"] == 1
    assert all(p.get("description") for p in props.values())  # "auto" fields keep the trainer's descriptions


def test_adapter_residence_follows_the_tiers_and_the_merge(http, adapter_dir):
    files = {f: (f, (adapter_dir / "alpha" / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert http.post("/v1/adapters", data={"name": "resident"}, files=files).status_code == 201
    assert http.get("/ui/api/adapters").json() == {"merged": None, "adapters": {"resident": "host"}}
    body = {"model": "resident", "prompt": "Hello", "max_tokens": 48, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(2 * 24):  # half the answer: past the merge window (8 steps) of one adapter's traffic
            next(lines)
        during = http.get("/ui/api/adapters").json()
        for _ in lines:
            pass
    assert during == {"merged": "resident", "adapters": {"resident": "device"}}
    assert http.delete("/v1/adapters/resident").status_code == 204
    assert http.get("/ui/api/adapters").json()["adapters"] == {}
