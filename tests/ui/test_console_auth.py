"""The console on a server with API keys: it asks for a key and keeps it for the browser session only, shows a key
only what its scopes allow, and what it shows agrees with what the server enforces."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from server.http.routes.ui import ACTIONS
from tests.live import start_server, tiny_settings
from tests.ui.conftest import open_console

ADMIN, INFERENCE = "admin-key-0123456789", "inference-key-0123456789"


@pytest.fixture(scope="module")
def live(tmp_path_factory, llama_dir, adapter_dir):
    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.txt"
    keys.write_text(f"{ADMIN}\n{INFERENCE} inference\n")
    server = start_server(tiny_settings(llama_dir, root / "data", adapter_dir=adapter_dir, api_keys_file=keys))
    yield server
    server.stop()


def sign_in(console, key: str, route: str = "adapters"):
    console.allow_status(401)  # the first look, before the key
    page = console.open(route, wait=False)
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-submit")
    page.wait_for_selector("html[data-ready=true]")
    return page


def test_the_console_asks_for_a_key_and_keeps_it_for_this_session_only(console, browser, live):
    console.allow_status(401)
    page = console.open("playground", wait=False)
    expect(page.locator("#key-dialog")).to_be_visible()
    console.screenshot("auth-key-dialog")
    page.fill("#key-input", "not-a-key")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_have_text("The server refused this key.")
    page.fill("#key-input", INFERENCE)
    page.click("#key-submit")
    page.wait_for_selector("html[data-ready=true]")
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#who")).to_have_text("key scopes: inference")
    assert page.evaluate("() => [sessionStorage.length, localStorage.length, document.cookie]") == [1, 0, ""]
    page.reload()  # the same browser session keeps it
    page.wait_for_selector("html[data-ready=true]")
    expect(page.locator("#key-dialog")).to_be_hidden()
    other = open_console(browser, live.url)  # a new session asks again
    try:
        expect(other.open("playground", wait=False).locator("#key-dialog")).to_be_visible()
    finally:
        other.page.context.close()
    page.click("#sign-out")  # and forgetting it asks again
    expect(page.locator("#key-dialog")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0


def test_an_inference_key_sees_no_action_that_changes_or_copies_an_adapter(console):
    console.allow_status(403)
    page = sign_in(console, INFERENCE)
    expect(page.locator('#ad-table tr[data-name="alpha"]')).to_be_visible()
    expect(page.get_by_role("button", name="Delete")).to_have_count(0)
    expect(page.get_by_role("button", name="Replace…")).to_have_count(0)
    expect(page.locator("#ad-upload")).to_be_hidden()
    expect(page.get_by_role("button", name="Download")).to_have_count(0)  # downloading needs the train scope
    console.screenshot("auth-inference-adapters")
    console.go("training")
    expect(page.locator("[data-lacks=train]")).to_be_visible()
    expect(page.locator("#tr-job-form")).to_be_hidden()
    console.go("playground")
    expect(page.locator("#pg-send")).to_be_visible()
    # what is hidden is refused by the server all the same
    status = page.evaluate("""async () => (await fetch("../v1/adapters/alpha", {method: "DELETE",
        headers: {Authorization: "Bearer " + sessionStorage.getItem("loraplex.key")}})).status""")
    assert status == 403


def test_an_admin_key_sees_every_action(console):
    page = sign_in(console, ADMIN)
    expect(page.get_by_role("button", name="Delete")).to_have_count(2)
    expect(page.locator("#ad-upload")).to_be_visible()
    console.go("training")
    expect(page.locator("#tr-job-form")).to_be_visible()
    expect(page.locator("[data-lacks=train]")).to_be_hidden()


# what each action of the console calls: a request that the action's scope allows (and that changes nothing)
PROBES = {
    "generate": ("POST", "/v1/completions", {"model": "alpha", "prompt": "Hi", "max_tokens": 1}),
    "download_adapters": ("GET", "/v1/adapters/alpha/download", None),
    "manage_adapters": ("DELETE", "/v1/adapters/no-such-adapter", None),
    "train": ("GET", "/v1/fine_tuning/jobs", None),
}


@pytest.mark.parametrize("key", [ADMIN, INFERENCE])
def test_what_the_console_offers_a_key_is_what_the_server_allows_it(live, key):
    assert set(PROBES) == set(ACTIONS)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        can = c.get("/ui/api/session").json()["can"]
        for action, (method, path, body) in PROBES.items():
            status = c.request(method, path, json=body).status_code
            assert (status != 403) == can[action], (action, status)
            assert status != 401
        assert httpx.get(f"{live.url}/ui/api/session").status_code == 401
