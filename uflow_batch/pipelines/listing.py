"""What to score: listing units, the objects in them, and their categories.

A *unit* is the smallest piece of input a read task lists on its own: one
category folder under an input root (``<root>/<category>/...``, the default),
or one manifest file (CSV or JSONL with ``uri`` and ``category``). The driver
only lists the first level of each input root; objects are listed inside the
read tasks, directory by directory, in sorted order, so memory stays flat
however large the archive, and a retried task lists the same sequence.

Objects modified after the run started are left for the next run: a listing
that changes under a retry could otherwise duplicate or skip rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .. import storage
from ..storage import TransientStorageError
from ..config import check_category_pattern
from ..data import is_image_name
from .commit import committed, unit_key

log = logging.getLogger(__name__)

UNCATEGORIZED = "uncategorized"

LISTING_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()), pa.field("category", pa.string()), pa.field("model_version", pa.string()),
    pa.field("object_size", pa.int64()), pa.field("object_etag", pa.string()),
    pa.field("object_mtime", pa.timestamp("us", tz="UTC")), pa.field("run_date", pa.string()), pa.field("pkey", pa.string()),
])


@dataclass(frozen=True)
class ListingUnit:
    key: str
    location: str  # the prefix URL or the manifest URL
    category: str | None  # None: each object's category comes from the pattern or the manifest
    kind: str  # "prefix", "files" (objects directly under an input root) or "manifest"
    root: str = ""  # the input root the location lies under
    pattern: str | None = None  # regex with a group named "category", searched in the path under root


def plan_units(inputs: list[str], category_from: str = "path", manifest: str | None = None,
               categories: list[str] | None = None, pattern: str | None = None) -> list[ListingUnit]:
    """Units for the driver to hand out; only the first level of each input is listed here.

    By default an object's category is the first folder under its input root,
    so each folder is a unit of one category. With ``pattern``, the category
    is read from each object's path and a unit may hold several.
    """
    if category_from == "manifest":
        if not manifest:
            raise ValueError("category_from='manifest' needs a manifest URL")
        return [ListingUnit(unit_key(manifest), manifest, None, "manifest")]
    if pattern is not None:
        check_category_pattern(pattern)
    units = []
    for root in inputs:
        fs, path = storage.filesystem(root)
        entries = storage.with_retries(lambda: fs.ls(path, detail=True), f"list {root}")
        for entry in sorted(entries, key=lambda e: e["name"]):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "directory":
                continue
            location = storage.full_url(fs, entry["name"].rstrip("/"))
            if pattern is not None:
                units.append(ListingUnit(unit_key(location), location, None, "prefix", root, pattern))
            elif categories is None or name in categories:
                units.append(ListingUnit(unit_key(location), location, name, "prefix", root))
        has_loose_files = any(e["type"] == "file" and is_image_name(e["name"]) for e in entries)
        if has_loose_files and (categories is None or pattern is not None):
            category = None if pattern is not None else UNCATEGORIZED
            units.append(ListingUnit(unit_key(root.rstrip("/") + "/*"), root, category, "files", root, pattern))
    return units


def _relative(url: str, root: str) -> str:
    root_path = storage.filesystem(root)[1].rstrip("/")
    path = storage.filesystem(url)[1]
    return path[len(root_path) + 1:] if path.startswith(root_path + "/") else path


def _mtime(info: dict) -> datetime | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _etag(info: dict) -> str | None:
    value = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(value).strip('"') if value else None


def object_row(url: str, info: dict, category: str) -> dict:
    return {
        "image_uri": url,
        "category": category,
        "object_size": int(info.get("size") or 0),
        "object_etag": _etag(info),
        "object_mtime": _mtime(info),
    }


def _ls(fs, path: str, what: str) -> list[dict]:
    try:
        return storage.with_retries(lambda: fs.ls(path, detail=True), what)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - anything else may pass; let Ray retry the task
        raise TransientStorageError(what, exc) from exc


def walk_sorted(url: str, recursive: bool = True) -> Iterator[tuple[str, dict]]:
    """(url, info) of files below ``url`` in a deterministic order, one directory in memory at a time."""
    fs, root = storage.filesystem(url)
    stack = [root]
    while stack:
        directory = stack.pop()
        entries = sorted(_ls(fs, directory, f"list {directory}"), key=lambda e: e["name"])
        for entry in entries:
            if entry["type"] == "file":
                yield storage.full_url(fs, entry["name"]), entry
        if recursive:
            stack.extend(e["name"] for e in reversed(entries) if e["type"] == "directory")


def iter_unit(unit: ListingUnit, started_at: datetime, categories: list[str] | None = None) -> Iterator[dict]:
    """The image objects of a unit, in a fixed order, with their identity fields."""
    if unit.kind == "manifest":
        yield from _iter_manifest(unit.location, categories)
        return
    pattern = re.compile(unit.pattern) if unit.pattern else None
    for url, info in walk_sorted(unit.location, recursive=unit.kind == "prefix"):
        if not is_image_name(url):
            continue
        modified = _mtime(info)
        if modified is not None and modified > started_at:
            log.info("leaving %s for the next run: modified after this run started", url)
            continue
        category = unit.category
        if pattern is not None:
            match = pattern.search(_relative(url, unit.root))
            category = match.group("category") if match else UNCATEGORIZED
            if categories is not None and category not in categories:
                continue
        yield object_row(url, info, category)


def _iter_manifest(url: str, categories: list[str] | None) -> Iterator[dict]:
    """Rows ``uri, category`` of a CSV (with header) or JSONL manifest."""
    text = storage.read_bytes(url).decode("utf-8")
    if url.endswith((".jsonl", ".ndjson", ".json")):
        records = (json.loads(line) for line in text.splitlines() if line.strip())
    else:
        records = csv.DictReader(io.StringIO(text))
    for number, record in enumerate(records, start=1):
        uri, category = record.get("uri"), record.get("category")
        if not uri or not category:
            raise ValueError(f"{url}: record {number} needs 'uri' and 'category', got {record}")
        if categories is not None and category not in categories:
            continue
        yield {"image_uri": uri, "category": category, "object_size": None, "object_etag": None, "object_mtime": None}


class ListingDatasource(Datasource):
    """Ray Data source: one read task per unit; lists it, skips what is committed, yields bounded blocks."""

    def __init__(self, units: list[ListingUnit], output: str, run_date: str, versions: dict[str, str | None],
                 started_at: datetime, categories: list[str] | None = None, block_rows: int = 64) -> None:
        super().__init__()
        self.units, self.output, self.run_date, self.versions = units, output, run_date, versions
        self.started_at, self.categories, self.block_rows = started_at, categories, block_rows

    def get_name(self) -> str:
        return "ArchiveListing"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(lambda unit=unit: self._read(unit), metadata, schema=LISTING_SCHEMA) for unit in self.units]

    def _read(self, unit: ListingUnit) -> Iterable[pa.Table]:
        scope = None if unit.category is None else [unit.category]
        try:
            done = committed(self.output, self.run_date, unit.key, scope)
        except Exception as exc:  # noqa: BLE001 - cannot tell what is done: retry rather than duplicate
            raise TransientStorageError(f"read committed parts of {unit.location}", exc) from exc
        block, skipped = [], 0
        for row in iter_unit(unit, self.started_at, self.categories):
            version = self.versions.get(row["category"])
            if (row["image_uri"], version) in done:
                skipped += 1
                continue
            block.append({**row, "model_version": version, "run_date": self.run_date, "pkey": unit.key})
            if len(block) >= self.block_rows:
                yield pa.Table.from_pylist(block, schema=LISTING_SCHEMA)
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=LISTING_SCHEMA)
        if skipped:
            log.info("%s: %d objects already scored, skipped", unit.location, skipped)
