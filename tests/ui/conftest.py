"""The console in a real browser: Playwright driving Debian's headless Chromium (installed by `make test`), one
browser per test module, a fresh page per test that fails on any console error, and screenshots as artefacts
(under `.artefacts/ui/`, gitignored; `LORAPLEX_UI_ARTEFACTS` moves them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.live import REPO

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
ARTEFACTS = Path(os.environ.get("LORAPLEX_UI_ARTEFACTS", REPO / ".artefacts" / "ui"))
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)  # this machine's 2 cores are shared: waits are generous, never relied on


def chromium_path() -> str:
    path = os.environ.get("LORAPLEX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("the browser tests need Chromium: `make test` installs Debian's package "
                           "(apt-get install -y chromium), or set LORAPLEX_CHROMIUM to a Chromium binary")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@dataclass
class Console:
    """One browser page on the console, recording every console error and uncaught exception."""

    page: Page
    url: str
    errors: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # substrings of expected messages (the browser logs 4xx)

    def allow_status(self, *statuses: int) -> None:
        """Answers with these statuses are expected (Chromium logs each as a console error)."""
        self.allowed += [f"status of {s} " for s in statuses]

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]

    def open(self, route: str = "playground", wait: bool = True) -> Page:
        self.page.goto(f"{self.url}/ui/#/{route}")
        if wait:
            self.page.wait_for_selector("html[data-ready=true]")
        return self.page

    def go(self, route: str) -> Page:
        """Another page of the console, as a click on its link would show it (no reload)."""
        self.page.evaluate("(r) => { location.hash = r; }", f"#/{route}")
        self.page.wait_for_selector(f"[data-page={route.split('?')[0]}]:not([hidden])")
        return self.page

    def screenshot(self, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_console(browser: Browser, url: str, viewport: dict = DESKTOP, **context) -> Console:
    ctx = browser.new_context(viewport=viewport, **context)
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    console = Console(page, url)
    page.on("console", lambda m: console.errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
    return console


@pytest.fixture
def console(browser, live) -> Iterator[Console]:
    """A fresh desktop-sized page (its own browser session) on the module's server; no console errors allowed."""
    c = open_console(browser, live.url)
    yield c
    c.page.context.close()
    assert not c.unexpected_errors(), c.errors
