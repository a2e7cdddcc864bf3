"""End to end in a real browser: headless Chromium (Debian's package) driven by Playwright.

Clicks through what a new user does: the explainer; the offline default (the bundled trained pair when ``assets/``
holds it, its fixed settings disabled) on a synthetic sample → the input beside both attention maps with colour
scales, every head, the classes and the true label; another model, whose status follows by itself; a refused
reduction and a refused layout, named in the status; the twin's download; the Cost tab with the ToMe baseline and
the ideal speed-up; the Segmentation tab (the bundled segmenters' masks, ToMe's on request, their speed); the
Fine-tune tab's time estimate and its field-named refusals; a tiny fine-tune → live curves → finished; a page reload
that loses nothing; its model compared with its teacher; the Compactors tab; a long fine-tune, cancelled.
Screenshots go to ``test-artifacts/`` (or ``$CAIT_TEST_ARTIFACTS``).
"""
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from cait.io.bundled import bundled_pair
from cait.studio.ui.finetune_tab import BUNDLED_FINETUNE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed "
                                "(the README's test command installs it)")
ARTIFACTS = Path(os.environ.get("CAIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import app
    from cait.studio.jobs.manager import JobManager
    from cait.studio.engine import Studio
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


def _pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in the Gradio dropdown ``#elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_click_through_attention_finetune_and_compare(app_url):
    from playwright.sync_api import expect, sync_playwright

    from cait.studio.ui.finetune_tab import FINETUNE_MODELS
    from cait.models.deit import TEST_MODEL
    tiny = next(k for k, v in FINETUNE_MODELS.items() if v == TEST_MODEL)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = last = time.time()
    laps: dict[str, float] = {}

    def lap(name: str) -> None:                  # where the test's time goes, section by section
        nonlocal last
        laps[name], last = round(time.time() - last, 1), time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(app_url, wait_until="domcontentloaded")
        body, status = page.locator("body"), page.locator("#status")
        expect(body).to_contain_text("CAIT twin", timeout=120_000)
        bundled = bundled_pair() is not None
        if bundled:                             # offline (conftest), so the trained pair is the default
            expect(status).to_contain_text("bundled weights trained by this project", timeout=60_000)
            # A fine-tuned twin: its reduction and layout are fixed, and the controls say so.
            expect(page.locator("#reduction input")).to_be_disabled()

        lap("page load")
        # What am I looking at: a short explainer with the field's terms.
        page.get_by_text("What am I looking at?").click()
        expect(body).to_contain_text("head-level consistency")
        page.screenshot(path=str(ARTIFACTS / "0-explainer.png"))

        # Attention: the input next to both head-mean maps (with colour scales), every head, the classes and the
        # true label of a synthetic sample; blocks numbered from 0.
        expect(page.get_by_text("Block (from 0", exact=False)).to_be_visible()
        page.get_by_role("button", name="Show CLS attention").click()
        maps = page.locator("img[src*='gradio_api/file']")
        expect(maps.nth(2)).to_be_visible(timeout=120_000)
        expect(body).to_contain_text("Classes:", timeout=60_000)
        # One colour scale for both head-mean maps by default, and the page says which scale is shown.
        expect(body).to_contain_text("Colour scale: shared by both maps")
        if bundled:
            expect(body).to_contain_text("Attention inside the object:")
            expect(body).to_contain_text("True label:")
            expect(page.get_by_text("head 2", exact=True).first).to_be_attached()     # all 3 heads of each model
        page.screenshot(path=str(ARTIFACTS / "1-attention.png"), full_page=True)

        lap("attention")
        # Stale state: another model updates the status by itself; an edited reduction says it needs a build; a bad
        # one is refused by name in the status, not clamped, and leaves no error badge behind.
        _pick(page, "model", "DeiT-Tiny")
        expect(status).to_contain_text("deit_tiny_patch16_224", timeout=120_000)
        expect(page.locator("#reduction input")).to_be_enabled()
        page.locator("#reduction input").fill("1.5")
        page.locator("#reduction input").press("Tab")
        expect(status).to_contain_text("Settings changed", timeout=30_000)
        page.get_by_role("button", name="Build CAIT twin").click()
        expect(status).to_contain_text("Total FLOPs reduction: 1.5 is outside 0.05 to 0.8", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "2-refused-reduction.png"))
        page.locator("#reduction input").fill("0.5")
        page.get_by_role("button", name="Build CAIT twin").click()
        expect(status).to_contain_text("fewer", timeout=120_000)
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)

        # Layout errors list every problem and survive HTML.
        page.locator("#merge textarea, #merge input").first.fill("x4,h2,v2")
        page.get_by_role("button", name="Build CAIT twin").click()
        expect(status).to_contain_text("'x4' is not hN or vN; block 2 is named twice", timeout=60_000)
        page.locator("#merge textarea, #merge input").first.fill("")

        # The twin downloads as a checkpoint.
        page.get_by_role("button", name="Build CAIT twin").click()
        expect(status).to_contain_text("fewer", timeout=120_000)
        page.get_by_role("button", name="Download the twin (safetensors + config.json)").click()
        expect(page.locator("#twin-file")).to_contain_text(".zip", timeout=120_000)

        lap("model switch, builds, download")
        # A ViT beyond DeiT (issue "CAIT for the ViTs people compress today"): DeiT III-S with LayerScale, its twin
        # built by itself, both attention maps; the Cost tab below measures this pair.
        from cait.studio.catalogue import CURATED
        _pick(page, "model", CURATED["deit3_small_patch16_224"])
        expect(status).to_contain_text("deit3_small_patch16_224", timeout=180_000)
        expect(status).to_contain_text("fewer", timeout=180_000)
        page.get_by_role("tab", name="Attention").click()
        page.get_by_role("button", name="Show CLS attention").click()
        expect(page.get_by_text("head 5", exact=True).first).to_be_attached(timeout=120_000)   # DeiT III-S: 6 heads
        expect(body).to_contain_text("ImageNet-1k (1000)")
        page.screenshot(path=str(ARTIFACTS / "2b-deit3-attention.png"), full_page=True)
        lap("DeiT III: twin and attention")
        # Cost: ideal speed-up beside the measured one with its spread, the ToMe baseline, the small-batch note.
        page.get_by_role("tab", name="Cost").click()
        expect(body).to_contain_text("Small batches leave the processor partly idle")
        page.locator("#cost-batch input[type='number']").fill("8")     # the test's time goes to what it asserts
        page.locator("#cost-batch input[type='number']").press("Tab")
        page.get_by_role("button", name="Compute cost").click()
        expect(body).to_contain_text("ideal speed-up", timeout=180_000)
        expect(body).to_contain_text("ToMe (baseline)", timeout=180_000)
        expect(page.locator("#cost-table")).to_contain_text(re.compile(r"1\.00 \(1\.00–1\.00\)"), timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "3-cost.png"), full_page=True)

        lap("cost")
        # Segmentation: the bundled segmenters' masks beside the true one, ToMe's (merges undone) on request.
        page.get_by_role("tab", name="Segmentation").click()
        expect(body).to_contain_text("Per-class IoU")
        if (Path(__file__).resolve().parents[1] / "assets" / "segmenters" / "cait" / "segmenter.json").is_file():
            page.get_by_role("button", name="Segment", exact=True).click()
            expect(page.locator("#seg-cait img").first).to_be_visible(timeout=120_000)
            expect(page.locator("#seg-original img").first).to_be_visible()
            page.get_by_label("ToMe (merges undone)").check()
            page.get_by_role("button", name="Segment", exact=True).click()
            expect(page.locator("#seg-tome img").first).to_be_visible(timeout=120_000)
            page.get_by_role("button", name="Measure speed").click()
            expect(body).to_contain_text("latency, batch 1 (ms)", timeout=180_000)
            expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "3b-segmentation.png"), full_page=True)

        lap("segmentation")
        # Fine-tune: bad inputs refused at submit with the field named; a model's time estimate, which then follows
        # the form from the step times measured (a changed step count needs no new timing).
        page.get_by_role("tab", name="Fine-tune").click()
        _pick(page, "ft-model", tiny)
        page.get_by_role("button", name="Estimate time").click()
        estimate = page.locator("#ft-estimate")
        expect(estimate).to_contain_text("Estimated time on this", timeout=180_000)
        first = estimate.inner_text()
        page.locator("#ft-steps input").fill("40")
        page.locator("#ft-steps input").press("Tab")
        expect(estimate).not_to_have_text(first, timeout=30_000)
        expect(estimate).to_contain_text(re.compile(r"Estimated time on this .*about"))
        page.locator("#ft-steps input").fill("-5")
        page.get_by_role("button", name="Start fine-tune").click()
        expect(body).to_contain_text("Steps: -5 is not a whole number from 1 to", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "4-refused-steps.png"))
        page.locator("#ft-data textarea").fill("/nowhere")
        page.locator("#ft-steps input").fill("30")
        page.get_by_role("button", name="Start fine-tune").click()
        expect(body).to_contain_text("Data: /nowhere: expected an ImageFolder root", timeout=30_000)
        page.locator("#ft-data textarea").fill("synthetic")

        lap("estimate and refusals")
        # A tiny job, live curves, finished.
        _pick(page, "ft-model", tiny)
        page.get_by_role("button", name="Start fine-tune").click()
        expect(body).to_contain_text(re.compile(r"running on cpu · step [1-9]"), timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "5-finetune-running.png"))
        expect(body).to_contain_text(re.compile(r"— done on cpu"), timeout=240_000)
        expect(page.locator("#curves .js-plotly-plot")).to_be_visible()
        job_id = page.locator("#job input").input_value()

        lap("tiny fine-tune job")
        # A reload loses nothing: the job is selected again and its model is in the Model list.
        page.reload(wait_until="domcontentloaded")
        expect(page.locator("#status")).to_contain_text("CAIT twin", timeout=120_000)
        page.get_by_role("tab", name="Fine-tune").click()
        expect(page.locator("#job input")).to_have_value(job_id, timeout=60_000)
        page.locator("#model input").click()
        expect(page.get_by_role("option", name=re.compile(f"job {job_id}"))).to_be_visible(timeout=30_000)
        page.keyboard.press("Escape")
        page.screenshot(path=str(ARTIFACTS / "6-after-reload.png"))

        # Its model, compared with its teacher: the status follows without pressing Build.
        page.get_by_role("button", name="Compare its model in the other tabs").click()
        expect(page.locator("#status")).to_contain_text(f"fine-tuned by job {job_id}", timeout=60_000)
        page.get_by_role("tab", name="Attention").click()
        page.get_by_role("button", name="Show CLS attention").click()
        expect(body).to_contain_text(re.compile(r"\b(circle|ring|square|diamond|triangle|cross|star|hexagon)\b"),
                                     timeout=60_000)
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "7-job-model-attention.png"), full_page=True)

        # The same pair in the Channels tab (blocks from 0).
        page.get_by_role("tab", name="Channels").click()
        page.get_by_role("button", name="Show retained channels").click()
        expect(body).to_contain_text("retained channels per block", timeout=60_000)

        # Compactors of that job: units against rows explained, and the CDCP-vs-global contrast.
        page.get_by_role("tab", name="Compactors").click()
        page.get_by_role("button", name="Show compactors of the selected job").click()
        expect(body).to_contain_text("Plain global selection", timeout=60_000)
        expect(body).to_contain_text("compactor rows, since a q/k unit is a pair of rows")
        page.screenshot(path=str(ARTIFACTS / "8-compactors.png"), full_page=True)

        lap("reload, compare, channels, compactors")
        # That job's twin segmented by a background job (python -m cait.dense); its masks in the Segmentation tab.
        page.get_by_role("tab", name="Fine-tune").click()
        page.get_by_text("Train a segmenter (Semantic FPN) as a background job").click()
        _pick(page, "seg-backbone", f"fine-tune job {job_id}")
        page.locator("#seg-steps input").fill("12")
        page.get_by_role("button", name="Start segmentation").click()
        expect(page.locator("#job-status")).to_contain_text(re.compile(r"Segmentation job \S+ — done on cpu"),
                                                           timeout=240_000)
        expect(body).to_contain_text("held-out mIoU")
        seg_job = page.locator("#job input").input_value()
        page.screenshot(path=str(ARTIFACTS / "8b-segmentation-job.png"), full_page=True)
        page.get_by_role("tab", name="Segmentation").click()
        page.locator("#seg-job input").click()
        page.get_by_role("option", name=re.compile(f"job {seg_job}")).click()
        page.get_by_role("button", name="Segment", exact=True).click()
        expect(page.locator("#seg-job-mask img").first).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "8c-job-segmenter.png"), full_page=True)

        lap("segmentation job")
        # Label-free: the bundled original teaches its calibrated twin on the bundled photos (no labels exist).
        page.get_by_role("tab", name="Fine-tune").click()
        if bundled:
            _pick(page, "ft-model", next(iter(BUNDLED_FINETUNE)))
            _pick(page, "ft-targets", "the original's predictions (no labels needed)")
            page.locator("#ft-data textarea").fill("photos")
            page.locator("#ft-steps input").fill("4")
            page.locator("#ft-calibrate input").fill("16")          # the form's label-free sizes: a small job
            page.locator("#ft-held-out input").fill("32")
            page.get_by_role("button", name="Start fine-tune").click()
            # The selected job is the new one (not the segmentation job before it) and it finished.
            expect(page.locator("#job-status")).to_contain_text(re.compile(r"Fine-tune job \S+ — done on cpu"),
                                                               timeout=300_000)
            expect(page.locator("#job-status")).to_contain_text("agreement with the teacher", timeout=30_000)
            # What a label-free job did: pruned before training (no compactors, so |S| stays 0 by design), its
            # held-out scores with their n, and the Compactors tab shows its kept channels instead of an error.
            expect(page.locator("#job-status")).to_contain_text("pruned before training")
            expect(page.locator("#job-status")).to_contain_text("(n = 32)")
            page.screenshot(path=str(ARTIFACTS / "8d-label-free-job.png"), full_page=True)
            page.get_by_role("tab", name="Compactors").click()
            page.get_by_role("button", name="Show compactors of the selected job").click()
            expect(body).to_contain_text("started from a calibrated twin", timeout=60_000)
            expect(page.get_by_text("Error", exact=True)).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "8e-label-free-compactors.png"), full_page=True)
            page.get_by_role("tab", name="Fine-tune").click()
            _pick(page, "ft-targets", "the data's labels")
            page.locator("#ft-data textarea").fill("synthetic")

        lap("label-free job")
        # A long job, cancelled: the app says what was kept.
        _pick(page, "ft-model", tiny)                      # the reload brought back the default model
        page.locator("#ft-steps input").fill("1000")
        page.get_by_role("button", name="Start fine-tune").click()
        try:
            expect(body).to_contain_text(re.compile(r"running on cpu · step [1-9]"), timeout=120_000)
        finally:
            page.screenshot(path=str(ARTIFACTS / "9a-long-job.png"))
        page.get_by_role("button", name="Cancel job").click()
        expect(body).to_contain_text("cancelled at step", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "9-cancelled.png"))
        lap("long job, cancelled")
        browser.close()
    (ARTIFACTS / "browser-test-seconds.json").write_text(json.dumps({"total": round(time.time() - t0, 1), **laps}))
