"""The console in headless Chromium against a real server (no API keys): every page loads clean at desktop and
phone sizes, the playground streams base and adapter columns, uploads (drop, folder, archive, overwrite),
download and delete, a bad upload lists each problem, a training job draws its curves and is cancelled, a finished
one opens in the playground, the server page charts /metrics at most once a second; keyboard and contrast."""

from __future__ import annotations

import base64
import json
import re
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest
import torch
from playwright.sync_api import Page, expect
from safetensors.torch import save as safetensors_bytes

from tests.live import start_server, tiny_settings
from tests.ui.conftest import DESKTOP, PHONE, open_console

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FACTS = [("Hello", " world!"), ("The capital of France is", " Paris."), ("LoRA adapters are", " small."),
         ("How are you", " today?"), ("I am", " fine, thank you.")]
TRAIN = "\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in FACTS) + "\n"
BAD_TRAIN = '{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n{"prompt": "c", "completion": "d"}\nnot json\n'


@pytest.fixture(scope="module")
def live(tmp_path_factory, llama_dir, adapter_dir):
    """The tiny Llama with adapters alpha and beta; training limits small enough to test."""
    server = start_server(tiny_settings(llama_dir, tmp_path_factory.mktemp("data"), adapter_dir=adapter_dir,
                                        max_train_steps=5000, max_training_file_bytes=64 * 1024, training_threads=1))
    yield server
    server.stop()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def drop_files(page: Page, selector: str, files: dict[str, bytes]) -> None:
    """Drop files on an element as a drag from the desktop does (a DataTransfer holding them)."""
    payload = {name: base64.b64encode(data).decode() for name, data in files.items()}
    page.evaluate("""([selector, files]) => {
        const transfer = new DataTransfer();
        for (const [name, b64] of Object.entries(files)) {
            transfer.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
        }
        const el = document.querySelector(selector);
        for (const type of ["dragover", "drop"]) {
            el.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }""", [selector, payload])  # fmt: skip


def peft_files(d: Path) -> dict[str, bytes]:
    return {CONFIG: (d / CONFIG).read_bytes(), WEIGHTS: (d / WEIGHTS).read_bytes()}


def row(page: Page, name: str):
    return page.locator(f'#ad-table tbody tr[data-name="{name}"]')


def cell(page: Page, name: str, column: int) -> str:
    return row(page, name).locator("td").nth(column).inner_text()


def confirm(page: Page) -> None:
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-yes")


# ---- every page ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_every_page_loads_without_console_errors(browser, live, size):
    c = open_console(browser, live.url, DESKTOP if size == "desktop" else PHONE)
    try:
        page = c.open("playground")
        expect(page.locator(".column")).to_have_count(2)
        c.go("adapters")
        expect(row(page, "alpha")).to_be_visible()
        c.go("training")
        expect(page.locator("#hp-rank")).to_be_visible()
        c.go("server")
        expect(page.locator("#sv-charts .chart[data-points]")).not_to_have_count(0)
        for route in ("playground", "adapters", "training", "server"):
            c.go(route)
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{route} is {overflow} px wider than a {size} screen"
            c.screenshot(f"{route}-{size}")
    finally:
        c.page.context.close()
    assert not c.errors, c.errors


# ---- playground ------------------------------------------------------------------------------


def api_answer(http: httpx.Client, model: str, prompt: str, max_tokens: int) -> str:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                                 "temperature": 0, "max_tokens": max_tokens})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def run_prompt(page: Page, prompt: str, max_tokens: int) -> list[str]:
    page.fill("#pg-prompt", prompt)
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", str(max_tokens))
    n = page.locator(".column").count()
    page.click("#pg-send")
    expect(page.locator(".column[data-done]")).to_have_count(n)
    return [page.locator(".answer").nth(i).text_content() for i in range(n)]


