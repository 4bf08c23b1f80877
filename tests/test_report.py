"""The report page on a full, validated dataset and on an ingest-only one, checked in headless Chromium: every
image decodes, the sections exist and say what a dataset engineer looks for (funnel, validation results with
the action taken, rejected and quarantined examples, guard pass rates, translation QE, object classes, OCR text
and boxes, stage timings), and a hostile alt-text is shown as text, never run."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from test_publish import HOSTILE, QUALITY, add_stages, copy_raw, leaked_caption, make_store

from infra.settings import DatasetSpec, ScoreConfig
from infra.store import LocalStore
from tasks.report import thresholds, write_report
from tasks.shards import stage_key

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECTIONS = ["Overview", "Funnel", "Validation", "Rejected and quarantined", "Caption guards", "Translation QE",
            "Status and errors", "Scores", "Filters", "Languages", "OCR coverage", "Objects", "Caption length",
            "Gallery", "Stage timings"]
LEAK_CHECK = "expect_column_values_to_not_match_regex_list(caption_dense)"
NSFW_CHECK = "expect_column_values_to_be_between(nsfw)"


def _plant(store: LocalStore, dataset: str, stage: str, shard: int, **values) -> dict:
    """Set `values` on the first ok row of a stage's shard; returns the row."""
    key = stage_key(dataset, stage, shard, "parquet")
    table = store.get_parquet(key)
    rows = table.to_pylist()
    row = next(r for r in rows if r["status"] == "ok")
    row.update(values)
    store.put_parquet(key, pa.Table.from_pylist(rows, table.schema))
    return row


