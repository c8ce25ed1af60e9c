"""The Arrow schemas of the blocks that travel between the scoring pipeline's stages.

They are the output schema's columns plus what a row needs on its way: where
it goes (its partition and the listing unit whose part file commits it) and,
between decoding and inference, its pixels. They are built from the scores
schema and layout rather than restated, so they cannot drift from the output.
"""

from __future__ import annotations

import pyarrow as pa

from ..scores.layout import PARTITION_COLUMNS
from ..scores.schema import FILE_SCHEMA, RESULT_SCHEMA

# Where a row goes: its partition and the listing unit whose part file commits it.
_ROUTING = [*(RESULT_SCHEMA.field(key) for key in PARTITION_COLUMNS), pa.field("pkey", pa.string())]
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
