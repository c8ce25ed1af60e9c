"""Score image archives: a streaming Ray Data pipeline from object storage to Parquet.

    plan units (driver: first level of each input)          listing.plan_units
      -> list objects, skip committed ones (read tasks)     ListingDatasource
      -> read bytes, decode, resize (CPU tasks)             stages.fetch_and_decode
      -> batch inference + NFA (actors, GPU when asked)     stages.CategoryScorer
      -> one atomic part file per unit and block            PartSink -> commit.write_part

Nothing materializes the archive's listing or the output: read tasks list
one directory at a time, and blocks stream through with bounded size. The
exactly-once protocol (why and how) lives in :mod:`.commit`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask

from .. import storage
from ..config import ScoringResources
from ..jobs import validate_run_date
from ..model.detector import read_manifest
from . import commit
from .listing import ListingUnit, TransientStorageError, iter_unit, plan_units
from .stages import CategoryScorer, fetch_and_decode

log = logging.getLogger(__name__)

LISTING_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()), pa.field("category", pa.string()), pa.field("model_version", pa.string()),
    pa.field("object_size", pa.int64()), pa.field("object_etag", pa.string()),
    pa.field("object_mtime", pa.timestamp("us", tz="UTC")), pa.field("run_date", pa.string()), pa.field("pkey", pa.string()),
])


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring run: what to read, which models, where to write, how to size it."""

    inputs: tuple[str, ...]
    models: str
    output: str
    run_date: str
    categories: tuple[str, ...] | None = None
    category_from: str = "path"
    manifest: str | None = None
    epsilon: float | None = None
    resources: ScoringResources = field(default_factory=ScoringResources)
    listing_block_rows: int = 64
    rows_per_file: int = 256
    storage_retries: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))
        validate_run_date(self.run_date)
        if not self.inputs and self.category_from == "path":
            raise ValueError("no inputs to score")
        if self.rows_per_file < 1 or self.listing_block_rows < 1:
            raise ValueError(f"invalid file or block size in {self}")


@dataclass
class ScoreSummary:
    rows_written: int = 0
    files_written: int = 0
    by_category: dict[str, Counter] = field(default_factory=dict)
    model_versions: dict[str, str | None] = field(default_factory=dict)
    units: int = 0


class ListingDatasource(Datasource):
    """One read task per listing unit: lists it, skips what is committed, yields bounded blocks."""

    def __init__(self, units: list[ListingUnit], request: ScoreRequest, versions: dict[str, str | None], started_at: datetime) -> None:
        super().__init__()
        self.units, self.request, self.versions, self.started_at = units, request, versions, started_at

    def get_name(self) -> str:
        return "ArchiveListing"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(lambda unit=unit: self._read(unit), metadata, schema=LISTING_SCHEMA) for unit in self.units]

    def _read(self, unit: ListingUnit) -> Iterable[pa.Table]:
        request = self.request
        scope = None if unit.category is None else [unit.category]
        try:
            done = commit.committed(request.output, request.run_date, unit.key, scope)
        except Exception as exc:  # noqa: BLE001 - cannot tell what is done: retry rather than duplicate
            raise TransientStorageError(f"read committed parts of {unit.location}", exc) from exc
        categories = list(request.categories) if request.categories else None
        block, skipped = [], 0
        for row in iter_unit(unit, self.started_at, categories):
            version = self.versions.get(row["category"])
            if (row["image_uri"], version) in done:
                skipped += 1
                continue
            block.append({**row, "model_version": version, "run_date": request.run_date, "pkey": unit.key})
            if len(block) >= request.listing_block_rows:
                yield pa.Table.from_pylist(block, schema=LISTING_SCHEMA)
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=LISTING_SCHEMA)
        if skipped:
            log.info("%s: %d objects already scored, skipped", unit.location, skipped)


class PartSink(Datasink):
    """Writes each (category, run date, unit) group of a write task as one atomic part file."""

    def __init__(self, output: str, rows_per_file: int) -> None:
        self.output, self.rows_per_file = output, rows_per_file

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
            try:
                url = commit.write_part(self.output, group["category"], group["run_date"], group["pkey"], part)
            except Exception as exc:  # noqa: BLE001
                raise TransientStorageError(f"write part for {group['category']}", exc) from exc
            errors = Counter(e or "ok" for e in part.column("error").to_pylist())
            written.append({"url": url, "category": group["category"], "rows": part.num_rows, "outcomes": dict(errors)})
        return written

    def on_write_complete(self, write_result) -> None:
        self.written = [w for task in write_result.write_returns for w in task]


