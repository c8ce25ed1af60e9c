"""A small but real scores dataset for the report and query tests.

Rows point at the real MTD tile images (never copied) and carry masks made
from their ground truth, written with the production ``FILE_SCHEMA`` in the
``category=.../run_date=...`` layout. The Python rows returned next to the
dataset are the truth the tests compute their expectations from, so no test
checks a query against the same code path that produced its answer.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shared_data import require_mtd
from uflow_batch.model.anomaly import find_regions
from uflow_batch.scores.schema import FILE_SCHEMA, SCHEMA_VERSION

MODEL_VERSION = "20261119T020000Z-a1b2c3"
OLD_MODEL_VERSION = "20261101T020000Z-0ld000"


@dataclass(frozen=True)
class ScoresDataset:
    root: Path
    rows: list[dict]  # the current row of each image and night, plus its "category" and "run_date"
    missing_uri: str  # a scored image deleted after scoring: the report must show a placeholder
    # Rows also written, in part files of other runs, that a reader must not count: an image's
    # no_model row before its score, an older model version's score, a later error beside a
    # score, an earlier error replaced by a later one. Which row is current is decided here,
    # by construction, not by the code under test.
    superseded: list[dict] = field(default_factory=list)

    def scored(self) -> list[dict]:
        return [r for r in self.rows if r["error"] is None]


def _png(mask: np.ndarray, mode: str) -> bytes:
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    out = io.BytesIO()
    (image.convert("1") if mode == "1" else image).save(out, format="PNG")
    return out.getvalue()


def _scored_row(path: Path, mask: np.ndarray, score: float, peak: float, run_date: str, mask_mode: str) -> dict:
    data = path.read_bytes() if path.exists() else b""
    neg_log10_nfa = np.where(mask, peak, -1.0).astype(np.float32)
    regions = [r.as_dict() for r in find_regions(mask, neg_log10_nfa)]
    return {
        "schema_version": SCHEMA_VERSION,
        "image_uri": str(path),
        "object_etag": hashlib.md5(data).hexdigest(),
        "object_size": len(data),
        "object_mtime": datetime(2026, 11, 1, tzinfo=timezone.utc),
        "model_version": MODEL_VERSION,
        "scored_at": datetime.fromisoformat(f"{run_date}T02:00:00+00:00"),
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "image_score": float(np.float32(score)),
        "max_neg_log10_nfa": float(np.float32(peak if mask.any() else -1.0)),
        "is_anomalous": bool(regions),
        "defect_area_px": int(mask.sum()),
        "defect_area_fraction": float(np.float32(mask.sum() / mask.size)),
        "n_regions": len(regions),
        "regions": regions,
        "mask_png": _png(mask, mask_mode),
        "error": None,
        "error_message": None,
    }


def _error_row(uri: str, code: str, message: str, run_date: str, at: str = "02:00") -> dict:
    row = {name: None for name in FILE_SCHEMA.names}
    row.update(
        schema_version=SCHEMA_VERSION,
        image_uri=uri,
        model_version=None if code == "no_model" else MODEL_VERSION,
        scored_at=datetime.fromisoformat(f"{run_date}T{at}:00+00:00"),
        error=code,
        error_message=message,
    )
    return row


def build_scores_dataset(root: Path) -> ScoresDataset:
    """Two categories, three nights-partitions, one split into two files, a few error rows."""
    mtd = require_mtd() / "tile_exp1"
    test, truth = mtd / "test", mtd / "ground_truth"
    rng = np.random.default_rng(20261121)

    def defect(kind: str, index: int) -> tuple[Path, np.ndarray]:
        image = sorted((test / kind).glob("*.png"))[index]
        with Image.open(truth / kind / f"{image.stem}_mask.png") as mask:
            return image, np.asarray(mask.convert("L")) > 0

    def good(index: int) -> tuple[Path, np.ndarray]:
        image = sorted((test / "good").glob("*.png"))[index]
        with Image.open(image) as opened:
            width, height = opened.size
        return image, np.zeros((height, width), dtype=bool)

    def anomalous_rows(items: list[tuple[Path, np.ndarray]], run_date: str) -> list[dict]:
        return [
            _scored_row(p, m, rng.uniform(0.55, 0.9), rng.uniform(3.0, 30.0), run_date, "1" if i % 2 else "L")
            for i, (p, m) in enumerate(items)
        ]

    def normal_rows(items: list[tuple[Path, np.ndarray]], run_date: str) -> list[dict]:
        return [_scored_row(p, m, rng.uniform(0.05, 0.4), 0.0, run_date, "1") for p, m in items]

    # The top-scored row of the whole dataset: scored, then its image was deleted from the archive.
    deleted_image, deleted_mask = defect("blowhole", 19)
    missing_uri = str(deleted_image.with_name("deleted_after_scoring.png"))
    deleted = _scored_row(deleted_image, deleted_mask, 0.99, 42.0, "2026-11-21", "1")
    deleted.update(image_uri=missing_uri)

    partitions: dict[tuple[str, str], list[list[dict]]] = {
        ("tile", "2026-11-20"): [[
            *anomalous_rows([defect("blowhole", i) for i in range(6)], "2026-11-20"),
            *normal_rows([good(i) for i in range(6)], "2026-11-20"),
            _error_row(str(test / "good" / "vanished.png"), "read_error", "FileNotFoundError: object not found", "2026-11-20"),
        ]],
        ("tile", "2026-11-21"): [
            [
                *anomalous_rows([defect("crack", i) for i in range(5)], "2026-11-21"),
                *normal_rows([good(i) for i in range(6, 12)], "2026-11-21"),
            ],
            [
                *anomalous_rows([defect("blowhole", i) for i in range(6, 9)], "2026-11-21"),
                deleted,
                _error_row(str(test / "good" / "truncated.png"), "decode_error", "corrupt or truncated image", "2026-11-21"),
            ],
        ],
        ("tile_glazed", "2026-11-21"): [[
            *anomalous_rows([defect("crack", i) for i in range(5, 9)], "2026-11-21"),
            *normal_rows([good(i) for i in range(12, 20)], "2026-11-21"),
            _error_row(str(test / "good" / "huge.png"), "decode_error", "image is 20000x20000 (400.0 MP), over the 64.0 MP limit", "2026-11-21"),
            _error_row(str(test / "good" / "odd.png"), "inference_error", "RuntimeError: non-finite latents", "2026-11-21"),
        ]],
    }
    superseded = {
        # A run against a store without tile's model, before the night's corrected run (01:00).
        ("tile", "2026-11-20"): [
            *(_error_row(r["image_uri"], "no_model", "no trained model for category 'tile'", "2026-11-20", at="01:00")
              for r in partitions["tile", "2026-11-20"][0][:4]),
            _error_row(str(test / "good" / "vanished.png"), "read_error", "FileNotFoundError: earlier attempt",
                       "2026-11-20", at="01:00"),
        ],
        # An older model's score (it would top the ranking), and a later error beside a score.
        ("tile", "2026-11-21"): [
            {**partitions["tile", "2026-11-21"][0][0], "model_version": OLD_MODEL_VERSION, "image_score": 0.995,
             "scored_at": datetime.fromisoformat("2026-11-21T01:00:00+00:00")},
        ],
        ("tile_glazed", "2026-11-21"): [
            _error_row(partitions["tile_glazed", "2026-11-21"][0][0]["image_uri"], "inference_error",
                       "RuntimeError: a later run failed on it", "2026-11-21", at="03:00"),
        ],
    }
    rows, replaced = [], []
    for (category, run_date), files in partitions.items():
        directory = root / f"category={category}" / f"run_date={run_date}"
        directory.mkdir(parents=True)
        for index, file_rows in enumerate(files):
            pq.write_table(pa.Table.from_pylist(file_rows, schema=FILE_SCHEMA), directory / f"part-{index:05d}.parquet")
            rows.extend({**row, "category": category, "run_date": run_date} for row in file_rows)
        if (category, run_date) in superseded:
            file_rows = superseded[category, run_date]
            pq.write_table(pa.Table.from_pylist(file_rows, schema=FILE_SCHEMA), directory / "part-other-run.parquet")
            replaced.extend({**row, "category": category, "run_date": run_date} for row in file_rows)
    return ScoresDataset(root=root, rows=rows, missing_uri=missing_uri, superseded=replaced)


def upload(local_root: Path, url: str) -> str:
    """Copy a dataset to object storage file by file with s3fs (so no directory marker objects)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in sorted(local_root.rglob("*.parquet")):
        fs.put_file(str(path), f"{url}/{path.relative_to(local_root).as_posix()}")
    return url


