"""The versioned Parquet schema of scoring results: one row per input object.

Dashboards and analysts' queries depend on these names and types; change
them only with a new ``SCHEMA_VERSION`` and a note in ``docs/schema.md``.
The partition columns (:data:`~uflow_batch.scores.layout.PARTITION_COLUMNS`)
live in the directory names, not inside the files, so :data:`FILE_SCHEMA`
lacks them and :data:`RESULT_SCHEMA`, what a reader sees, adds them.
"""

from __future__ import annotations

import pyarrow as pa

from .layout import PARTITION_COLUMNS

SCHEMA_VERSION = 2

REGION_TYPE = pa.struct([
    ("x0", pa.int32()),
    ("y0", pa.int32()),
    ("x1", pa.int32()),
    ("y1", pa.int32()),
    ("area_px", pa.int64()),
    ("peak_neg_log10_nfa", pa.float32()),
])

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
RESULT_SCHEMA = pa.schema([*FILE_SCHEMA, *(pa.field(key, pa.string()) for key in PARTITION_COLUMNS)],
                          metadata=FILE_SCHEMA.metadata)