def resolve_models(models_url: str, categories: Iterable[str]) -> tuple[dict[str, str | None], dict[str, tuple[int, int]]]:
    """Current model version and input size per category, fixed for the whole run."""
    store = storage.ModelStore(models_url)
    versions, sizes = {}, {}
    for category in sorted(set(categories)):
        version = store.current_version(category)
        versions[category] = version
        if version is not None:
            directory, _ = store.fetch(category, version)
            sizes[category] = tuple(read_manifest(directory)["config"]["backbone"]["input_size"])
    return versions, sizes


def preview(request: ScoreRequest) -> dict[str, Counter]:
    """What a run would do, per category: objects to score and objects already done.

    Lists everything in the driver, so it is for ``--dry-run``, not for the run itself.
    """
    started_at = datetime.now(timezone.utc)
    categories = list(request.categories) if request.categories else None
    units = plan_units(list(request.inputs), request.category_from, request.manifest, categories)
    store = storage.ModelStore(request.models)
    versions: dict[str, str | None] = {}
    counts: dict[str, Counter] = {}
    for unit in units:
        done = commit.committed(request.output, request.run_date, unit.key, None if unit.category is None else [unit.category])
        for row in iter_unit(unit, started_at, categories):
            category = row["category"]
            if category not in versions:
                versions[category] = store.current_version(category)
            outcome = "done" if (row["image_uri"], versions[category]) in done else "to_score" if versions[category] else "no_model"
            counts.setdefault(category, Counter())[outcome] += 1
    return counts


def configure_retries(attempts: int) -> None:
    """Let Ray Data retry tasks that failed on a storage glitch (and nothing else)."""
    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [TransientStorageError.MARKER]
    context.max_map_retries = attempts
    context.max_errored_blocks = 0  # a block that cannot be written fails the run; it is never dropped


def run_scoring(request: ScoreRequest) -> ScoreSummary:
    """Score everything under the request's inputs that this model version has not scored yet."""
    started_at = datetime.now(timezone.utc)
    units = plan_units(list(request.inputs), request.category_from, request.manifest,
                       list(request.categories) if request.categories else None)
    summary = ScoreSummary(units=len(units))
    if not units:
        log.warning("nothing to score under %s", ", ".join(request.inputs) or request.manifest)
        return summary
    known = [u.category for u in units if u.category] or list(storage.ModelStore(request.models).categories())
    if request.category_from == "manifest":
        known += storage.ModelStore(request.models).categories()
    versions, sizes = resolve_models(request.models, known)
    summary.model_versions = versions
    configure_retries(request.storage_retries)

    resources = request.resources
    gpus = resources.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    elif gpus > 0 and ray.cluster_resources().get("GPU", 0) < gpus:
        # Ray would wait for the GPU forever rather than fail.
        raise RuntimeError(f"the job asks for {gpus} GPU per inference actor but the Ray cluster has none; use gpus_per_actor 0")
    sink = PartSink(request.output, request.rows_per_file)
    dataset = ray.data.read_datasource(ListingDatasource(units, request, versions, started_at))
    dataset = dataset.map_batches(
        fetch_and_decode, fn_kwargs={"input_sizes": sizes}, batch_size=resources.batch_size,
        batch_format="pyarrow", num_cpus=resources.decode_cpus,
    )
    dataset = dataset.map_batches(
        CategoryScorer,
        fn_constructor_kwargs={
            "models_url": request.models, "device": "cuda" if gpus > 0 else "cpu",
            "epsilon": request.epsilon, "num_threads": max(1, int(resources.cpus_per_actor)),
        },
        batch_size=resources.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_gpus=gpus, num_cpus=resources.cpus_per_actor,
    )
    dataset.write_datasink(sink)
    for written in getattr(sink, "written", []):
        summary.rows_written += written["rows"]
        summary.files_written += 1
        summary.by_category.setdefault(written["category"], Counter()).update(written["outcomes"])
    return summary
