"""One self-contained HTML report of a scores dataset, for QA analysts and morning stand-ups.

The report is a single file that opens anywhere, offline and behind any proxy:
Plotly's JavaScript is inlined and every thumbnail is a base64 data URI, so it
can be mailed, attached to a ticket or archived next to the night's results.

Its size must not grow with the dataset: distributions are summarised here
(box-plot statistics, histogram counts) and only those numbers go into the
page; only the top-N images get a thumbnail, and only their ``mask_png``
values are ever read from storage (the mask column is by far the heaviest).

The dataset is read with ``pyarrow.dataset`` through the filesystem that
:func:`uflow_batch.storage.filesystem` hands out, so a local directory and an
``s3://`` prefix behave the same.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image, ImageFilter

from . import __version__, storage
from .data import decode_image, decode_mask
from .pipelines.schema import CURRENT_ROW_COLUMNS, ERROR_CODES, PARTITION_COLUMNS, RESULT_SCHEMA, current_rows

log = logging.getLogger(__name__)

# Everything the charts and the ranking need; deliberately not mask_png or regions.
SUMMARY_COLUMNS = (
    "category",
    "run_date",
    "image_uri",
    "image_score",
    "max_neg_log10_nfa",
    "is_anomalous",
    "defect_area_px",
    "defect_area_fraction",
    "error",
)
THUMBNAIL_MAX_SIDE = 256
OVERLAY_ALPHA = 0.45
OVERLAY_RGB = (255, 0, 0)
HISTOGRAM_BINS = 30
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_ERROR_PALETTE = ("#8c564b", "#d62728", "#7f7f7f", "#9467bd")  # in ERROR_CODES order
_IMAGE_READ_WORKERS = 4  # each holds one full-resolution decoded image


@dataclass(frozen=True)
class ReportSummary:
    """What went into a report: enough for the CLI to print a one-line result."""

    out_path: str
    n_images: int  # rows in the selected partitions, errors included
    n_scored: int  # rows without an error
    n_anomalous: int
    n_errors: int
    categories: tuple[str, ...]
    run_dates: tuple[str, ...]
    top_images: int  # thumbnails shown
    unreadable_images: int  # top images whose original could not be read (placeholder shown)
    size_bytes: int


@dataclass(frozen=True)
class TopImage:
    """One card of the "most anomalous" gallery."""

    rank: int
    category: str
    run_date: str
    image_uri: str
    image_score: float
    max_neg_log10_nfa: float | None
    defect_area_px: int | None
    defect_area_fraction: float | None
    thumbnail_uri: str | None  # data: URI, None when neither image nor mask could be shown
    note: str | None  # why the card is incomplete (image gone, mask unreadable)


# --- reading ---------------------------------------------------------------------------------

def open_scores(scores_url: str) -> ds.Dataset:
    """The scores dataset with hive partitions typed as in :data:`RESULT_SCHEMA`.

    Partition values stay strings (``run_date`` is ``YYYY-MM-DD`` text), as the
    schema module documents; an existing directory with no files is an empty
    dataset, a URL that does not exist is an error (most likely a typo).
    """
    if not storage.exists(scores_url):
        raise FileNotFoundError(f"scores dataset {storage.redact(scores_url)} does not exist")
    fs, path = storage.filesystem(scores_url)
    partitioning = ds.partitioning(
        pa.schema([RESULT_SCHEMA.field(name) for name in PARTITION_COLUMNS]), flavor="hive"
    )
    return ds.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning, schema=RESULT_SCHEMA)


def _partition_filter(categories: Iterable[str] | None, run_dates: Iterable[str | date] | None) -> ds.Expression | None:
    expression = None
    for column, values in (("category", categories), ("run_date", run_dates)):
        if values is None:
            continue
        condition = ds.field(column).isin([str(v) for v in values])
        expression = condition if expression is None else expression & condition
    return expression


def read_summary(
    dataset: ds.Dataset,
    categories: Iterable[str] | None = None,
    run_dates: Iterable[str | date] | None = None,
) -> pa.Table:
    """The light columns of the current row of each selected image and night, plus ``__filename`` to find its mask later."""
    return read_current(dataset, [*SUMMARY_COLUMNS, "__filename"], _partition_filter(categories, run_dates))


def read_current(dataset: ds.Dataset, columns: Sequence[str], partition_filter: ds.Expression | None = None,
                 use_threads: bool = True) -> pa.Table:
    """``columns`` of the current row of each image and night (:func:`~uflow_batch.pipelines.schema.current_rows`).

    A night may hold several rows of one image (an error, then the score of
    its re-run); every count a reader shows takes one. ``partition_filter``
    selects partitions before the choice, so it should name partition columns only.
    """
    wanted = list(dict.fromkeys([*columns, *CURRENT_ROW_COLUMNS]))
    table = dataset.to_table(columns=wanted, filter=partition_filter, use_threads=use_threads)
    return current_rows(table).select(list(columns))


def read_masks(dataset: ds.Dataset, rows: Sequence[dict]) -> dict[tuple[str, str], bytes | None]:
    """``mask_png`` of just these rows, keyed by (file, image_uri).

    Each file holding a top image is opened once, and the row-group statistics
    of ``image_uri`` let Parquet skip the row groups that hold none of them.
    """
    by_file: dict[str, set[str]] = {}
    for row in rows:
        by_file.setdefault(row["__filename"], set()).add(row["image_uri"])
    masks: dict[tuple[str, str], bytes | None] = {}
    for filename, uris in by_file.items():
        try:
            part = ds.dataset(filename, filesystem=dataset.filesystem, format="parquet")
            table = part.to_table(columns=["image_uri", "mask_png"], filter=ds.field("image_uri").isin(sorted(uris)))
        except (OSError, pa.ArrowException) as exc:  # e.g. the file was replaced since the summary read
            log.warning("report: masks of %s unreadable: %s", storage.redact(filename), storage.redact(str(exc)))
            continue
        for uri, mask in zip(table.column("image_uri").to_pylist(), table.column("mask_png").to_pylist()):
            masks.setdefault((filename, uri), mask)
    return masks


# --- figures (plain Plotly JSON: the page needs plotly.js only, not plotly.py) -----------------

def _colors(categories: Sequence[str]) -> dict[str, str]:
    """A fixed colour per category, so one category looks the same in every chart."""
    return {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(categories)}


def _scored(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("error")))


def category_rows(table: pa.Table) -> list[dict]:
    """Per-category totals for the summary table at the top of the report."""
    rows = []
    for category in sorted(set(table.column("category").to_pylist())):
        part = table.filter(pc.equal(table.column("category"), category))
        scored = _scored(part)
        anomalous = int(pc.sum(scored.column("is_anomalous")).as_py() or 0)
        dates = sorted(set(part.column("run_date").to_pylist()))
        rows.append({
            "category": category,
            "images": part.num_rows,
            "scored": scored.num_rows,
            "anomalous": anomalous,
            "defect_rate": anomalous / scored.num_rows if scored.num_rows else None,
            "errors": part.num_rows - scored.num_rows,
            "nights": len(dates),
            "last_night": dates[-1] if dates else None,
        })
    return rows


def defect_rate_figure(table: pa.Table, colors: dict[str, str]) -> dict:
    """Share of scored images flagged anomalous, per category and night (one line per category)."""
    scored = _scored(table)
    grouped = scored.group_by(["category", "run_date"]).aggregate([("is_anomalous", "sum"), ("is_anomalous", "count")])
    data = []
    for category in colors:
        part = grouped.filter(pc.equal(grouped.column("category"), category)).sort_by("run_date")
        if part.num_rows == 0:
            continue
        anomalous = part.column("is_anomalous_sum").to_pylist()
        counts = part.column("is_anomalous_count").to_pylist()
        data.append({
            "type": "scatter",
            "mode": "lines+markers",
            "name": category,
            "x": part.column("run_date").to_pylist(),
            "y": [a / n if n else None for a, n in zip(anomalous, counts)],
            "customdata": [[a, n] for a, n in zip(anomalous, counts)],
            "hovertemplate": "%{x}<br>%{y:.1%} (%{customdata[0]} of %{customdata[1]})<extra>" + category + "</extra>",
            "line": {"color": colors[category]},
        })
    layout = {
        "title": {"text": "Defect rate per night"},
        "xaxis": {"title": {"text": "run date"}, "type": "category"},
        "yaxis": {"title": {"text": "anomalous / scored"}, "tickformat": ".0%", "rangemode": "tozero"},
    }
    return {"data": data, "layout": layout}


def error_figure(table: pa.Table) -> dict | None:
    """Errored images per category, one bar colour per error code; None when nothing failed."""
    errors = table.filter(pc.is_valid(table.column("error")))
    if errors.num_rows == 0:
        return None
    grouped = errors.group_by(["category", "error"]).aggregate([("image_uri", "count")])
    categories = sorted(set(grouped.column("category").to_pylist()))
    known = list(ERROR_CODES)
    codes = sorted(set(grouped.column("error").to_pylist()), key=lambda c: (c not in known, known.index(c) if c in known else 0, c))
    data = []
    for code in codes:
        part = grouped.filter(pc.equal(grouped.column("error"), code))
        counts = dict(zip(part.column("category").to_pylist(), part.column("image_uri_count").to_pylist()))
        color = _ERROR_PALETTE[known.index(code) % len(_ERROR_PALETTE)] if code in known else "#7f7f7f"
        data.append({
            "type": "bar", "name": code, "x": categories, "y": [counts.get(c, 0) for c in categories],
            "marker": {"color": color}, "hovertemplate": "%{x}: %{y} images<extra>" + code + "</extra>",
        })
    tallest = max(sum(trace["y"][i] for trace in data) for i in range(len(categories)))
    layout = {
        "title": {"text": "Errored images per category"},
        "barmode": "stack",
        "xaxis": {"title": {"text": "category"}, "type": "category"},
        # whole images only: no 0.5 ticks on small counts
        "yaxis": {"title": {"text": "images"}, "rangemode": "tozero", **({"dtick": 1} if tallest <= 10 else {})},
    }
    return {"data": data, "layout": layout}


def box_statistics(values: np.ndarray) -> dict:
    """Tukey box-plot numbers, computed here so the page carries 6 numbers, not every value."""
    q1, median, q3 = (float(v) for v in np.quantile(values, [0.25, 0.5, 0.75]))
    iqr = q3 - q1
    inside = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    return {
        "q1": q1,
        "median": median,
        "q3": q3,
        "lowerfence": float(inside.min()),
        "upperfence": float(inside.max()),
        "mean": float(values.mean()),
        "n": int(values.size),
    }


def _values(table: pa.Table, column: str) -> np.ndarray:
    """Finite values of a column as float64 (nulls and NaN dropped: they have no place on an axis)."""
    array = table.column(column).drop_null()
    values = array.to_numpy().astype(np.float64) if len(array) else np.empty(0)
    return values[np.isfinite(values)]


def score_histogram_figure(table: pa.Table, colors: dict[str, str]) -> dict:
    """Image-score histogram per category on shared bins, so the shapes compare."""
    scored = _scored(table)
    all_scores = _values(scored, "image_score")
    low, high = (float(all_scores.min()), float(all_scores.max())) if all_scores.size else (0.0, 1.0)
    if high <= low:
        high = low + 1e-6
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    centers, width = ((edges[:-1] + edges[1:]) / 2).tolist(), float(edges[1] - edges[0])
    data = []
    for category in colors:
        values = _values(scored.filter(pc.equal(scored.column("category"), category)), "image_score")
        if values.size == 0:
            continue
        counts, _ = np.histogram(values, bins=edges)
        data.append({
            "type": "bar", "name": category, "x": centers, "y": counts.tolist(), "width": width,
            "opacity": 0.6, "marker": {"color": colors[category]},
            "hovertemplate": "score %{x:.3f}: %{y} images<extra>" + category + "</extra>",
        })
    layout = {
        "title": {"text": "Image score distribution"},
        "barmode": "overlay",
        "xaxis": {"title": {"text": "image_score"}},
        "yaxis": {"title": {"text": "images"}},
    }
    return {"data": data, "layout": layout}


def _box_trace(category: str, stats: dict, color: str) -> dict:
    return {
        "type": "box", "name": category, "x": [category], "marker": {"color": color},
        **{key: [stats[key]] for key in ("q1", "median", "q3", "lowerfence", "upperfence", "mean")},
        "hovertemplate": f"{category} (n={stats['n']})<extra></extra>",
    }


def _box_figure(table: pa.Table, colors: dict[str, str], column: str, title: str, yaxis: dict) -> dict:
    """One box per category from precomputed statistics (the page stays small however many rows)."""
    data = []
    for category in colors:
        values = _values(table.filter(pc.equal(table.column("category"), category)), column)
        if values.size:
            data.append(_box_trace(category, box_statistics(values), colors[category]))
    layout = {"title": {"text": title}, "showlegend": False, "xaxis": {"type": "category"}, "yaxis": yaxis}
    return {"data": data, "layout": layout}


def score_box_figure(table: pa.Table, colors: dict[str, str]) -> dict:
    return _box_figure(_scored(table), colors, "image_score", "Image score per category",
                       {"title": {"text": "image_score"}})


def defect_area_figure(table: pa.Table, colors: dict[str, str]) -> dict:
    """Defect area of the anomalous images per category (normal images have area 0 and would hide it)."""
    scored = _scored(table)
    anomalous = scored.filter(pc.fill_null(scored.column("is_anomalous"), False))
    return _box_figure(anomalous, colors, "defect_area_px", "Defect area of anomalous images",
                       {"title": {"text": "defect_area_px (pixels)"}, "type": "log"})


def render_thumbnail(
    image: np.ndarray | None,
    mask: np.ndarray | None,
    max_side: int = THUMBNAIL_MAX_SIDE,
) -> bytes:
    """JPEG thumbnail of an RGB image with its defect mask overlaid in translucent red.

    The mask is downscaled by area (BOX) and any touched pixel counts, so a
    one-pixel crack stays visible at thumbnail size; the outline is drawn in
    solid red on top. Without the image, the mask is drawn on dark grey.
    """
    if image is None and mask is None:
        raise ValueError("render_thumbnail needs an image or a mask")
    height, width = image.shape[:2] if image is not None else mask.shape
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image is not None:
        base = Image.fromarray(image, "RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    else:
        base = Image.new("RGB", size, (48, 48, 48))
    pixels = np.asarray(base, dtype=np.float32)
    if mask is not None and mask.any():
        small = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.BOX)
        covered = np.asarray(small) > 0
        eroded = np.asarray(Image.fromarray(covered.astype(np.uint8) * 255, "L").filter(ImageFilter.MinFilter(3))) > 0
        red = np.array(OVERLAY_RGB, dtype=np.float32)
        pixels[covered] = (1 - OVERLAY_ALPHA) * pixels[covered] + OVERLAY_ALPHA * red
        pixels[covered & ~eroded] = red
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, format="JPEG", quality=82, optimize=True)
    return out.getvalue()


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def gallery_card(rank: int, row: dict, mask_png: bytes | None) -> TopImage:
    """One gallery card for a summary row; a missing image or a bad mask gives a note, never an exception."""
    notes = []
    image = mask = None
    try:
        image = decode_image(storage.read_bytes(row["image_uri"]))
    except Exception as exc:  # noqa: BLE001 - any failure means "show a placeholder"
        log.warning("report: image %s unreadable: %s", storage.redact(row["image_uri"]), storage.redact(str(exc)))
        notes.append(f"original image unavailable ({type(exc).__name__})")
    if mask_png:
        try:
            mask = decode_mask(mask_png)
        except Exception as exc:  # noqa: BLE001
            log.warning("report: mask of %s undecodable: %s", storage.redact(row["image_uri"]), exc)
            notes.append("mask unreadable")
    thumbnail = _data_uri(render_thumbnail(image, mask)) if image is not None or mask is not None else None
    return TopImage(
        rank=rank,
        category=row["category"],
        run_date=row["run_date"],
        image_uri=row["image_uri"],
        image_score=float(row["image_score"]),
        max_neg_log10_nfa=row["max_neg_log10_nfa"],
        defect_area_px=row["defect_area_px"],
        defect_area_fraction=row["defect_area_fraction"],
        thumbnail_uri=thumbnail,
        note="; ".join(notes) or None,
    )


def top_rows(table: pa.Table, top_n: int) -> list[dict]:
    """The ``top_n`` scored rows by image_score (ties: higher max -log10 NFA, then URI)."""
    scored = _scored(table)
    scored = scored.filter(pc.is_finite(scored.column("image_score")))  # NaN would sort first
    if top_n <= 0 or scored.num_rows == 0:
        return []
    order = pc.sort_indices(
        scored,
        sort_keys=[("image_score", "descending"), ("max_neg_log10_nfa", "descending"), ("image_uri", "ascending")],
    )
    return scored.take(order[:top_n]).to_pylist()


def top_images(dataset: ds.Dataset, table: pa.Table, top_n: int) -> list[TopImage]:
    rows = top_rows(table, top_n)
    masks = read_masks(dataset, rows) if rows else {}
    with ThreadPoolExecutor(max_workers=max(1, min(_IMAGE_READ_WORKERS, len(rows)))) as pool:
        futures = [
            pool.submit(gallery_card, rank, row, masks.get((row["__filename"], row["image_uri"])))
            for rank, row in enumerate(rows, start=1)
        ]
        return [future.result() for future in futures]


# --- page ------------------------------------------------------------------------------------

def _script_json(value: object) -> str:
    """JSON that is safe inside a <script> element (no "</script>" can close it early)."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>uflow-batch report: {{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px; padding: 1rem 2rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: .9rem; } code, .uri { font-family: ui-monospace, Menlo, Consolas, monospace; }