# --- a dataset that mixes schema versions ----------------------------------------------------
#
# Readers must survive the day a column is added: older partitions are never rewritten, so a
# dataset holds part files of several versions, sometimes side by side in one night. The next
# version here is this one plus nullable columns (what docs/schema.md allows a new version to
# do); the previous one is version 1 as docs/schema.md records it (no false_alarm_rate).

PREVIOUS_VERSION = 1
PREVIOUS_LACKS = ("false_alarm_rate",)
NEXT_VERSION = SCHEMA_VERSION + 1
NEXT_COLUMNS = (pa.field("camera", pa.string()), pa.field("exposure_ms", pa.float32()))


def version_schema(version: int) -> pa.Schema:
    """The file schema of ``version``: this one, the previous one without its later columns, or the next one."""
    if version == SCHEMA_VERSION:
        schema = FILE_SCHEMA
    elif version == PREVIOUS_VERSION:
        schema = pa.schema([f for f in FILE_SCHEMA if f.name not in PREVIOUS_LACKS])
    elif version == NEXT_VERSION:
        schema = pa.schema([*FILE_SCHEMA, *NEXT_COLUMNS])  # built from this version's table, a column added
    else:
        raise ValueError(f"no schema for version {version}")
    return schema.with_metadata({"uflow_batch.schema_version": str(version)})


