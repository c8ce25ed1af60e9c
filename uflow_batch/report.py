"""One self-contained HTML report of a scores dataset, for QA analysts and morning stand-ups.

The report is a single file that opens anywhere, offline and behind any proxy:
Plotly's JavaScript is inlined and every thumbnail is a base64 data URI, so it
can be mailed, attached to a ticket or archived next to the night's results.

Its size must not grow with the dataset: distributions are summarised here
(box-plot statistics, histogram counts) and only those numbers go into the
page; only the top-N images get a thumbnail, and only their ``mask_png``
values are ever read from storage (the mask column is by far the heaviest).

The dataset is opened with :func:`uflow_batch.scores.dataset.open_dataset`,
so the report sees it exactly as every other reader does, on a local directory
or an ``s3://`` prefix alike.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone

import jinja2
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image, ImageFilter
from plotly.basedatatypes import BaseTraceType

from . import __version__, storage
from .config import REPORT_TOP_N
from .data import decode_image, decode_mask
from .scores.dataset import open_dataset, read_current
from .scores.schema import ERROR_CODES

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


# --- figures (plotly.graph_objects; the page carries their JSON and draws it with plotly.js) -----

def _colors(categories: Sequence[str]) -> dict[str, str]:
    """A fixed colour per category, so one category looks the same in every chart."""
    return {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(categories)}


def _figure(traces: Sequence[BaseTraceType], title: str, **layout: object) -> go.Figure:
    """A figure on plotly.js's own defaults: template "none" keeps the page's look and spares
    every chart the ~7 KB default template plotly.py would otherwise embed."""
    return go.Figure(data=list(traces), layout=go.Layout(template="none", title={"text": title}, **layout))


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


def defect_rate_figure(table: pa.Table, colors: dict[str, str]) -> go.Figure:
    """Share of scored images flagged anomalous, per category and night (one line per category)."""
    scored = _scored(table)
    grouped = scored.group_by(["category", "run_date"]).aggregate([("is_anomalous", "sum"), ("is_anomalous", "count")])
    traces = []
    for category in colors:
        part = grouped.filter(pc.equal(grouped.column("category"), category)).sort_by("run_date")
        if part.num_rows == 0:
            continue
        anomalous = part.column("is_anomalous_sum").to_pylist()
        counts = part.column("is_anomalous_count").to_pylist()
        traces.append(go.Scatter(
            mode="lines+markers",
            name=category,
            x=part.column("run_date").to_pylist(),
            y=[a / n if n else None for a, n in zip(anomalous, counts)],
            customdata=[[a, n] for a, n in zip(anomalous, counts)],
            hovertemplate="%{x}<br>%{y:.1%} (%{customdata[0]} of %{customdata[1]})<extra>" + category + "</extra>",
            line={"color": colors[category]},
        ))
    return _figure(
        traces, "Defect rate per night",
        xaxis={"title": {"text": "run date"}, "type": "category"},
        yaxis={"title": {"text": "anomalous / scored"}, "tickformat": ".0%", "rangemode": "tozero"},
    )


def error_figure(table: pa.Table) -> go.Figure | None:
    """Errored images per category, one bar colour per error code; None when nothing failed."""
    errors = table.filter(pc.is_valid(table.column("error")))
    if errors.num_rows == 0:
        return None
    grouped = errors.group_by(["category", "error"]).aggregate([("image_uri", "count")])
    categories = sorted(set(grouped.column("category").to_pylist()))
    known = list(ERROR_CODES)
    codes = sorted(set(grouped.column("error").to_pylist()), key=lambda c: (c not in known, known.index(c) if c in known else 0, c))
    traces, columns = [], []
    for code in codes:
        part = grouped.filter(pc.equal(grouped.column("error"), code))
        counts = dict(zip(part.column("category").to_pylist(), part.column("image_uri_count").to_pylist()))
        column = [counts.get(c, 0) for c in categories]
        columns.append(column)
        color = _ERROR_PALETTE[known.index(code) % len(_ERROR_PALETTE)] if code in known else "#7f7f7f"
        traces.append(go.Bar(
            name=code, x=categories, y=column,
            marker={"color": color}, hovertemplate="%{x}: %{y} images<extra>" + code + "</extra>",
        ))
    tallest = max(sum(stack) for stack in zip(*columns))
    return _figure(
        traces, "Errored images per category",
        barmode="stack",
        xaxis={"title": {"text": "category"}, "type": "category"},
        # whole images only: no 0.5 ticks on small counts
        yaxis={"title": {"text": "images"}, "rangemode": "tozero", **({"dtick": 1} if tallest <= 10 else {})},
    )


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


def score_histogram_figure(table: pa.Table, colors: dict[str, str]) -> go.Figure:
    """Image-score histogram per category on shared bins, so the shapes compare."""
    scored = _scored(table)
    all_scores = _values(scored, "image_score")
    low, high = (float(all_scores.min()), float(all_scores.max())) if all_scores.size else (0.0, 1.0)
    if high <= low:
        high = low + 1e-6
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    centers, width = ((edges[:-1] + edges[1:]) / 2).tolist(), float(edges[1] - edges[0])
    traces = []
    for category in colors:
        values = _values(scored.filter(pc.equal(scored.column("category"), category)), "image_score")
        if values.size == 0:
            continue
        counts, _ = np.histogram(values, bins=edges)
        traces.append(go.Bar(
            name=category, x=centers, y=counts.tolist(), width=width,
            opacity=0.6, marker={"color": colors[category]},
            hovertemplate="score %{x:.3f}: %{y} images<extra>" + category + "</extra>",
        ))
    return _figure(
        traces, "Image score distribution",
        barmode="overlay",
        xaxis={"title": {"text": "image_score"}},
        yaxis={"title": {"text": "images"}},
    )


def _box_trace(category: str, stats: dict, color: str) -> go.Box:
    return go.Box(
        name=category, x=[category], marker={"color": color},
        **{key: [stats[key]] for key in ("q1", "median", "q3", "lowerfence", "upperfence", "mean")},
        hovertemplate=f"{category} (n={stats['n']})<extra></extra>",
    )


def _box_figure(table: pa.Table, colors: dict[str, str], column: str, title: str, yaxis: dict) -> go.Figure:
    """One box per category from precomputed statistics (the page stays small however many rows)."""
    traces = []
    for category in colors:
        values = _values(table.filter(pc.equal(table.column("category"), category)), column)
        if values.size:
            traces.append(_box_trace(category, box_statistics(values), colors[category]))
    return _figure(traces, title, showlegend=False, xaxis={"type": "category"}, yaxis=yaxis)


def score_box_figure(table: pa.Table, colors: dict[str, str]) -> go.Figure:
    """Image score per category as boxes (scored rows only)."""
    return _box_figure(_scored(table), colors, "image_score", "Image score per category",
                       {"title": {"text": "image_score"}})


def defect_area_figure(table: pa.Table, colors: dict[str, str]) -> go.Figure:
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

_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("uflow_batch", "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
).get_template("report.html.j2")


def _figures(table: pa.Table) -> list[dict]:
    """The page's charts as {id, json}, leaving out any with nothing to draw (e.g. no errors)."""
    categories = sorted(set(table.column("category").to_pylist()))
    colors = _colors(categories)
    candidates = [
        ("fig-defect-rate", defect_rate_figure(table, colors)),
        ("fig-errors", error_figure(table)),
        ("fig-score-histogram", score_histogram_figure(table, colors)),
        ("fig-score-box", score_box_figure(table, colors)),
        ("fig-defect-area", defect_area_figure(table, colors)),
    ]
    # plotly.io escapes "<", ">" and "/" in its JSON, so no "</script>" can close the page's element early.
    return [{"id": fid, "json": pio.to_json(fig)} for fid, fig in candidates if fig is not None and fig.data]


def build_report(
    scores_url: str,
    out_path: str,
    top_n: int = REPORT_TOP_N,
    categories: Iterable[str] | None = None,
    run_dates: Iterable[str | date] | None = None,
) -> ReportSummary:
    """Write one self-contained HTML report of ``scores_url`` to ``out_path`` (local or object storage).

    ``categories`` and ``run_dates`` (``YYYY-MM-DD``) restrict the report to
    those partitions; None means all of them.
    """
    categories = None if categories is None else list(categories)
    run_dates = None if run_dates is None else [str(d) for d in run_dates]
    dataset = open_dataset(scores_url)
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
