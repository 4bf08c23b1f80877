"""The report page on a full and an ingest-only dataset, checked in headless Chromium: every image decodes, the
sections exist, and a hostile alt-text is shown as text, never run."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_publish import HOSTILE, QUALITY, make_store

from infra.settings import DatasetSpec, ScoreConfig
from tasks.report import thresholds, write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECTIONS = ["Overview", "Status and errors", "Scores", "Languages", "OCR coverage", "Caption length", "Filters",
            "Gallery"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("report"))


def check_in_chromium(page_path: Path, screenshot: Path) -> dict:
    """Open the page in headless Chromium; returns what it saw: headings, images (loaded or not), dialogs and
    whether any script ran, the visible text. Saves a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.add_init_script("window.__scripts_ran = 0; window.alert = () => { window.__scripts_ran += 1; };")
            page.goto(page_path.as_uri(), wait_until="load")
            seen = page.evaluate("""() => ({
                headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
                images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
                scripts: document.scripts.length,
                ran: window.__scripts_ran,
                text: document.body.innerText,
            })""")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {**seen, "dialogs": dialogs}


def test_report_of_a_full_dataset(store, tmp_path):
    result = write_report(store, "full", DatasetSpec(name="full", score=QUALITY))
    page_path = Path(result["path"])
    text = page_path.read_text()
    assert result["key"] == "full/report/index.html" and all(result["sections"].values())
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in text
    assert "stage not run" not in text
    seen = check_in_chromium(page_path, tmp_path / "full.png")
    assert seen["headings"] == SECTIONS
    # 8 plots (status, errors, 3 score histograms, 2 language bars, OCR, length, filters) and 7 thumbnails.
    assert len(seen["images"]) >= 15 and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    assert seen["dialogs"] == [] and seen["ran"] == 0 and seen["scripts"] == 0
    assert HOSTILE in seen["text"]  # shown as the text it is
    assert "filtered: clip_short_min" in seen["text"] and "selected" in seen["text"]
    assert (tmp_path / "full.png").stat().st_size > 10_000


def test_report_of_an_ingest_only_dataset_says_which_stages_did_not_run(store, tmp_path):
    result = write_report(store, "bare", DatasetSpec(name="bare"))
    text = Path(result["path"]).read_text()
    for stage in ("Score", "Translate", "Extract (OCR)", "Fuse"):
        assert f"{stage} stage not run." in text, stage
    assert not result["sections"]["Scores"] and not result["sections"]["OCR coverage"]
    assert result["sections"]["Gallery"] and result["selected"] == 6
    seen = check_in_chromium(Path(result["path"]), tmp_path / "bare.png")
    assert seen["headings"] == SECTIONS and seen["dialogs"] == [] and seen["ran"] == 0
    assert all(i["width"] > 0 for i in seen["images"]) and HOSTILE in seen["text"]


def test_thresholds_follow_the_filters():
    import pyarrow as pa

    table = pa.table({"clip_short": pa.array([0.1, 0.4, 0.3, None, 0.2], pa.float32())})
    cfg = ScoreConfig(filters=ScoreConfig.Filters(clip_min="laion", clip_top_percent={"short": 50},
                                                  nsfw_max=0.5))
    lines = thresholds(cfg, table)
    assert lines["clip_alt"] == [("LAION min (English)", 0.28), ("LAION min (other)", 0.26)]
    assert lines["clip_short"][0][0] == "top 50% cut-off" and lines["clip_short"][0][1] == pytest.approx(0.3)
    assert lines["nsfw"] == [("max 0.5", 0.5)]


@pytest.mark.slow
def test_report_flow_on_a_local_cluster(store):
    from flows.stage import run_stage

    result = run_stage("report", DatasetSpec(name="bare", store=store.uri), workers=1)
    assert Path(result["path"]).is_file() and result["samples"] == 8