table.totals { border-collapse: collapse; } table.totals th, table.totals td { padding: .25rem .7rem; border-bottom: 1px solid #eee; text-align: right; }
table.totals th:first-child, table.totals td:first-child { text-align: left; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 1rem; }
.figure { min-height: 380px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 1rem; }
.card { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; background: #fafafa; }
.card img { display: block; max-width: 100%; margin: 0 auto; image-rendering: auto; }
.card dl { display: grid; grid-template-columns: max-content 1fr; gap: 0 .5rem; font-size: .85rem; margin: .4rem 0 0; }
.card dt { color: #666; } .card dd { margin: 0; }
.uri { font-size: .75rem; word-break: break-all; color: #444; }
.placeholder { height: 160px; display: flex; align-items: center; justify-content: center; background: #eee; color: #888; text-align: center; }
.note { color: #a15c00; font-size: .8rem; } .empty { padding: 2rem; background: #f5f5f5; border-radius: 6px; }
</style>
{% if figures %}<script>{{ plotly_js|safe }}</script>{% endif %}
</head>
<body>
<h1>Visual inspection report</h1>
<p class="meta">Scores: <code>{{ scores_url }}</code>{% if filters %} &middot; filtered to {{ filters }}{% endif %}
 &middot; generated {{ generated_at }} by uflow-batch {{ version }}</p>
{% if not n_images %}
<p class="empty" id="empty-dataset">No scored images found in this dataset{% if filters %} for the selected categories and nights{% endif %}.</p>
{% else %}
<p>{{ n_images }} images over {{ run_dates|length }} night(s) ({{ run_dates|first }} &ndash; {{ run_dates|last }}):
 {{ n_scored }} scored, {{ n_anomalous }} flagged anomalous, {{ n_errors }} errored.</p>
<table class="totals" id="category-totals">
<thead><tr><th>category</th><th>images</th><th>scored</th><th>anomalous</th><th>defect rate</th><th>errors</th><th>nights</th><th>last night</th></tr></thead>
<tbody>
{% for row in category_rows %}<tr><td>{{ row.category }}</td><td>{{ row.images }}</td><td>{{ row.scored }}</td><td>{{ row.anomalous }}</td>
<td>{{ "%.1f%%"|format(100 * row.defect_rate) if row.defect_rate is not none else "&ndash;"|safe }}</td><td>{{ row.errors }}</td><td>{{ row.nights }}</td><td>{{ row.last_night }}</td></tr>
{% endfor %}</tbody>
</table>
<h2>Trends and distributions</h2>
<div class="figures">
{% for figure in figures %}<div class="figure" id="{{ figure.id }}"></div>
<script type="application/json" class="figure-data" data-target="{{ figure.id }}">{{ figure.json|safe }}</script>
{% endfor %}</div>
{% if not has_errors %}<p id="no-errors">No errored images.</p>{% endif %}
<h2>Top {{ top|length }} most anomalous images</h2>
<p class="meta">Ranked by image_score over all selected categories and nights. Red: the defect mask of flagged images (pixels with NFA &lt; &epsilon;).</p>
<div class="gallery" id="top-images">
{% for item in top %}<figure class="card" data-rank="{{ item.rank }}" data-uri="{{ item.image_uri }}">
{% if item.thumbnail_uri %}<img src="{{ item.thumbnail_uri }}" alt="#{{ item.rank }} {{ item.image_uri }}">{% else %}<div class="placeholder">no image</div>{% endif %}
{% if item.note %}<p class="note">{{ item.note }}</p>{% endif %}
<dl><dt>rank</dt><dd>#{{ item.rank }}</dd><dt>category</dt><dd>{{ item.category }}</dd><dt>night</dt><dd>{{ item.run_date }}</dd>
<dt>score</dt><dd>{{ "%.4f"|format(item.image_score) }}</dd>
<dt>max &minus;log<sub>10</sub> NFA</dt><dd>{{ "%.1f"|format(item.max_neg_log10_nfa) if item.max_neg_log10_nfa is not none else "&ndash;"|safe }}</dd>
<dt>defect area</dt><dd>{% if item.defect_area_px is not none %}{{ item.defect_area_px }} px{% if item.defect_area_fraction is not none %} ({{ "%.2f"|format(100 * item.defect_area_fraction) }}%){% endif %}{% else %}&ndash;{% endif %}</dd></dl>
<p class="uri" title="{{ item.image_uri }}">{{ item.image_uri }}</p>
</figure>
{% endfor %}</div>
{% endif %}
{% if figures %}<script>
document.querySelectorAll("script.figure-data").forEach(function (node) {
  var figure = JSON.parse(node.textContent);
  Plotly.newPlot(node.dataset.target, figure.data, figure.layout, {responsive: true, displaylogo: false});
});
</script>{% endif %}
</body>
</html>
""")


def _figures(table: pa.Table) -> list[dict]:
    categories = sorted(set(table.column("category").to_pylist()))
    colors = _colors(categories)
    candidates = [
        ("fig-defect-rate", defect_rate_figure(table, colors)),
        ("fig-errors", error_figure(table)),
        ("fig-score-histogram", score_histogram_figure(table, colors)),
        ("fig-score-box", score_box_figure(table, colors)),
        ("fig-defect-area", defect_area_figure(table, colors)),
    ]
    return [{"id": fid, "json": _script_json(fig)} for fid, fig in candidates if fig is not None and fig["data"]]


def build_report(
    scores_url: str,
    out_path: str,
    top_n: int = 24,
    categories: Iterable[str] | None = None,
    run_dates: Iterable[str | date] | None = None,
) -> ReportSummary:
    """Write one self-contained HTML report of ``scores_url`` to ``out_path`` (local or object storage).

    ``categories`` and ``run_dates`` (``YYYY-MM-DD``) restrict the report to
    those partitions; None means all of them.
    """
    categories = None if categories is None else list(categories)
    run_dates = None if run_dates is None else [str(d) for d in run_dates]
    dataset = open_scores(scores_url)
    table = read_summary(dataset, categories, run_dates)
    scored = _scored(table)
    n_anomalous = int(pc.sum(scored.column("is_anomalous")).as_py() or 0) if scored.num_rows else 0
    top = top_images(dataset, table, top_n) if table.num_rows else []
    filters = "; ".join(
        f"{name} in {', '.join(values)}" for name, values in (("category", categories), ("run_date", run_dates)) if values is not None
    )
    found_categories = tuple(sorted(set(table.column("category").to_pylist())))
    found_dates = tuple(sorted(set(table.column("run_date").to_pylist())))
    figures = _figures(table) if table.num_rows else []
    counts = {"n_images": table.num_rows, "n_scored": scored.num_rows, "n_anomalous": n_anomalous,
              "n_errors": table.num_rows - scored.num_rows}
    html = _TEMPLATE.render(
        title=", ".join(found_categories) or "no data",
        scores_url=storage.redact(scores_url),
        filters=filters,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        **counts,
        run_dates=found_dates,
        category_rows=category_rows(table),
        figures=figures,
        has_errors=table.num_rows > scored.num_rows,
        top=top,
        plotly_js=_plotly_js() if figures else "",
    )
    data = html.encode("utf-8")
    storage.write_bytes_atomic(out_path, data)
    summary = ReportSummary(
        out_path=out_path,
        **counts,
        categories=found_categories,
        run_dates=found_dates,
        top_images=len(top),
        unreadable_images=sum(1 for item in top if item.note and "image unavailable" in item.note),
        size_bytes=len(data),
    )
    log.info(
        "report %s: %d images (%d anomalous, %d errors), %d thumbnails, %.1f MB",
        out_path, summary.n_images, summary.n_anomalous, summary.n_errors, summary.top_images, summary.size_bytes / 1e6,
    )
    return summary


def _plotly_js() -> str:
    """plotly.js from the plotly package, for inlining (imported late: only reports need it)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
