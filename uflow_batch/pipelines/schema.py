"""The versioned Parquet schema of scoring results: one row per input object.

Dashboards and analysts' queries depend on these names and types; change
them only with a new ``SCHEMA_VERSION`` and a note in ``docs/schema.md``.
The ``category`` and ``run_date`` columns are hive partition keys: they live
in the directory names (``category=.../run_date=...``), not inside the files.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 2

REGION_TYPE = pa.struct([
    ("x0", pa.int32()),
    ("y0", pa.int32()),
    ("x1", pa.int32()),
    ("y1", pa.int32()),
    ("area_px", pa.int64()),
    ("peak_neg_log10_nfa", pa.float32()),
])

PARTITION_COLUMNS = ("category", "run_date")
# Beside the partitions, not data: the run log, <output>/_runs/run_date=<d>/ (pipelines/runlog.py).
RUNS_DIR = "_runs"

# Error codes in the ``error`` column; ``error_message`` says the specifics.
ERROR_CODES = {
    "read_error": "the object could not be read from storage",
    "decode_error": "the bytes are not a usable image (empty, truncated, unknown format, too large)",
    "no_model": "no trained model exists for the image's category",
    "inference_error": "the model failed on this image",
}

FILE_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int16()),
        ("image_uri", pa.string()),
        ("object_etag", pa.string()),
        ("object_size", pa.int64()),
        ("object_mtime", pa.timestamp("us", tz="UTC")),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_score", pa.float32()),
        ("max_neg_log10_nfa", pa.float32()),
        ("false_alarm_rate", pa.float32()),
        ("is_anomalous", pa.bool_()),
        ("defect_area_px", pa.int64()),
        ("defect_area_fraction", pa.float32()),
        ("n_regions", pa.int32()),
        ("regions", pa.list_(REGION_TYPE)),
        ("mask_png", pa.binary()),
        ("error", pa.string()),
        ("error_message", pa.string()),
    ],
    metadata={"uflow_batch.schema_version": str(SCHEMA_VERSION)},
)

# The logical schema a reader sees with hive partitioning on.
RESULT_SCHEMA = FILE_SCHEMA.append(pa.field("category", pa.string())).append(pa.field("run_date", pa.string()))

# --- the current row of an image and night -------------------------------------------------
#
# Part files are an append-only log: a night may hold several rows of one image, e.g. the
# no_model rows of a run against the wrong model store and the scores of the corrected re-run,
# or the scores of two model versions. Readers (the shipped queries in queries/_current_rows.sql,
# the report, the analysts' pandas and Polars examples) count the *current* row only: a scored
# row (error IS NULL) over an error row, then the latest scored_at, then the highest model
# version. So one image counts once per night, and an error never hides a score.

CURRENT_ROW_KEY = ("run_date", "image_uri")
CURRENT_ROW_COLUMNS = (*CURRENT_ROW_KEY, "error", "scored_at", "model_version")


def current_rows(table: pa.Table) -> pa.Table:
    """The current row of each (run_date, image_uri) in ``table``, in the table's order.

    ``table`` needs at least :data:`CURRENT_ROW_COLUMNS`.
    """
    if table.num_rows <= 1:
        return table
    ranked = pa.table({
        "run_date": table.column("run_date"), "image_uri": table.column("image_uri"),
        "errored": pc.is_valid(table.column("error")), "scored_at": table.column("scored_at"),
        "model_version": table.column("model_version"), "index": pa.array(range(table.num_rows), pa.int64()),
    }).sort_by([("run_date", "ascending", "at_end"), ("image_uri", "ascending", "at_end"), ("errored", "ascending", "at_end"),
                ("scored_at", "descending", "at_end"), ("model_version", "descending", "at_end")])
    run_date, uri = (ranked.column(name) for name in CURRENT_ROW_KEY)
    # A row is current when it is the first of its key in this order.
    changed = pc.or_kleene(pc.not_equal(run_date.slice(1), run_date.slice(0, len(run_date) - 1)),
                           pc.not_equal(uri.slice(1), uri.slice(0, len(uri) - 1)))
    first = pa.concat_arrays([pa.array([True]), pc.fill_null(changed, True).combine_chunks()])
    indices = ranked.column("index").filter(first)
    return table.take(pc.take(indices, pc.sort_indices(indices)))


# --- inside the pipeline: what travels between its stages -----------------------------------

# Where a row goes: its partition and the listing unit whose part file commits it.
_ROUTING = [pa.field("category", pa.string()), pa.field("run_date", pa.string()), pa.field("pkey", pa.string())]
_IDENTITY = [FILE_SCHEMA.field(name) for name in ("image_uri", "model_version", "object_size", "object_etag", "object_mtime")]

# One listed object.
LISTING_SCHEMA = pa.schema(_IDENTITY + _ROUTING)
# One object read and resized to its model's input (``pixels``), or its error.
DECODED_SCHEMA = pa.schema(list(LISTING_SCHEMA) + [
    FILE_SCHEMA.field("width"), FILE_SCHEMA.field("height"), pa.field("pixels", pa.binary()),
    FILE_SCHEMA.field("error"), FILE_SCHEMA.field("error_message"),
])
# One result row on its way to a part file.
ROUTED_SCHEMA = pa.schema(list(FILE_SCHEMA) + _ROUTING)
