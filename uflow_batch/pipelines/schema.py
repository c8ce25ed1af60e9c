"""The versioned Parquet schema of scoring results: one row per input object.

Dashboards and analysts' queries depend on these names and types; change
them only with a new ``SCHEMA_VERSION`` and a note in ``docs/schema.md``.
The ``category`` and ``run_date`` columns are hive partition keys: they live
in the directory names (``category=.../run_date=...``), not inside the files.
"""

from __future__ import annotations

import pyarrow as pa

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
