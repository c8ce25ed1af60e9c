"""The HTML report: one self-contained file an analyst can open offline.

Built once per module from a small real scores dataset (MTD tile images with
their ground-truth masks, two categories, error rows, one image deleted after
scoring), then checked as text and, when Chromium is installed, as a page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scores_data import ScoresDataset, build_scores_dataset, upload
from uflow_batch import report
from uflow_batch.scores.dataset import open_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOP_N = 24


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> ScoresDataset:
    return build_scores_dataset(tmp_path_factory.mktemp("scores") / "scores")


@pytest.fixture(scope="module")
def built(scores, tmp_path_factory) -> tuple[report.ReportSummary, str, Path]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    summary = report.build_report(str(scores.root), str(out), top_n=TOP_N)
    return summary, out.read_text(encoding="utf-8"), out


def cards(page: str) -> list[dict]:
    """The gallery cards in page order: rank, uri, thumbnail bytes (or None) and note."""
    found = []
    for match in re.finditer(r'<figure class="card" data-rank="(\d+)" data-uri="([^"]*)">(.*?)</figure>', page, re.S):
        body = match.group(3)
        image = re.search(r'<img src="data:image/jpeg;base64,([^"]+)"', body)
        note = re.search(r'<p class="note">(.*?)</p>', body, re.S)
        found.append({
            "rank": int(match.group(1)),
            "uri": html.unescape(match.group(2)),
            "thumbnail": base64.b64decode(image.group(1)) if image else None,
            "note": html.unescape(note.group(1)) if note else None,
        })
    return found


def figures(page: str) -> dict[str, dict]:
    blocks = re.finditer(r'<script type="application/json" class="figure-data" data-target="([^"]+)">(.*?)</script>', page, re.S)
    return {m.group(1): json.loads(m.group(2)) for m in blocks}


def red_pixels(jpeg: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 170) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


def expected_top(scores: ScoresDataset, n: int) -> list[dict]:
    return sorted(scores.scored(), key=lambda r: -r["image_score"])[:n]


# --- the file ------------------------------------------------------------------------------

def test_report_is_one_self_contained_file(built):
    _, page, _ = built
    assert page.startswith("<!DOCTYPE html>")
    # The markup itself; inlined plotly.js holds URLs in code paths (maps, logo) this page never runs.
    markup = re.sub(r"<script\b([^>]*)>.*?</script>", r"<script\1></script>", page, flags=re.S)
    assert not re.search(r"<script[^>]+\bsrc=", markup), "scripts must be inlined"
    assert not re.search(r"<link\b", markup), "no external stylesheets or icons"
    assert not re.search(r'''(src|href)\s*=\s*["']?\s*(https?:)?//''', markup, re.I), "nothing is loaded over the network"
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", markup, re.I)
    image_sources = re.findall(r'<img src="([^"]{0,30})', page)
    assert image_sources and all(src.startswith("data:image/jpeg;base64,") for src in image_sources)
    assert "Plotly.newPlot" in page and "</script>" not in report._plotly_js()


def test_summary_counts_every_row_of_the_dataset(built, scores):
    summary, _, out = built
    rows = scores.rows
    assert summary.out_path == str(out) and summary.size_bytes == out.stat().st_size
    assert summary.n_images == len(rows) == 43
    assert summary.n_errors == sum(r["error"] is not None for r in rows) == 4
    assert summary.n_scored == len(scores.scored())
    assert summary.n_anomalous == sum(r["is_anomalous"] for r in scores.scored())
    assert summary.categories == ("tile", "tile_glazed")
    assert summary.run_dates == ("2026-11-20", "2026-11-21")
    assert summary.top_images == TOP_N and summary.unreadable_images == 1


def test_report_stays_small(built):
    """plotly.js (~4.8 MB) plus summaries and downscaled thumbnails, never the raw data."""
    summary, page, _ = built
    thumbnails = [c["thumbnail"] for c in cards(page) if c["thumbnail"]]
    assert max(len(t) for t in thumbnails) < 30_000
    assert summary.size_bytes < len(report._plotly_js()) + 500_000


# --- the gallery ---------------------------------------------------------------------------

def test_gallery_shows_the_top_n_scores_in_order(built, scores):
    _, page, _ = built
    shown = cards(page)
    assert [c["rank"] for c in shown] == list(range(1, TOP_N + 1))
    assert [c["uri"] for c in shown] == [r["image_uri"] for r in expected_top(scores, TOP_N)]
    errored = {r["image_uri"] for r in scores.rows if r["error"]}
    assert not errored & {c["uri"] for c in shown}


def test_each_card_names_category_score_nfa_and_area(built, scores):
    _, page, _ = built
    first_readable = expected_top(scores, 2)[1]
    card = page[page.index(f'data-uri="{html.escape(first_readable["image_uri"])}"'):]
    card = card[: card.index("</figure>")]
    assert f"<dd>{first_readable['category']}</dd>" in card
    assert f"{first_readable['image_score']:.4f}" in card
    assert f"{first_readable['max_neg_log10_nfa']:.1f}" in card
    assert f"{first_readable['defect_area_px']} px" in card


def test_thumbnails_overlay_the_mask_in_red_only_where_there_is_a_defect(built, scores):
    _, page, _ = built
    truth = {r["image_uri"]: r for r in scores.scored()}
    shown = [c for c in cards(page) if c["note"] is None]
    defective = [c for c in shown if truth[c["uri"]]["defect_area_px"] > 0]
    clean = [c for c in shown if truth[c["uri"]]["defect_area_px"] == 0]
    assert defective and clean
    for card in defective:
        assert red_pixels(card["thumbnail"]) > 0, card["uri"]
        row = truth[card["uri"]]
        width, height = Image.open(io.BytesIO(card["thumbnail"])).size
        assert max(width, height) == min(report.THUMBNAIL_MAX_SIDE, max(row["width"], row["height"]))
    for card in clean:
        assert red_pixels(card["thumbnail"]) == 0, card["uri"]


def test_an_image_deleted_after_scoring_gets_a_placeholder_with_its_mask(built, scores):
    _, page, _ = built
    card = next(c for c in cards(page) if c["uri"] == scores.missing_uri)
    assert card["rank"] == 1
    assert "original image unavailable" in card["note"]
    assert red_pixels(card["thumbnail"]) > 0  # the mask alone, on grey


# --- the figures ---------------------------------------------------------------------------

def test_defect_rate_figure_has_one_line_per_category_with_nightly_rates(built, scores):
    _, page, _ = built
    traces = {t["name"]: t for t in figures(page)["fig-defect-rate"]["data"]}
    assert set(traces) == {"tile", "tile_glazed"}
    groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row in scores.scored():
        groups[row["category"], row["run_date"]].append(row["is_anomalous"])
    for category, trace in traces.items():
        expected = {d: sum(v) / len(v) for (c, d), v in groups.items() if c == category}
        assert dict(zip(trace["x"], trace["y"])) == pytest.approx(expected)


def test_error_figure_counts_errors_per_category_and_code(built, scores):
    _, page, _ = built
    figure = figures(page)["fig-errors"]
    shown = Counter()
    for trace in figure["data"]:
        for category, count in zip(trace["x"], trace["y"]):
            shown[category, trace["name"]] += count
    expected = Counter((r["category"], r["error"]) for r in scores.rows if r["error"])
    assert +shown == expected


def test_distribution_figures_summarise_each_category(built, scores):
    _, page, _ = built
    found = figures(page)
    for figure_id, column, keep in [
        ("fig-score-box", "image_score", lambda r: True),
        ("fig-defect-area", "defect_area_px", lambda r: r["is_anomalous"]),
    ]:
        traces = {t["name"]: t for t in found[figure_id]["data"]}
        assert set(traces) == {"tile", "tile_glazed"}, figure_id
        for category, trace in traces.items():
            values = np.array([r[column] for r in scores.scored() if r["category"] == category and keep(r)], dtype=float)
            assert trace["median"] == [pytest.approx(np.median(values), rel=1e-6)], (figure_id, category)
            assert trace["q1"][0] <= trace["median"][0] <= trace["q3"][0]
    histogram = {t["name"]: sum(t["y"]) for t in found["fig-score-histogram"]["data"]}
    assert histogram == dict(Counter(r["category"] for r in scores.scored()))


def test_a_card_with_an_undecodable_mask_still_shows_the_image(scores):
    row = {**expected_top(scores, 2)[1], "__filename": "unused"}
    card = report.gallery_card(7, row, b"\x89PNG but truncated")
    assert card.note == "mask unreadable" and card.thumbnail_uri.startswith("data:image/jpeg;base64,")
    assert red_pixels(base64.b64decode(card.thumbnail_uri.split(",", 1)[1])) == 0


def test_a_card_with_neither_image_nor_mask_has_no_thumbnail(scores):
    row = {**expected_top(scores, 1)[0], "__filename": "unused"}
    card = report.gallery_card(1, row, None)
    assert card.thumbnail_uri is None and "original image unavailable" in card.note
    assert (card.rank, card.image_uri, card.image_score) == (1, scores.missing_uri, pytest.approx(0.99))


# --- reading -------------------------------------------------------------------------------

def test_summary_read_leaves_the_heavy_mask_column_behind(scores):
    table = report.read_summary(open_dataset(str(scores.root)))
    assert "mask_png" not in table.column_names and "regions" not in table.column_names
    assert table.num_rows == len(scores.rows)


def test_filters_restrict_the_report_to_partitions(scores, tmp_path):
    glazed = report.build_report(str(scores.root), str(tmp_path / "a.html"), categories=["tile_glazed"])
    assert glazed.categories == ("tile_glazed",)
    assert glazed.n_images == sum(r["category"] == "tile_glazed" for r in scores.rows)
    first_night = report.build_report(str(scores.root), str(tmp_path / "b.html"), run_dates=["2026-11-20"], top_n=3)
    assert first_night.run_dates == ("2026-11-20",) and first_night.top_images == 3
    assert first_night.n_images == sum(r["run_date"] == "2026-11-20" for r in scores.rows)
    page = (tmp_path / "b.html").read_text()
    assert "filtered to run_date in 2026-11-20" in page


def test_an_empty_dataset_gives_a_report_that_says_so(tmp_path):
    (tmp_path / "scores").mkdir()
    summary = report.build_report(str(tmp_path / "scores"), str(tmp_path / "empty.html"))
    page = (tmp_path / "empty.html").read_text()
    assert (summary.n_images, summary.top_images, summary.categories) == (0, 0, ())
    assert 'id="empty-dataset"' in page
    assert "Plotly" not in page and summary.size_bytes < 20_000


def test_a_dataset_url_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.build_report(str(tmp_path / "typo"), str(tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()


def test_a_dataset_on_s3_gives_the_same_report(built, scores, s3_bucket_url, tmp_path):
    local_summary, local_page, _ = built
    root = upload(scores.root, f"{s3_bucket_url}/scores")
    summary = report.build_report(root, str(tmp_path / "s3.html"), top_n=TOP_N)
    page = (tmp_path / "s3.html").read_text()
    assert (summary.n_images, summary.n_anomalous, summary.n_errors, summary.categories, summary.run_dates) == (
        local_summary.n_images, local_summary.n_anomalous, local_summary.n_errors,
        local_summary.categories, local_summary.run_dates,
    )
    assert [(c["uri"], c["thumbnail"]) for c in cards(page)] == [(c["uri"], c["thumbnail"]) for c in cards(local_page)]
    assert figures(page) == figures(local_page)


# --- thumbnails ----------------------------------------------------------------------------

def test_render_thumbnail_downscales_and_keeps_a_one_pixel_crack_visible():
    image = np.full((600, 900, 3), 128, dtype=np.uint8)
    mask = np.zeros((600, 900), dtype=bool)
    mask[100:500, 450] = True  # a one-pixel-wide vertical crack
    thumbnail = Image.open(io.BytesIO(report.render_thumbnail(image, mask, max_side=256)))
    assert thumbnail.size == (256, 171)
    rgb = np.asarray(thumbnail.convert("RGB")).astype(int)
    crack_column = rgb[40:135, 126:131]
    assert (crack_column[..., 0] > 170).any(axis=1).all(), "every row of the crack is still red"
    assert np.abs(rgb[:, :100] - 128).max() < 12, "away from the defect the image is unchanged"


def test_render_thumbnail_of_a_mask_alone_draws_it_on_grey():
    mask = np.zeros((100, 50), dtype=bool)
    mask[10:20, 10:20] = True
    jpeg = report.render_thumbnail(None, mask)
    thumbnail = Image.open(io.BytesIO(jpeg))
    assert thumbnail.size == (50, 100)  # never upscaled
    rgb = np.asarray(thumbnail.convert("RGB")).astype(int)
    assert red_pixels(jpeg) >= 30, "the outline is solid red"
    inside, outside = rgb[15, 15], rgb[60, 30]
    assert inside[0] > inside[1] + 60, "the inside is tinted red"
    assert abs(outside - 48).max() < 12, "the rest is plain grey"


# --- in a real browser -----------------------------------------------------------------------

def test_report_renders_in_headless_chromium_without_console_errors(built, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/system-deps.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives Chromium for this test")
    _, _, out = built
    console, page_errors, outside_requests = [], [], []
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh, empty profile
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda message: console.append((message.type, message.text)))
            page.on("pageerror", lambda error: page_errors.append(str(error)))

            def only_local(route):
                if not route.request.url.startswith(("file:", "data:")):
                    outside_requests.append(route.request.url)
                    return route.abort()
                return route.continue_()

            page.route("**/*", only_local)
            page.goto(out.as_uri(), wait_until="load")
            page.wait_for_selector("svg.main-svg", timeout=20_000)
            plots = page.locator(".plot-container").count()
            svgs = page.locator("svg.main-svg").count()
            traces_drawn = page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d.data.length)")
            decoded = page.evaluate(
                "Array.from(document.querySelectorAll('#top-images img')).filter(i => i.complete && i.naturalWidth > 0).length"
            )
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    shutil.copy(screenshot, "/tmp/report-screenshot.png")
    assert page_errors == []
    assert [text for kind, text in console if kind == "error"] == []
    assert outside_requests == []
    assert plots == len(figures(out.read_text())) == 5
    assert svgs >= plots and all(n > 0 for n in traces_drawn)
    assert decoded == TOP_N
    with Image.open(screenshot) as shot:
        assert shot.size[0] == 1400
