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
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray

from .. import storage
from ..checkpoint import MANIFEST_FILE
from ..config import ConfigError, ScoreRequest
from ..manifest import ModelFormatError, ModelManifest
from ..storage import TransientStorageError
from . import commit
from .cluster import check_fits, gpus_per_worker
from .commit import PartSink
from .listing import ListingContext, ListingDatasource, iter_unit, plan_request_units
from .stages import CategoryScorer, fetch_and_decode

log = logging.getLogger(__name__)

@dataclass
class ScoreSummary:
    rows_written: int = 0
    files_written: int = 0
    by_category: dict[str, Counter] = field(default_factory=dict)
    model_versions: dict[str, str | None] = field(default_factory=dict)
    units: int = 0


@dataclass
class ModelIndex:
    """The models of one run, fixed at its start: a model published mid-run waits for the next run."""

    versions: dict[str, str | None] = field(default_factory=dict)
    input_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)  # category -> why its model cannot be used


def resolve_models(models_url: str, categories: Iterable[str]) -> ModelIndex:
    """Current version and input size per category, from the manifests alone (no weights downloaded).

    A category whose manifest cannot be read or understood is marked unusable:
    its images get error rows, the other categories are scored.
    """
    store = storage.ModelStore(models_url)
    index = ModelIndex()
    for category in sorted(set(categories)):
        try:
            version = store.current_version(category)
        except storage.ModelPointerError as exc:
            index.versions[category] = None
            index.unusable[category] = f"the model of category {category!r} cannot be found: {exc}"
            continue
        index.versions[category] = version
        if version is None:
            continue
        url = storage.join(store.version_url(category, version), MANIFEST_FILE)
        try:
            index.input_sizes[category] = ModelManifest.from_json(storage.read_bytes(url), storage.redact(url)).input_size
        except (FileNotFoundError, ModelFormatError) as exc:
            index.unusable[category] = f"model {category}/{version} has no usable manifest: {type(exc).__name__}: {exc}"
    return index


def categories_in(units: list, models_url: str) -> list[str]:
    """Categories a run may meet: those of its units, or, when rows carry their own, every modelled one."""
    known = [u.category for u in units if u.category]
    if any(u.category is None for u in units):
        known += storage.ModelStore(models_url).categories()
    return known


def preview(request: ScoreRequest) -> dict[str, Counter]:
    """What a run would do, per category: objects to score, already done, without a model, arrived too late.

    Lists everything in the driver, so it is for ``--dry-run``, not for the run itself.
    """
    started_at = datetime.now(timezone.utc)
    categories = request.category_filter
    units = plan_request_units(request)
    versions = resolve_models(request.models, categories_in(units, request.models)).versions
    counts: dict[str, Counter] = {}
    for unit in units:
        done = commit.committed(request.output, request.run_date, unit.key, unit.partitions)
        deferred: list[str] = []
        for row in iter_unit(unit, started_at, categories, on_deferred=deferred.append):
            version = versions.get(row["category"])
            outcome = "done" if (row["image_uri"], version) in done else "to_score" if version else "no_model"
            counts.setdefault(row["category"], Counter())[outcome] += 1
        if deferred and unit.category:
            counts.setdefault(unit.category, Counter())["deferred"] += len(deferred)
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
    units = plan_request_units(request)
    summary = ScoreSummary(units=len(units))
    if not units:
        log.warning("nothing to score under %s", ", ".join(request.inputs) or request.manifest)
        return summary
    models = resolve_models(request.models, categories_in(units, request.models))
    summary.model_versions = models.versions
    configure_retries(request.storage_retries)

    resources = request.resources
    gpus = gpus_per_worker(resources.gpus_per_actor)
    check_fits("an inference actor (resources.cpus_per_actor, gpus_per_actor)", resources.cpus_per_actor, gpus)
    check_fits("a decode task (resources.decode_cpus)", resources.decode_cpus)
    if not any(models.versions.values()) and not models.unusable and not storage.ModelStore(request.models).categories():
        # Every image would become a no_model row: a mistyped --models, not a night's result.
        raise ConfigError(f"the model store {storage.redact(request.models)} holds no model; is --models right?")
    run_id = commit.new_run_id()
    sink = PartSink(request.output, request.rows_per_file, run_id)
    context = ListingContext(request.output, request.run_date, run_id, models.versions, started_at,
                             request.category_filter, request.listing_block_rows)
    dataset = ray.data.read_datasource(ListingDatasource(units, context))
    dataset = dataset.map_batches(
        fetch_and_decode, fn_kwargs={"input_sizes": models.input_sizes, "unusable": models.unusable},
        batch_size=resources.batch_size,
        batch_format="pyarrow", num_cpus=resources.decode_cpus,
    )
    dataset = dataset.map_batches(
        CategoryScorer,
        fn_constructor_kwargs={
            "models_url": request.models, "device": "cuda" if gpus > 0 else "cpu",
            "epsilon": request.epsilon, "false_alarm_rate": request.false_alarm_rate, "num_threads": max(1, int(resources.cpus_per_actor)),
        },
        batch_size=resources.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_gpus=gpus, num_cpus=resources.cpus_per_actor,
    )
    with warnings.catch_warnings():
        # A re-run with everything already scored gives the actors no input: expected, not a sizing problem.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        dataset.write_datasink(sink)
    for written in getattr(sink, "written", []):
        summary.rows_written += written["rows"]
        summary.files_written += 1
        summary.by_category.setdefault(written["category"], Counter()).update(written["outcomes"])
    return summary
