"""The dashboard in real headless Chromium against a real sandbox.

A sandbox (a real salt-master with the Saltpeter engine, ``api_ws: true`` and an
``api_token``, and three real minions) serves the dashboard on 127.0.0.1.
Playwright drives Debian's Chromium (/usr/bin/chromium); Playwright's own browser
downloads are never used. The tests sign in with the login form, watch a run's
output arrive while it runs, start runs with "Run now" and kill one with the
"Kill" button.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter.sandbox import Sandbox

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium tries to reach Google's
# services, which a closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-41c7"
MINIONS = 3
SANDBOX_UP_TIMEOUT = 180.0
# Generous bounds for one step in the page: they only keep a broken run from hanging.
STEP_MS = 60_000
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}

JOBS: dict[str, dict[str, Any]] = {
    "countdown": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "command": 'for i in 1 2 3 4 5 6; do echo "step $i"; sleep 1; done',
    },
    "sleeper": {
        **DORMANT,
        "targets": "minion-2",
        "target_type": "list",
        "command": "echo started; sleep 300",
    },
    "greeting": {
        **DORMANT,
        "targets": "*",
        "command": 'echo "hello from $SP_MACHINE_ID"',
    },
}

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed"
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as other users"),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: install Debian's chromium package (scripts/test.sh "
        "does so when it runs as root)",
    ),
]


@pytest.fixture(scope="module")
def sandbox(short_tmp_dir: Callable[[str], Path]) -> Iterator[Sandbox]:
    jobs_dir = short_tmp_dir("jobs")
    (jobs_dir / "browser.yaml").write_text(yaml.safe_dump(JOBS))
    running = Sandbox(short_tmp_dir("sb"))
    try:
        running.up(
            MINIONS,
            jobs_dir=jobs_dir,
            timeout=SANDBOX_UP_TIMEOUT,
            settings={"api_ws": True, "api_token": TOKEN},
        )
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, sandbox: Sandbox) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(STEP_MS)
    opened.goto(f"http://127.0.0.1:{sandbox.api_port}/")
    yield opened
    context.close()


def sign_in(page: Any) -> None:
    page.fill("#login-token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#app", state="visible")
    page.wait_for_selector("#connection.live")


def job_row(page: Any, job: str) -> Any:
    return page.locator(f'#jobs tr[data-job="{job}"]')


def run_card(page: Any, job: str) -> Any:
    return page.locator(f'#runs .run-card[data-job="{job}"]').first


class TestSignIn:
    def test_login_form_is_shown_first(self, page: Any) -> None:
        page.wait_for_selector("#login", state="visible")
        assert page.is_hidden("#app")

    def test_wrong_token_is_rejected(self, page: Any) -> None:
        page.fill("#login-token", "wrong")
        page.click("#login-form button[type=submit]")
        playwright_sync.expect(page.locator("#login-error")).to_contain_text("wrong")

    def test_jobs_are_listed_after_sign_in(self, page: Any) -> None:
        sign_in(page)
        for job in JOBS:
            playwright_sync.expect(job_row(page, job)).to_be_visible()
        playwright_sync.expect(job_row(page, "greeting")).to_contain_text(
            "at 00:00 on day 1 of the month in January in 2099 (UTC)"
        )

    def test_runtime_settings_are_shown(self, page: Any) -> None:
        sign_in(page)
        playwright_sync.expect(page.locator("#maintenance")).to_have_text("maintenance: off")
        playwright_sync.expect(page.locator("#debug")).to_have_text("debug: off")


class TestRuns:
    def test_output_appears_while_the_run_runs(self, page: Any) -> None:
        sign_in(page)
        job_row(page, "countdown").locator("button.run-now").click()
        card = run_card(page, "countdown")
        output = card.locator('.machine[data-machine="minion-1"] pre.output')
        playwright_sync.expect(output).to_contain_text("step 2")
        running_then = card.locator(".run-head .status").inner_text()
        text_then = output.inner_text()
        playwright_sync.expect(card.locator(".run-head .status")).to_have_text(
            "succeeded", timeout=STEP_MS
        )
        assert running_then == "running"
        assert "step 6" not in text_then
        assert output.inner_text() == "".join(f"step {number}\n" for number in range(1, 7))

    def test_kill_button_gives_143(self, page: Any) -> None:
        sign_in(page)
        job_row(page, "sleeper").locator("button.run-now").click()
        card = run_card(page, "sleeper")
        pane = card.locator('.machine[data-machine="minion-2"]')
        playwright_sync.expect(pane.locator("pre.output")).to_contain_text("started")
        card.locator("button.kill").click()
        playwright_sync.expect(pane.locator(".retcode")).to_have_text("143 (killed)")
        playwright_sync.expect(card.locator(".run-head .status")).to_have_text("failed")

    def test_run_now_starts_a_run_on_every_minion(self, page: Any) -> None:
        sign_in(page)
        job_row(page, "greeting").locator("button.run-now").click()
        playwright_sync.expect(page.locator("#toasts")).to_contain_text(
            re.compile(r"job 'greeting' started as run greeting_\d+ on 3 minion\(s\)")
        )
        card = run_card(page, "greeting")
        playwright_sync.expect(card.locator(".run-head .status")).to_have_text("succeeded")
        for number in range(1, MINIONS + 1):
            machine = f"minion-{number}"
            pane = card.locator(f'.machine[data-machine="{machine}"]')
            playwright_sync.expect(pane.locator("pre.output")).to_have_text(
                f"hello from {machine}\n"
            )
            playwright_sync.expect(pane.locator(".retcode")).to_have_text("0 (exit)")

    def test_history_shows_stored_output(self, page: Any) -> None:
        sign_in(page)
        job_row(page, "greeting").locator("button.run-now").click()
        playwright_sync.expect(
            run_card(page, "greeting").locator(".run-head .status")
        ).to_have_text("succeeded")
        job_row(page, "greeting").locator("button.history").click()
        page.locator("#history tbody tr").first.click()
        pane = page.locator('#run-detail .machine[data-machine="minion-3"]')
        playwright_sync.expect(pane.locator("pre.output")).to_have_text("hello from minion-3\n")