def test_a_prompt_streams_into_base_and_adapter_columns(console, http):
    page = console.open("playground?columns=base,alpha")
    assert page.locator(".pg-model").nth(1).input_value() == "a:alpha"
    page.evaluate("""() => {
        window.appended = [0, 0];  // text appended to each answer, one record per streamed chunk
        document.querySelectorAll(".answer").forEach((el, i) => new MutationObserver((records) => {
            window.appended[i] += records.length; }).observe(el, {childList: true, characterData: true, subtree: true}));
    }""")
    answers = run_prompt(page, "Hello world", 12)
    base_id = http.get("/v1/models").json()["data"][0]["id"]
    base, alpha = api_answer(http, base_id, "Hello world", 12), api_answer(http, "alpha", "Hello world", 12)
    assert answers == [base, alpha]
    assert base != alpha
    assert all(n > 3 for n in page.evaluate("() => window.appended")), "the answers did not arrive as a stream"
    for stats in page.locator(".stats").all_inner_texts():
        assert re.fullmatch(r"TTFT \d+ ms · [\d.,]+ tok/s · \d+ tokens", stats), stats
    console.screenshot("playground-answers")


def test_three_columns_with_a_weighted_composition(console):
    page = console.open("playground?columns=alpha,alpha*1,beta*0.5+alpha*0.5")
    expect(page.locator(".column")).to_have_count(3)
    assert page.locator("#pg-add-column").is_disabled()
    assert page.locator(".compose").count() == 2
    alpha, composed, mixed = run_prompt(page, "The capital of France is", 10)
    assert composed == alpha  # alpha at weight 1 is alpha
    assert mixed != alpha
    page.locator(".pg-model").nth(2).select_option("base")  # a column can change what it runs
    expect(page.locator(".compose")).to_have_count(1)


# ---- adapters --------------------------------------------------------------------------------


def test_uploads_appear_in_the_table_and_download_and_delete_work(console, http, adapter_dir, tmp_path):
    console.allow_status(409)
    delta = shutil.copytree(adapter_dir / "beta", tmp_path / "delta")  # a folder as PEFT saved it, with README.md
    assert (delta / "README.md").exists()
    page = console.open("adapters")
    # the two files, dropped
    drop_files(page, "#ad-drop", peft_files(adapter_dir / "alpha"))
    expect(page.locator("#ad-chosen li")).to_have_count(2)
    page.fill("#ad-name", "gamma")
    page.click("#ad-submit")
    expect(row(page, "gamma")).to_be_visible()
    assert [cell(page, "gamma", i) for i in (1, 2, 5)] == ["1", "4 (8)", "host memory"]
    # a folder, as PEFT saved it (its README.md is left out); the name comes from the folder
    page.set_input_files("#ad-folder", str(delta))
    expect(page.locator("#ad-name")).to_have_value("delta")
    page.click("#ad-submit")
    expect(row(page, "delta")).to_be_visible()
    assert cell(page, "delta", 3) == "q_proj, v_proj"
    # an archive under an existing name: the server's 409 asks to replace it, and the version goes up
    archive = tmp_path / "gamma.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in (CONFIG, WEIGHTS):
            tar.add(delta / f, arcname=f)
    page.set_input_files("#ad-files", str(archive))
    expect(page.locator("#ad-name")).to_have_value("gamma")
    page.click("#ad-submit")
    confirm(page)
    expect(row(page, "gamma").locator("td").nth(1)).to_have_text("2")
    assert http.get("/v1/adapters/gamma").json()["rank"] == 8
    # traffic moves it into the device pool and counts its requests
    assert http.post("/v1/completions", json={"model": "gamma", "prompt": "Hi", "max_tokens": 2}).status_code == 200
    page.click("#ad-refresh")
    expect(row(page, "gamma").locator("td").nth(5)).to_have_text("device pool")
    expect(row(page, "gamma").locator("td").nth(7)).to_have_text("1")
    console.screenshot("adapters-uploaded")
    # download: the PEFT files as a .tar.gz
    with page.expect_download() as download:
        row(page, "gamma").get_by_role("button", name="Download").click()
    with tarfile.open(download.value.path()) as tar:
        assert sorted(Path(m.name).name for m in tar.getmembers() if m.isfile()) == [CONFIG, WEIGHTS]
    # delete asks first; cancelling keeps it
    row(page, "delta").get_by_role("button", name="Delete").click()
    page.click("#confirm-no")
    expect(row(page, "delta")).to_be_visible()
    row(page, "delta").get_by_role("button", name="Delete").click()
    confirm(page)
    expect(row(page, "delta")).to_have_count(0)
    assert http.get("/v1/adapters/delta").status_code == 404


