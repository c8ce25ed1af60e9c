"""What to score: listing units, the objects in them, and their categories.

A *unit* is the smallest piece of input a read task lists on its own: one
category folder under an input root (``<root>/<category>/...``, the default),
or one manifest file (CSV or JSONL with ``uri`` and ``category``). The driver
only lists the first level of each input root; objects are listed inside the
read tasks, directory by directory, in sorted order, so memory stays flat
however large the archive, and a retried task lists the same sequence.

Objects modified after the run started (still arriving, or stamped by a clock
ahead of the driver's) are kept out of the main listing, because a listing
that changes under a retry could duplicate or skip rows. They are not lost:
each read task hands them to the run's :class:`LateArrivals` ledger, and the
run scores them in a second pass over that fixed list once the main pass is
done (:func:`uflow_batch.pipelines.score.run_scoring`), counting them in its
summary.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from datetime import datetime

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .. import storage
from ..config import ConfigError, ScoreRequest, check_category_pattern, is_category_name, require
from ..data import is_image_name
from .blocks import LISTING_SCHEMA
from .commit import committed, unit_key

log = logging.getLogger(__name__)

UNCATEGORIZED = "uncategorized"


def partition_category(name: str | None) -> str:
    """The category an object is filed under: its name when it can be a hive partition value, else UNCATEGORIZED.

    Every way of naming a category (folder, pattern) goes through here: a
    folder like ``lot=42`` would become ``category=lot=42/`` and break every
    reader of the dataset. Its images keep their full path in ``image_uri``.
    """
    return name if name is not None and is_category_name(name) else UNCATEGORIZED

@dataclass(frozen=True)
class ListingUnit:
    key: str
    location: str  # the prefix URL or the manifest URL
    category: str | None  # None: each object's category comes from the pattern or the manifest
    kind: str  # "prefix", "files" (objects directly under an input root) or "manifest"
    root: str = ""  # the input root the location lies under
    pattern: str | None = None  # regex with a group named "category", searched in the path under root

    @property
    def partitions(self) -> list[str] | None:
        """The category partitions its results can land in; None when any (categories come per object)."""
        return None if self.category is None else [self.category]


def plan_request_units(request: ScoreRequest) -> list[ListingUnit]:
    """The listing units of one scoring run."""
    return plan_units(list(request.inputs), request.category_from, request.manifest, request.category_filter,
                      request.category_pattern)


def plan_units(inputs: list[str], category_from: str = "path", manifest: str | None = None,
               categories: list[str] | None = None, pattern: str | None = None) -> list[ListingUnit]:
    """Units for the driver to hand out; only the first level of each input is listed here.

    By default an object's category is the first folder under its input root,
    so each folder is a unit of one category. With ``pattern``, the category
    is read from each object's path and a unit may hold several.
    """
    if category_from == "manifest":
        require(bool(manifest), "category_from='manifest' needs a manifest URL")
        read_manifest_records(manifest)
        return [ListingUnit(unit_key(manifest), manifest, None, "manifest")]
    if pattern is not None:
        check_category_pattern(pattern)
    units = []
    folders: set[str] = set()
    for root in dict.fromkeys(url.rstrip("/") for url in inputs):
        try:
            entries = storage.list_entries(root)
        except FileNotFoundError:
            raise ConfigError(f"input {storage.redact(root)} does not exist") from None
        except NotADirectoryError:
            raise ConfigError(f"input {storage.redact(root)} is a file; "
                              "give the archive folder (<root>/<category>/<image>)") from None
        folders.update(e.name for e in entries if e.is_dir)
        for entry in entries:
            if not entry.is_dir:
                continue
            if pattern is not None:
                units.append(ListingUnit(unit_key(entry.url), entry.url, None, "prefix", root, pattern))
            elif categories is None or entry.name in categories:
                units.append(ListingUnit(unit_key(entry.url), entry.url, partition_category(entry.name), "prefix", root))
        has_loose_files = any(e.is_file and is_image_name(e.name) for e in entries)
        if has_loose_files and (categories is None or pattern is not None):
            category = None if pattern is not None else UNCATEGORIZED
            units.append(ListingUnit(unit_key(root + "/*"), root, category, "files", root, pattern))
    if categories is not None and pattern is None and not folders & set(categories):
        raise ConfigError(f"none of the categories {sorted(categories)} is a folder of the inputs; "
                          f"found: {sorted(folders) or 'no folders'}")
    return units


def object_row(url: str, entry: storage.Entry, category: str) -> dict:
    return {
        "image_uri": url,
        "category": category,
        "object_size": entry.size,
        "object_etag": entry.etag,
        "object_mtime": entry.mtime,
    }


_GONE = (FileNotFoundError, NotADirectoryError)  # a folder that was listed and is no longer one


def walk_sorted(url: str, recursive: bool = True) -> Iterator[tuple[str, storage.Entry]]:
    """(url, entry) of files below ``url`` in a deterministic order, one directory in memory at a time.

    A directory that vanished since it was seen is skipped: its objects are
    gone, there is nothing to score. Any other failure to list is raised for
    Ray to retry the task (a denied listing is raised as it is).
    """
    stack = [url]
    while stack:
        directory = stack.pop()
        try:
            with storage.transient(f"list {directory}", answers=(*_GONE, PermissionError)):
                entries = storage.list_entries(directory)
        except _GONE:
            log.warning("%s vanished while it was listed", directory)
            continue
        for entry in entries:
            if entry.is_file:
                yield entry.url, entry
        if recursive:
            stack.extend(e.url for e in reversed(entries) if e.is_dir)


def iter_unit(unit: ListingUnit, started_at: datetime, categories: list[str] | None = None,
              on_deferred: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """The image objects of a unit, in a fixed order, with their identity fields.

    Objects modified after ``started_at`` are passed to ``on_deferred`` (as
    the same row) instead of being yielded: the main pass must list the same
    objects on a replay, and these may not have been there the first time.
    """
    if unit.kind == "manifest":
        yield from _iter_manifest(unit.location, categories)
        return
    pattern = re.compile(unit.pattern) if unit.pattern else None
    for url, info in walk_sorted(unit.location, recursive=unit.kind == "prefix"):
        if not is_image_name(url):
            continue
        category = unit.category
        if pattern is not None:
            match = pattern.search(storage.path_below(url, unit.root))
            category = partition_category(match.group("category") if match else None)
            if categories is not None and category not in categories:
                continue
        row = object_row(url, info, category)
        if row["object_mtime"] is not None and row["object_mtime"] > started_at:
            if on_deferred:
                on_deferred(row)
            continue
        yield row


def read_manifest_records(url: str) -> list[tuple[str, str]]:
    """``(uri, category)`` of a CSV (with header) or JSONL manifest, checked whole.

    The driver reads it before anything runs, so a bad line or a repeated uri
    stops the job at the edge rather than half-way through, with rows written.
    """
    with storage.transient(f"read manifest {url}", answers=(FileNotFoundError, PermissionError)):
        text = storage.read_bytes(url).decode("utf-8")
    records: list[tuple[str, str]] = []
    seen: set[str] = set()
    if url.endswith((".jsonl", ".ndjson", ".json")):
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            raw = [json.loads(line) for line in lines]
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{url}: not JSON lines: {exc}") from None
    else:
        raw = list(csv.DictReader(io.StringIO(text)))
    for number, record in enumerate(raw, start=1):
        require(isinstance(record, dict), f"{url}: record {number} is not an object: {record!r}")
        uri, category = record.get("uri"), record.get("category")
        require(isinstance(uri, str) and uri != "" and isinstance(category, str) and category != "",
                f"{url}: record {number} needs 'uri' and 'category', got {record}")
        require(is_category_name(category), f"{url}: record {number}: {category!r} is not a usable category name")
        require(uri not in seen, f"{url}: record {number} repeats {uri}")
        seen.add(uri)
        records.append((uri, category))
    return records


def _iter_manifest(url: str, categories: list[str] | None) -> Iterator[dict]:
    for uri, category in read_manifest_records(url):
        if categories is None or category in categories:
            yield {"image_uri": uri, "category": category, "object_size": None, "object_etag": None, "object_mtime": None}


@ray.remote(num_cpus=0)
class LateArrivals:
    """The run's ledger of objects its main pass left out (modified after the run started), per unit.

    Keyed by unit, so a replayed read task replaces what its first attempt
    recorded instead of adding to it. Normally a handful of rows; a clock far
    ahead of the driver's can send a whole night here, still only listing rows.
    """

    def __init__(self) -> None:
        self.by_unit: dict[str, list[dict]] = {}

    def record(self, unit_key: str, rows: list[dict]) -> None:
        self.by_unit[unit_key] = rows

    def rows(self) -> list[dict]:
        return [row for key in sorted(self.by_unit) for row in self.by_unit[key]]


@dataclass(frozen=True)
class ListingContext:
    """What every read task needs besides its unit (kept small: it is pickled into each task)."""

    output: str
    run_date: str
    run_id: str
    versions: dict[str, str | None]
    started_at: datetime
    categories: list[str] | None = None
    block_rows: int = 64
    late: Any = None  # a LateArrivals handle; None: objects modified after started_at are only logged

    def listing_row(self, row: dict, unit: ListingUnit) -> dict:
        """An object row as the pipeline carries it: with its model version, run date and unit."""
        return {**row, "model_version": self.versions.get(row["category"]), "run_date": self.run_date, "pkey": unit.key}


def read_unit(unit: ListingUnit, context: ListingContext) -> Iterator[pa.Table]:
    """Blocks of the unit's objects that no earlier run has scored with the current model version.

    The parts this run writes meanwhile are ignored (see :mod:`.commit`), so a
    replayed task lists exactly what it listed the first time.
    """
    # Cannot tell what is done: retry the task rather than duplicate rows.
    with storage.transient(f"read committed parts of {unit.location}"):
        done = committed(context.output, context.run_date, unit.key, unit.partitions, exclude_run=context.run_id)
    block, skipped, late = [], 0, []

    def to_score(row: dict) -> dict | None:
        nonlocal skipped
        listed = context.listing_row(row, unit)
        if (listed["image_uri"], listed["model_version"]) in done:
            skipped += 1
            return None
        return listed

    def defer(row: dict) -> None:
        listed = to_score(row)
        if listed is not None:
            late.append(listed)

    for row in iter_unit(unit, context.started_at, context.categories, on_deferred=defer):
        listed = to_score(row)
        if listed is None:
            continue
        block.append(listed)
        if len(block) >= context.block_rows:
            yield pa.Table.from_pylist(block, schema=LISTING_SCHEMA)
            block = []
    if block:
        yield pa.Table.from_pylist(block, schema=LISTING_SCHEMA)
    if skipped:
        log.info("%s: %d objects already scored, skipped", unit.location, skipped)
    if context.late is not None:
        ray.get(context.late.record.remote(unit.key, late))
    if late:
        log.warning("%s: %d objects modified after the run started, left for its second pass (e.g. %s)",
                    unit.location, len(late), late[0]["image_uri"])


class ListingDatasource(Datasource):
    """Ray Data source: one read task per listing unit."""

    def __init__(self, units: list[ListingUnit], context: ListingContext) -> None:
        super().__init__()
        self.units, self.context = units, context

    def get_name(self) -> str:
        return "ArchiveListing"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(functools.partial(read_unit, unit, self.context), metadata, schema=LISTING_SCHEMA)
                for unit in self.units]
