"""End to end in a real browser: headless Chromium (Debian's package) driven by Playwright.

Clicks through: the offline default (the bundled trained pair when ``assets/`` holds it) on a synthetic sample →
both attention maps and their localisation; a tiny fine-tune → live curves → finished → its model is
selected and compared with its teacher in the Attention, Channels and Cost tabs; the Compactors tab; a long
fine-tune, cancelled. Screenshots go to ``test-artifacts/`` (or
``$CAIT_TEST_ARTIFACTS``).
"""
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from cait.bundled import bundled_pair

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed "
                                "(the README's test command installs it)")
ARTIFACTS = Path(os.environ.get("CAIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import app
    from cait.jobs import JobManager
    from cait.studio import Studio
    jobs = JobManager(tmp_path_factory.mktemp("runs"), poll_interval=0.5)
    studio = Studio(device="cpu", pretrained=True, jobs=jobs)
    demo = app.build_app(studio, poll_s=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        for job in jobs.list():                # jobs outlive their app by design; not a test's
            if job.status in ("queued", "running"):
                jobs.cancel(job.id)


def test_click_through_attention_finetune_and_compare(app_url):
    from playwright.sync_api import expect, sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(app_url, wait_until="domcontentloaded")
        body = page.locator("body")
        expect(body).to_contain_text("CAIT twin", timeout=120_000)
        bundled = bundled_pair() is not None
        if bundled:                             # offline (conftest), so the trained pair is the default
            expect(body).to_contain_text("bundled weights trained by this project", timeout=60_000)

        # Attention: the default sample (a held-out synthetic one with the bundled pair), both maps.
        page.get_by_role("button", name="Show CLS attention").click()
        maps = page.locator("img[src*='gradio_api/file']")
        expect(maps.nth(1)).to_be_visible(timeout=120_000)
        if bundled:
            expect(body).to_contain_text("Attention inside the object:", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "1-attention.png"))

        # Fine-tune: a tiny job, live curves, finished.
        page.get_by_role("tab", name="Fine-tune").click()
        steps = page.get_by_label("Steps")
        steps.fill("80")
        page.get_by_role("button", name="Start fine-tune").click()
        expect(body).to_contain_text(re.compile(r"running on cpu · step [1-9]"), timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "2-finetune-running.png"))
        expect(body).to_contain_text(re.compile(r"— done on cpu"), timeout=240_000)
        expect(page.locator(".js-plotly-plot").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "3-finetune-done.png"))

        # Its model, compared with its teacher in the Attention tab.
        page.get_by_role("button", name="Compare its model in the other tabs").click()
        page.get_by_role("tab", name="Attention").click()
        page.get_by_role("button", name="Build CAIT twin").click()
        expect(body).to_contain_text("fine-tuned with CDCP", timeout=60_000)
        page.get_by_role("button", name="Show CLS attention").click()
        expect(body).to_contain_text(re.compile(r"\b(circle|ring|square|diamond|triangle|cross|star|hexagon)\b"),
                                     timeout=60_000)
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "4-job-model-attention.png"))

        # The same pair in the Channels and Cost tabs.
        page.get_by_role("tab", name="Channels").click()
        page.get_by_role("button", name="Show retained channels").click()
        expect(body).to_contain_text("retained channels per block", timeout=60_000)
        page.get_by_role("tab", name="Cost").click()
        page.get_by_role("button", name="Compute cost").click()
        expect(body).to_contain_text("images/s", timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "4b-job-model-cost.png"))

        # Compactors of that job.
        page.get_by_role("tab", name="Compactors").click()
        page.get_by_role("button", name="Show compactors of the selected job").click()
        expect(body).to_contain_text("Plain global selection", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "5-compactors.png"), full_page=True)

        # A long job, cancelled: the app says what was kept.
        page.get_by_role("tab", name="Fine-tune").click()
        page.get_by_label("Steps").fill("100000")
        page.get_by_role("button", name="Start fine-tune").click()
        try:
            expect(body).to_contain_text(re.compile(r"running on cpu · step [1-9]"), timeout=120_000)
        finally:
            page.screenshot(path=str(ARTIFACTS / "6a-long-job.png"))
        page.get_by_role("button", name="Cancel job").click()
        expect(body).to_contain_text("cancelled at step", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "6-cancelled.png"))
        browser.close()
    (ARTIFACTS / "browser-test-seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