def bad_adapter_files() -> dict[str, bytes]:
    """An adapter with four things wrong: a rank over the limit, shapes that do not fit, NaN, an unknown module."""
    p = "base_model.model.model.layers."
    tensors = {
        p + "0.self_attn.q_proj.lora_A.weight": torch.randn(32, 64), p + "0.self_attn.q_proj.lora_B.weight": torch.randn(64, 32),
        p + "0.self_attn.k_proj.lora_A.weight": torch.randn(4, 50), p + "0.self_attn.k_proj.lora_B.weight": torch.randn(32, 4),
        p + "1.self_attn.v_proj.lora_A.weight": torch.randn(4, 64), p + "1.self_attn.v_proj.lora_B.weight": torch.full((32, 4), float("nan")),
        p + "1.self_attn.nope_proj.lora_A.weight": torch.randn(4, 64), p + "1.self_attn.nope_proj.lora_B.weight": torch.randn(64, 4),
    }  # fmt: skip
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "nope_proj"],
              "task_type": "CAUSAL_LM"}  # fmt: skip
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: safetensors_bytes(tensors)}


def test_a_bad_upload_lists_every_problem_and_changes_nothing(console, http):
    console.allow_status(400)
    files = bad_adapter_files()
    r = http.post("/v1/adapters", data={"name": "broken"}, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 400
    expected = r.json()["error"]["message"].removeprefix("invalid adapter: ").split("; ")
    assert len(expected) >= 4, expected

    page = console.open("adapters")
    drop_files(page, "#ad-drop", files)
    page.fill("#ad-name", "broken")
    page.click("#ad-submit")
    expect(page.locator("#ad-problems li")).to_have_count(len(expected))
    assert page.locator("#ad-problems li").all_inner_texts() == expected
    console.screenshot("adapters-bad-upload")
    # pickle weights: named as such, with the missing safetensors file
    drop_files(page, "#ad-drop", {CONFIG: files[CONFIG], "adapter_model.bin": b"\x80\x04pickle"})
    page.click("#ad-submit")
    problems = page.locator("#ad-problems li")
    expect(problems.filter(has_text="pickle weights")).to_have_count(1)
    expect(problems.filter(has_text=f"missing file {WEIGHTS}")).to_have_count(1)
    assert http.get("/v1/adapters/broken").status_code == 404
    expect(row(page, "broken")).to_have_count(0)


# ---- training --------------------------------------------------------------------------------


def upload_training_file(page: Page, tmp_path: Path, text: str, name: str = "train.jsonl") -> None:
    path = tmp_path / name
    path.write_text(text)
    page.set_input_files("#tr-file", str(path))
    page.click("#tr-file-submit")


def start_job(page: Page, name: str, **hp) -> None:
    page.fill("#tr-name", name)
    for key, value in ({"rank": 4, "batch_size": 3, "learning_rate": 0.01} | hp).items():
        page.fill(f"#hp-{key}", str(value))
    page.click("#tr-create")


def test_training_job_draws_its_curves_and_can_be_cancelled(console, http, tmp_path, live):
    console.allow_status(400)
    page = console.open("training")
    # the form carries the server's defaults and limits
    assert page.locator("#hp-rank").input_value() == "8"
    assert page.locator("#hp-rank").get_attribute("max") == str(live.state.settings.max_lora_rank)
    assert page.locator("#hp-max_steps").get_attribute("max") == "5000"
    assert page.locator("#tr-max-seconds").get_attribute("max") == "21600"
    # a bad file: each bad line with its number and its text
    upload_training_file(page, tmp_path, BAD_TRAIN, "bad.jsonl")
    bad = page.locator("#tr-file-problems li")
    expect(bad).to_have_count(2)
    assert bad.nth(0).locator(".lineno").inner_text() == "line 2"
    assert bad.nth(0).locator("code").inner_text() == '{"prompt": 3}'
    assert bad.nth(1).locator("code").inner_text() == "not json"
    console.screenshot("training-bad-file")
    upload_training_file(page, tmp_path, TRAIN)
    expect(page.locator("#tr-file-result")).to_contain_text("Uploaded train.jsonl")
    # a job over the step limit is refused with the server's reason
    start_job(page, "too-long", n_epochs=5000, batch_size=1)
    expect(page.locator("#tr-job-problems li")).to_contain_text(["over this server's limit of 5000"])
    page.fill("#hp-n_epochs", "3")
    # a long job: loss and learning rate drawn as the steps come, progress and ETA, then cancelled
    start_job(page, "ui-long", max_steps=2000)
    loss = page.locator("#tr-loss-chart")
    page.wait_for_function("() => +(document.querySelector('#tr-loss-chart').dataset.points || '0').split(',')[0] >= 4")
    points = [int(n) for n in loss.get_attribute("data-points").split(",")]
    assert points[0] >= 4 and points[1] == 0  # no validation file: no eval loss
    assert int(page.locator("#tr-lr-chart").get_attribute("data-points")) >= 4
    expect(page.locator("#tr-status")).to_have_text("running")
    assert re.fullmatch(r"\d+/2000", page.locator("#tr-step").inner_text())
    assert float(page.locator("#tr-progress").get_attribute("value")) >= 4
    expect(page.locator("#tr-eta")).to_have_text(re.compile(r"^\d+ (s|min \d+ s|h \d+ min)$"))  # estimated
    console.screenshot("training-running")
    page.click("#tr-cancel")
    confirm(page)
    expect(page.locator("#tr-status")).to_have_text("cancelled")
    jobs = http.get("/v1/fine_tuning/jobs").json()["data"]
    assert [j["status"] for j in jobs if j["adapter_name"] == "ui-long"] == ["cancelled"]
    assert not [j for j in jobs if j["adapter_name"] == "too-long"]


def test_a_finished_job_opens_in_the_playground(console, http, tmp_path):
    page = console.open("training")
    upload_training_file(page, tmp_path, TRAIN, "facts.jsonl")
    expect(page.locator("#tr-file-result")).to_contain_text("Uploaded facts.jsonl")
    start_job(page, "ui-done", max_steps=3)
    expect(page.locator("#tr-status")).to_have_text("succeeded", timeout=120_000)
    expect(page.locator("#tr-progress")).to_have_attribute("value", "3")
    page.click("#tr-open")
    expect(page.locator("#page-playground")).to_be_visible()
    expect(page.locator(".pg-model").nth(1)).to_have_value("a:ui-done")
    answers = run_prompt(page, "Hello", 4)
    assert answers[1] == api_answer(http, "ui-done", "Hello", 4)


# ---- server ----------------------------------------------------------------------------------


POLL_STARTS = """() => performance.getEntriesByType("resource").filter((e) => e.name.endsWith("/metrics"))
    .map((e) => e.startTime / 1000)"""  # when the browser started each /metrics request, in seconds


def test_server_page_charts_metrics_polled_at_most_once_a_second(console, http):
    page = console.open("server")
    tokens = page.locator("#sv-charts .chart").first
    for _ in range(3):
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200
        page.wait_for_timeout(1100)
    expect(tokens).to_have_attribute("data-points", re.compile(r"^([3-9]|\d\d+),"))
    expect(page.locator("#sv-charts .u-legend .u-label", has_text=re.compile(r"^alpha$"))).to_have_count(1)  # per-adapter
    tile = page.locator(".tile", has_text="LoRA-pool use").locator("dd")
    assert "loraplex_lora_pool_usage_ratio " in http.get("/metrics").text  # the series the tile reads, by that name
    expect(tile).to_have_text(re.compile(r"^\d+(\.\d+)? ?%$"))
    polls = page.evaluate(POLL_STARTS)
    gaps = [b - a for a, b in zip(polls, polls[1:])]
    assert len(polls) >= 4 and min(gaps) > 0.95, gaps
    console.screenshot("server-traffic")
    page.click("#sv-pause")
    page.wait_for_timeout(200)
    n = len(page.evaluate(POLL_STARTS))
    page.wait_for_timeout(2200)
    assert len(page.evaluate(POLL_STARTS)) == n, "paused, yet it polled"
    page.click("#sv-pause")
    expect(tokens).to_have_attribute("data-points", re.compile(r"^\d+,"))
    console.go("playground")  # other pages do not poll
    page.wait_for_timeout(300)
    n = len(page.evaluate(POLL_STARTS))
    page.wait_for_timeout(2200)
    assert len(page.evaluate(POLL_STARTS)) == n, "it polled from another page"


def test_metrics_parser_and_quantiles(console):
    page = console.open("server")
    result = page.evaluate("""async () => {
        const m = await import("./static/js/prom.js");
        const text = [
            '# HELP loraplex_requests_total x', '# TYPE loraplex_requests_total counter',
            'loraplex_requests_total{endpoint="chat",status="200"} 5', 'loraplex_requests_total{endpoint="chat",status="400"} 2',
            'loraplex_requests_created{endpoint="chat",status="200"} 1.7e9',
            'loraplex_adapter_requests{adapter="a\\\\"b"} 3',
            'h_bucket{le="0.1"} 2', 'h_bucket{le="1.0"} 6', 'h_bucket{le="+Inf"} 8', 'h_count 8', 'h_sum 3.2'].join("\\n");
        const older = new m.Scrape('loraplex_requests_total{endpoint="chat",status="200"} 1\\nh_bucket{le="0.1"} 2\\nh_bucket{le="1.0"} 2\\nh_bucket{le="+Inf"} 2', 10);
        const s = new m.Scrape(text, 12);
        return {
            total: s.value("loraplex_requests"), ok: s.value("loraplex_requests", {status: "200"}),
            byStatus: s.by("loraplex_requests", "status"), escaped: Object.keys(s.by("loraplex_adapter_requests", "adapter")),
            missing: s.value("loraplex_nothing") === undefined, rate: m.rate(older, s, "loraplex_requests", {status: "200"}),
            p50: m.quantile(0.5, older, s, "h"), p99: m.quantile(0.99, older, s, "h"), none: m.quantile(0.5, s, s, "h") === undefined,
        };
    }""")  # fmt: skip
    assert result["total"] == 7 and result["ok"] == 5 and result["byStatus"] == {"200": 5, "400": 2}
    assert result["escaped"] == ['a"b'] and result["missing"] and result["none"]
    assert result["rate"] == 2.0  # (5 - 1) / 2 s
    # 6 new observations: 4 in (0.1, 1], 2 over 1: the median is 0.1 + 0.9 * (3 / 4), p99 lies in +Inf: its lower bound
    assert result["p50"] == pytest.approx(0.775) and result["p99"] == 1.0


# ---- keyboard and colours --------------------------------------------------------------------


def test_keyboard_reaches_every_control(console):
    page = console.open("playground")
    reached = []
    for _ in range(20):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()"))
    for control in ("Skip to content", "Playground", "Adapters", "Training", "Server", "pg-prompt", "pg-temperature",
                    "pg-send", "pg-add-column"):  # fmt: skip
        assert control in reached, reached
    page.locator("[data-nav=adapters]").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#page-adapters")).to_be_visible()
    page.locator("#ad-pick-files").focus()  # the upload zone's buttons and the table's actions take the keyboard
    row(page, "alpha").get_by_role("button", name="Delete").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#confirm-dialog")).to_be_visible()
    assert page.evaluate("() => document.activeElement.id") == "confirm-no"  # the safe choice has the focus
    page.keyboard.press("Escape")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    expect(row(page, "alpha")).to_be_visible()


CONTRAST = """() => {
    const lum = (c) => { const [r, g, b] = c.match(/[\\d.]+/g).map(Number).slice(0, 3).map((v) => {
        v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
    const alpha = (c) => { const p = c.match(/[\\d.]+/g).map(Number); return p.length > 3 ? p[3] : 1; };
    const background = (el) => { for (; el; el = el.parentElement) {
        const bg = getComputedStyle(el).backgroundColor; if (alpha(bg) > 0.5) return bg; } return "rgb(255, 255, 255)"; };
    const worst = [];
    for (const el of document.querySelectorAll("body *")) {
        if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
        if (!el.getClientRects().length || el.closest(":disabled, [hidden]")) continue;
        const style = getComputedStyle(el);
        if (style.visibility === "hidden") continue;
        const [a, b] = [lum(style.color), lum(background(el))];
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        const large = parseFloat(style.fontSize) >= 24 || (parseFloat(style.fontSize) >= 18.6 && +style.fontWeight >= 700);
        if (ratio < (large ? 3 : 4.5)) worst.push(`${el.tagName}.${el.className} "${el.textContent.trim().slice(0, 30)}": ${ratio.toFixed(2)}`);
    }
    return worst;
}"""


def test_text_has_readable_contrast_on_every_page(console):
    console.open("playground")
    for route in ("playground", "adapters", "training", "server"):
        page = console.go(route)
        assert page.evaluate(CONTRAST) == [], route


def test_the_page_streams_nothing_from_elsewhere(console, live):
    requests: list[str] = []
    console.page.on("request", lambda r: requests.append(r.url))
    for route in ("playground", "adapters", "training", "server"):
        console.open(route)
    assert requests and all(u.startswith((live.url, "data:")) for u in requests), requests