def validated(store: LocalStore, dataset: str) -> dict:
    """Dataset `dataset` (every stage) validated in quarantine mode with two defects: a dense caption that leaks
    the prompt template (it falls back alone) and an NSFW score out of range (its sample is quarantined)."""
    from tasks.validate import publish_data_docs, validate_shard, write_summary

    copy_raw(store, "bare", dataset)
    add_stages(store, dataset, [0, 1, 2])
    leaked = _plant(store, dataset, "fuse", 0, caption_dense=leaked_caption(), dense_passed=True, dense_reasons=[])
    unsafe = _plant(store, dataset, "score", 1, nsfw=1.5)
    spec = DatasetSpec(name=dataset, score=QUALITY)
    for suite, shard in (("fuse", 0), ("score", 1)):
        validate_shard(store.uri, dataset, suite, shard, spec)
    write_summary(store, dataset, spec.validation, ["fuse", "score"], [])
    publish_data_docs(store.uri, dataset, ["fuse", "score"])
    return {"leaked": leaked, "unsafe": unsafe}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("report"))
    store.planted = validated(store, "checked")
    return store


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
                sections: Object.fromEntries([...document.querySelectorAll('section')].map(
                    s => [s.id, s.innerText])),
                links: [...document.querySelectorAll('a')].map(a => a.getAttribute('href')),
                images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
                scripts: document.scripts.length,
                ran: window.__scripts_ran,
                text: document.body.innerText,
            })""")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {**seen, "dialogs": dialogs}


def test_report_of_a_full_validated_dataset(store, tmp_path):
    leaked, unsafe = store.planted["leaked"], store.planted["unsafe"]
    result = write_report(store, "checked", DatasetSpec(name="checked", score=QUALITY))
    page_path = Path(result["path"])
    text = page_path.read_text()
    assert result["key"] == "checked/report/index.html" and all(result["sections"].values())
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in text
    assert "stage not run" not in text
    seen = check_in_chromium(page_path, tmp_path / "checked.png")
    assert seen["headings"] == SECTIONS
    # 11 plots (status, errors, 3 score histograms, 2 language bars, OCR, length, filters, funnel, objects,
    # timings) and thumbnails of the gallery and the rejected examples.
    assert len(seen["images"]) >= 20 and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    assert seen["dialogs"] == [] and seen["ran"] == 0 and seen["scripts"] == 0
    assert HOSTILE in seen["text"]  # shown as the text it is
    s = seen["sections"]
    # Every section is linked from the top; the overview links to the validation results.
    assert all(f"#{name}" in seen["links"] for name in s) and "validation" in s
    assert "0 of 2 suite-shards passed; 1 rows quarantined, 1 captions back to the alt-text" in s["overview"]

    # The funnel: 8 in, each gate's loss, ending at the selected count.
    assert "samples in (ingested shards)\t8" in s["funnel"] and "downloaded (status ok)\t7\t1" in s["funnel"]
    assert "not quarantined by validation\t3\t1" in s["funnel"]
    assert f"selected\t{result['selected']}" in s["funnel"] and result["selected"] == 3

    # Validation, readable offline: each failed expectation with examples, rows and the action taken.
    assert f"{LEAK_CHECK.split('(')[0]}\tcaption_dense\t1" in s["validation"]
    assert f"{leaked['key']}\tcaption fallback" in s["validation"]
    assert f"{unsafe['key']}\tquarantine" in s["validation"] and "1.5" in s["validation"]
    assert leaked_caption()[:40] in s["validation"] and "network connection" in s["validation"]
    assert "../validate/data_docs/index.html" in seen["links"]
    assert (page_path.parent / "../validate/data_docs/index.html").resolve().is_file()

    # Rejected and quarantined examples, each with its reason.
    rejected = s["rejected-and-quarantined"]
    assert "quarantined: 1 sample fails it" in rejected and f"score: {NSFW_CHECK}" in rejected
    assert "status: 1 sample fails it" in rejected and "http_404" in rejected and "duplicate of" in rejected
    assert "clip_short = 0.150" in rejected

    # Guard pass rates per caption kind (the leaked dense caption went back to the alt-text), translation QE per
    # language, object classes, stage timings.
    assert "short\t7\t7\t100%\t0\t7" in s["caption-guards"] and "dense\t7\t7\t100%\t1\t6" in s["caption-guards"]
    assert "es\tcaption_short\t1\t0\t0\t1\t0%" in s["translation-qe"]
    assert "pt\tcaption_short\t7\t6\t1\t0\t86%" in s["translation-qe"]
    assert "cat\t6\t6" in s["objects"] and "6 of 7 downloaded images have a detection" in s["objects"]
    assert "ingest\t3/3\t8\terror 1, ok 7" in s["stage-timings"] and "report (this page)" in s["stage-timings"]
    assert "validate\t2 suite-shards" in s["stage-timings"]

    # The gallery: OCR text, and the boxes drawn on the thumbnails.
    assert "OCR: STOP" in s["gallery"] and "objects: cat x1" in s["gallery"]
    assert "filtered: clip_short_min" in s["gallery"] and "selected" in s["gallery"]
    assert (tmp_path / "checked.png").stat().st_size > 10_000


def test_thumbnails_carry_the_boxes():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from tasks.report_html import thumbnail

    data = io.BytesIO()
    Image.new("RGB", (400, 300), "white").save(data, "PNG")

    def orange_and_cyan(b64: str) -> tuple[int, int]:
        px = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)
        orange = (px[..., 0] > 200) & (abs(px[..., 1] - 127) < 40) & (px[..., 2] < 80)
        cyan = (px[..., 0] < 60) & (px[..., 1] > 150) & (px[..., 2] > 200)
        return int(orange.sum()), int(cyan.sum())

    plain = orange_and_cyan(thumbnail(data.getvalue()))
    boxed = orange_and_cyan(thumbnail(data.getvalue(), [{"label": "cat", "box": [40, 30, 360, 270]}],
                                      [{"text": "STOP", "box": [[10, 10], [200, 10], [200, 50], [10, 50]]}]))
    assert plain == (0, 0) and boxed[0] > 300 and boxed[1] > 100
    # Boxes are in the original image's pixels (here 800 x 600; the stored copy is 400 x 300) and are scaled with
    # the image to the 192 px thumbnail: x 80..720 lands near 19..173.
    for box, frame in (([40, 30, 360, 270], None), ([80, 60, 720, 540], (800, 600))):
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbnail(
            data.getvalue(), [{"label": "", "box": box}], frame=frame)))).convert("RGB")).astype(int)
        columns = np.flatnonzero(((image[..., 0] > 200) & (image[..., 2] < 80)).any(axis=0))
        assert abs(columns.min() - 19) <= 2 and abs(columns.max() - 173) <= 2, frame


def test_the_funnel_ends_at_the_selected_samples(store):
    from tasks.publish import select_samples
    from tasks.report_sections import funnel

    table, counts = select_samples(store, "checked", DatasetSpec(name="checked", score=QUALITY))
    steps = funnel(table, counts)
    assert steps[0] == ("in", 8, 0) and steps[-1][0] == "quarantined" and steps[-1][1] == counts["selected"]
    assert sum(lost for _, _, lost in steps) == 8 - counts["selected"]


def test_report_of_an_ingest_only_dataset_says_which_stages_did_not_run(store, tmp_path):
    result = write_report(store, "bare", DatasetSpec(name="bare"))
    text = Path(result["path"]).read_text()
    for stage in ("Score", "Translate", "Extract (OCR)", "Fuse", "Validate", "Extract (objects)"):
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
