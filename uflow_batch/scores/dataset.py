"""Opening and reading the scores dataset: the one place that knows how to see it as a table.

Every reader in the package, the tests and the benchmarks open it here, so the
hive partitioning, the partition columns' types and the storage's filesystem
are chosen once and a local directory and an ``s3://`` prefix read the same.

The current row of an image and night
-------------------------------------
Part files are an append-only log: a night may hold several rows of one image, e.g. the
no_model rows of a run against the wrong model store and the scores of the corrected re-run,
or the scores of two model versions. Readers (the shipped queries in queries/_current_rows.sql,
the report, the analysts' pandas and Polars examples) count the *current* row only: a scored
row (error IS NULL) over an error row, then the latest scored_at, then the highest model
version. So one image counts once per night, and an error never hides a score.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from .. import storage
from .layout import PARTITION_COLUMNS
from .schema import RESULT_SCHEMA

CURRENT_ROW_KEY = ("run_date", "image_uri")
CURRENT_ROW_COLUMNS = (*CURRENT_ROW_KEY, "error", "scored_at", "model_version")


def open_dataset(scores_url: str) -> ds.Dataset:
    """The scores dataset with hive partitions typed as in :data:`~uflow_batch.scores.schema.RESULT_SCHEMA`.

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


def read_current(dataset: ds.Dataset, columns: Sequence[str], partition_filter: ds.Expression | None = None,
                 use_threads: bool = True) -> pa.Table:
    """``columns`` of the current row of each image and night (:func:`current_rows`).

    A night may hold several rows of one image (an error, then the score of
    its re-run); every count a reader shows takes one. ``partition_filter``
    selects partitions before the choice, so it should name partition columns only.
    """
    wanted = list(dict.fromkeys([*columns, *CURRENT_ROW_COLUMNS]))
    table = dataset.to_table(columns=wanted, filter=partition_filter, use_threads=use_threads)
    return current_rows(table).select(list(columns))
