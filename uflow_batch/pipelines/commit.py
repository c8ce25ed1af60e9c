"""Exactly-once output: the Parquet part files *are* the commit log.

Why not Ray Data's own checkpointing (``ray.data.checkpoint``, beta in Ray
2.60)? Measured here: it duplicates every row on a re-run unless its
checkpoint is kept; it silently does nothing for pipelines that do not start
from a ``Read``; and on S3 a driver killed between the copy and the delete of
its "move" leaves a committed id whose data file the next run deletes: rows
lost for good. So the protocol is our own, and small:

- Input objects are listed in *units* (one input prefix, or one manifest);
  each unit has a key, ``pkey``, derived from its location.
- Results are written as part files
  ``<output>/category=<c>/run_date=<d>/part-<pkey>-<run>-<digest>.parquet``,
  where ``run`` names the run that wrote it and ``digest`` hashes the rows'
  ``(image_uri, model_version)`` (the names are the scores layout's,
  :mod:`uflow_batch.scores.layout`). Each part file is written whole or not at
  all (one object PUT; a local temp file renamed). A retried write task
  recomputes the same name and overwrites, never adds.
- An object counts as done for a model version when a part file of its unit
  (in this run date), written by an *earlier* run, holds a row for it with
  that model version. A re-run reads those two columns of its own unit's
  parts and skips what is done before reading any image bytes; a finished
  job re-runs as a no-op.
- Parts of the run in progress are ignored by its own listing on purpose:
  Ray retries a failed read task by replaying it and dropping the blocks it
  already produced, so the replay must list exactly the same objects, which
  it would not if the parts written meanwhile by this run were skipped.

Two runs of the same job must not overlap (a scheduler's concurrency policy
sees to that); one after the other, in any state of failure, is safe.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from .. import storage
from ..scores.layout import part_name, partition_url, run_of, unit_parts
from ..scores.schema import FILE_SCHEMA

log = logging.getLogger(__name__)


def unit_key(location: str) -> str:
    """A short stable key for a listing unit (an input prefix or a manifest URL)."""
    return hashlib.sha1(location.encode()).hexdigest()[:12]


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def serialize_part(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table.select(FILE_SCHEMA.names).cast(FILE_SCHEMA).sort_by("image_uri"), buffer, compression="zstd")
    return buffer.getvalue()


def write_part(output: str, category: str, run_date: str, pkey: str, run_id: str, table: pa.Table) -> str:
    """Write one part file atomically; returns its URL.

    Turning rows into Parquet happens first: an error there is a bug, not a
    storage glitch, and must not be retried as one.
    """
    data = serialize_part(table)
    name = part_name(pkey, run_id, table.column("image_uri").to_pylist(), table.column("model_version").to_pylist())
    url = storage.join(partition_url(output, category, run_date), name)
    with storage.transient(f"write {url}"):  # storage failed: let Ray retry the task
        storage.write_bytes_atomic(url, data)
    return url


def committed(output: str, run_date: str, pkey: str, categories: Iterable[str] | None,
              exclude_run: str | None = None) -> set[tuple[str, str | None]]:
    """``(image_uri, model_version)`` pairs a unit has written for this run date in runs other than ``exclude_run``.

    Memory grows with the number of objects of the unit, not of the archive.
    """
    done: set[tuple[str, str | None]] = set()
    for url in unit_parts(output, run_date, pkey, categories):
        if exclude_run is not None and run_of(url) == exclude_run:
            continue
        table = storage.read_parquet(url, columns=["image_uri", "model_version"])
        done.update(zip(table.column("image_uri").to_pylist(), table.column("model_version").to_pylist()))
    return done


class PartSink(Datasink):
    """Writes each (category, run date, unit) group of a write task as one atomic part file."""

    def __init__(self, output: str, rows_per_file: int, run_id: str) -> None:
        self.output, self.rows_per_file, self.run_id = output, rows_per_file, run_id

    def get_name(self) -> str:
        return "UflowParts"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Any], ctx) -> list[dict]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        keys = ["category", "run_date", "pkey"]
        written = []
        for group in table.select(keys).group_by(keys).aggregate([]).to_pylist():
            mask = pc.and_(pc.and_(pc.equal(table["category"], group["category"]), pc.equal(table["run_date"], group["run_date"])),
                           pc.equal(table["pkey"], group["pkey"]))
            part = table.filter(mask)
            url = write_part(self.output, group["category"], group["run_date"], group["pkey"], self.run_id, part)
            errors = Counter(e or "ok" for e in part.column("error").to_pylist())
            written.append({"url": url, "category": group["category"], "rows": part.num_rows, "outcomes": dict(errors)})
        return written

    def on_write_complete(self, write_result) -> None:
        self.written = [w for task in write_result.write_returns for w in task]
