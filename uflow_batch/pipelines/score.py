"""Score image archives: a streaming Ray Data pipeline from object storage to Parquet.

    plan units (driver: first level of each input)          listing.plan_units
      -> list objects, skip committed ones (read tasks)     ListingDatasource
      -> read bytes, decode, resize                         stages.fetch_and_decode
      -> batch inference + NFA (actors, GPU when asked)     stages.CategoryScorer
      -> one atomic part file per unit and block            commit.PartSink

Nothing materializes the archive's listing or the output: read tasks list
one directory at a time, and blocks stream through with bounded size. The
exactly-once protocol (why and how) lives in :mod:`.commit`.

Decoding runs in CPU tasks of its own when inference takes a GPU. When both
run on CPU with the same reservation, Ray Data fuses the two stages into the
inference actor, which saves moving decoded pixels between processes.
Listing and write tasks import no torch, so they stay small (~100 MB, not ~1 GB).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray

from .. import storage
from ..config import ScoringResources, check_category_pattern
from ..jobs import validate_run_date
from ..model.detector import read_manifest
from ..storage import TransientStorageError
from . import commit
from .cluster import gpus_per_worker
from .commit import PartSink
from .listing import ListingDatasource, iter_unit, plan_units
from .stages import CategoryScorer, fetch_and_decode

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ScoreRequest:
    """One scoring run: what to read, which models, where to write, how to size it."""

    inputs: tuple[str, ...]
    models: str
    output: str
    run_date: str
    categories: tuple[str, ...] | None = None
    category_from: str = "path"
    category_pattern: str | None = None
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
        if self.category_pattern is not None:
            check_category_pattern(self.category_pattern)
        if not self.inputs and self.category_from == "path":
            raise ValueError("no inputs to score")
        if self.rows_per_file < 1 or self.listing_block_rows < 1:
            raise ValueError(f"invalid file or block size in {self}")


    @property
    def category_filter(self) -> list[str] | None:
        """The categories to score, or None for every category found."""
        return list(self.categories) if self.categories else None


@dataclass
class ScoreSummary:
    rows_written: int = 0
    files_written: int = 0
    by_category: dict[str, Counter] = field(default_factory=dict)
    model_versions: dict[str, str | None] = field(default_factory=dict)
    units: int = 0


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
    categories = request.category_filter
    units = plan_units(list(request.inputs), request.category_from, request.manifest, categories, request.category_pattern)
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
    units = plan_units(list(request.inputs), request.category_from, request.manifest, request.category_filter,
                       request.category_pattern)
    summary = ScoreSummary(units=len(units))
    if not units:
        log.warning("nothing to score under %s", ", ".join(request.inputs) or request.manifest)
        return summary
    known = [u.category for u in units if u.category]
    if any(u.category is None for u in units):  # manifest units: categories show up row by row
        known += storage.ModelStore(request.models).categories()
    versions, sizes = resolve_models(request.models, known)
    summary.model_versions = versions
    configure_retries(request.storage_retries)

    resources = request.resources
    gpus = gpus_per_worker(resources.gpus_per_actor)
    sink = PartSink(request.output, request.rows_per_file)
    source = ListingDatasource(units, request.output, request.run_date, versions, started_at,
                               request.category_filter, request.listing_block_rows)
    dataset = ray.data.read_datasource(source)
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