def _write_version(rows: list[dict], version: int, path: Path) -> None:
    schema = version_schema(version)
    table = pa.Table.from_pylist([{**row, "schema_version": version} for row in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def build_mixed_versions_dataset(root: Path) -> ScoresDataset:
    """The scores dataset of :func:`build_scores_dataset` plus two nights written by other schema versions.

    - ``tile``, 2026-11-19 (sorts first): one part of the previous version, so a reader that takes
      its schema from the first file it finds misses every later column.
    - ``tile``, 2026-11-22: a part of this version and, beside it, a part of the next one; the
      current row of one image is in each part and superseded by a row in the other.
    """
    base = build_scores_dataset(root)
    rng = np.random.default_rng(20261122)
    scored = [r for r in base.rows if r["error"] is None and r["image_uri"] != base.missing_uri]

    def copy(row: dict, run_date: str, at: str = "02:00", **changes) -> dict:
        fresh = {k: v for k, v in row.items() if k not in ("category", "run_date")}
        fresh.update(image_score=float(np.float32(rng.uniform(0.05, 0.98))),  # no ties with the copied night
                     scored_at=datetime.fromisoformat(f"{run_date}T{at}:00+00:00"), false_alarm_rate=None)
        fresh.update(changes)
        return fresh

    previous = [copy(r, "2026-11-19") for r in scored[:6]]
    previous.append(_error_row(str(Path(scored[0]["image_uri"]).with_name("gone.png")), "read_error",
                               "FileNotFoundError: object not found", "2026-11-19"))
    for row in previous:
        for name in PREVIOUS_LACKS:
            row.pop(name, None)

    night = "2026-11-22"
    rate = float(np.float32(0.01))  # as a float32 column gives it back
    this = [copy(r, night, false_alarm_rate=rate) for r in scored[6:12]]
    rescored_later = scored[12]   # an error in this version's part, its score in the next version's part
    failed_later = this[0]        # a score in this version's part, an earlier error in the next one's
    this_superseded = [{**_error_row(rescored_later["image_uri"], "inference_error", "RuntimeError: out of memory",
                                     night, at="01:00"), "false_alarm_rate": None}]
    cameras = iter(f"cam-{i}" for i in range(100))
    next_rows = [
        copy(r, night, false_alarm_rate=rate, camera=next(cameras), exposure_ms=float(np.float32(rng.uniform(1, 20))))
        for r in [rescored_later, *scored[13:17]]
    ]
    next_superseded = [{**_error_row(failed_later["image_uri"], "read_error", "TimeoutError: earlier attempt",
                                     night, at="00:30"), "camera": "cam-x", "exposure_ms": None}]

    tile = root / "category=tile"
    _write_version(previous, PREVIOUS_VERSION, tile / "run_date=2026-11-19" / "part-00000.parquet")
    _write_version([*this, *this_superseded], SCHEMA_VERSION, tile / f"run_date={night}" / "part-00000.parquet")
    _write_version([*next_rows, *next_superseded], NEXT_VERSION, tile / f"run_date={night}" / "part-00001.parquet")

    def located(rows: list[dict], run_date: str, version: int) -> list[dict]:
        return [{**row, "schema_version": version, "category": "tile", "run_date": run_date} for row in rows]

    rows = [*base.rows, *located(previous, "2026-11-19", PREVIOUS_VERSION), *located(this, night, SCHEMA_VERSION),
            *located(next_rows, night, NEXT_VERSION)]
    superseded = [*base.superseded, *located(this_superseded, night, SCHEMA_VERSION),
                  *located(next_superseded, night, NEXT_VERSION)]
    return ScoresDataset(root=root, rows=rows, missing_uri=base.missing_uri, superseded=superseded)
