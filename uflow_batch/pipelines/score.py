"""Score image archives: a streaming Ray Data pipeline from object storage to Parquet.

    plan units (driver: first level of each input)          listing.plan_units
      -> list objects, skip committed ones (read tasks)     ListingDatasource
      -> read bytes, decode, resize                         stages.fetch_and_decode
      -> batch inference + NFA (actors, GPU when asked)     stages.CategoryScorer
      -> one atomic part file per unit and block            commit.PartSink
    then, when the listing left out objects modified after the run started,
    a second pass over that fixed list through the same stages (LateArrivals).

Nothing materializes the archive's listing or the output: read tasks list
one directory at a time, and blocks stream through with bounded size. The
exactly-once protocol (why and how) lives in :mod:`.commit`.

Decoding runs in CPU tasks of its own when inference takes a GPU. When both
run on CPU with the same reservation, Ray Data fuses the two stages into the
inference actor, which saves moving decoded pixels between processes.
Listing and write tasks import no torch, so they stay small (~100 MB, not ~1 GB).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import ray

from .. import storage
from ..checkpoint import MANIFEST_FILE
from ..config import ConfigError, ScoreRequest
from ..manifest import ModelFormatError, ModelManifest
from ..storage import TransientStorageError
from . import commit, runlog
from .blocks import LISTING_SCHEMA
from .cluster import check_fits, gpus_per_worker
from .commit import PartSink
from .listing import LateArrivals, ListingContext, ListingDatasource, iter_unit, plan_request_units
from .stages import CategoryScorer, fetch_and_decode

log = logging.getLogger(__name__)

# How many late objects a summary names as examples.
LATE_EXAMPLES = 3


@dataclass
class ScoreSummary:
    rows_written: int = 0
    files_written: int = 0
    by_category: dict[str, Counter] = field(default_factory=dict)
    model_versions: dict[str, str | None] = field(default_factory=dict)
    units: int = 0
    # Objects modified after the run started, scored in its second pass (their rows are in by_category too).
    late: Counter = field(default_factory=Counter)
    late_examples: list[str] = field(default_factory=list)
    files_by_category: Counter = field(default_factory=Counter)
    # The run log (:mod:`.runlog`): the run's id (in its part names), final status and record URL.
    run_id: str | None = None
    status: str | None = None
    run_record: str | None = None
    max_error_fraction: float | None = None

    def add_written(self, written: list[dict]) -> None:
        """Count the part files a sink reports."""
        for part in written:
            self.rows_written += part["rows"]
            self.files_written += 1
            self.files_by_category[part["category"]] += 1
            self.by_category.setdefault(part["category"], Counter()).update(part["outcomes"])

    @property
    def errors(self) -> int:
        return runlog.error_counts(self.by_category)[1]

    @property
    def error_fraction(self) -> float:
        """Errored rows / rows this run wrote (0 when it wrote none)."""
        return runlog.error_fraction(self.by_category)

    @property
    def over_error_threshold(self) -> bool:
        """More of this run's rows are errors than ``max_error_fraction`` allows."""
        return self.max_error_fraction is not None and self.error_fraction > self.max_error_fraction


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
    """What a run would do, per category: objects to score, already done, without a model, and late ones.

    Late objects (modified after the run started) are those its second pass
    would score. Lists everything in the driver, so it is for ``--dry-run``,
    not for the run itself.
    """
    started_at = datetime.now(timezone.utc)
    categories = request.category_filter
    units = plan_request_units(request)
    versions = resolve_models(request.models, categories_in(units, request.models)).versions
    counts: dict[str, Counter] = {}
    for unit in units:
        done = commit.committed(request.output, request.run_date, unit.key, unit.partitions)

        def count(row: dict, late: bool = False) -> None:
            version = versions.get(row["category"])
            outcome = "done" if (row["image_uri"], version) in done else "late" if late else "to_score" if version else "no_model"
            counts.setdefault(row["category"], Counter())[outcome] += 1

        for row in iter_unit(unit, started_at, categories, on_deferred=lambda row: count(row, late=True)):
            count(row)
    return counts


def configure_retries(attempts: int) -> None:
    """Let Ray Data retry tasks that failed on a storage glitch (and nothing else)."""
    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [TransientStorageError.MARKER]
    context.max_map_retries = attempts
    context.max_errored_blocks = 0  # a block that cannot be written fails the run; it is never dropped


def run_scoring(request: ScoreRequest, started_at: datetime | None = None) -> ScoreSummary:
    """Score everything under the request's inputs that this model version has not scored yet.

    ``started_at`` (default: now) is the main listing's cutoff: objects
    modified after it are scored in a second pass, once the main pass is
    written, over the fixed list the read tasks recorded. So every listed
    object gets its row in this run, whatever the clocks say, and a retried
    read task still lists what its first attempt did.

    Once the request has passed every check (a bad one writes nothing), the
    run keeps a run record under ``<output>/_runs/`` from start to end,
    whatever the outcome, and marks each partition it completed
    (:mod:`.runlog`). Status ``partial``, and ``summary.over_error_threshold``,
    when more of its rows are errors than ``request.max_error_fraction``.
    """
    started_at = started_at or datetime.now(timezone.utc)
    units = plan_request_units(request)
    summary = ScoreSummary(units=len(units), max_error_fraction=request.max_error_fraction)
    if not units:
        # An empty night is a night too: its record tells "no images" from "no run".
        log.warning("nothing to score under %s", ", ".join(request.inputs) or request.manifest)
        summary.run_id, summary.status = commit.new_run_id(), runlog.SUCCEEDED
        record = _run_log(request, summary.run_id, started_at)
        summary.run_record = record.url
        record.finish(runlog.SUCCEEDED, by_category={}, model_versions={}, files=0, late={}, markers=[])
        return summary
    models = resolve_models(request.models, categories_in(units, request.models))
    summary.model_versions = models.versions
    configure_retries(request.storage_retries)

    resources = request.resources
    gpus = gpus_per_worker(resources.gpus_per_actor)
    check_fits("an inference actor (resources.cpus_per_actor, gpus_per_actor)", resources.cpus_per_actor, gpus)
    check_fits("a decode task (resources.decode_cpus)", resources.decode_cpus)
    if resources.runtime == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError("resources.runtime onnx needs ONNX Runtime: pip install 'uflow-batch[export]'")
    if not any(models.versions.values()) and not models.unusable and not storage.ModelStore(request.models).categories():
        # Every image would become a no_model row: a mistyped --models, not a night's result.
        raise ConfigError(f"the model store {storage.redact(request.models)} holds no model; is --models right?")
    run_id = summary.run_id = commit.new_run_id()
    record = _run_log(request, run_id, started_at)
    summary.run_record = record.url
    record.start()
    status, reason, markers = runlog.FAILED, "stopped before its end", []
    try:
        _score_passes(request, units, models, gpus, run_id, started_at, summary)
        markers = runlog.write_markers(request.output, request.run_date, run_id, summary.by_category, models.versions,
                                       summary.files_by_category, [u.category for u in units if u.category])
        status, reason = runlog.SUCCEEDED, None
        if summary.over_error_threshold:
            status = runlog.PARTIAL
            reason = (f"{summary.errors} of {summary.rows_written} rows are errors ({summary.error_fraction:.1%}), "
                      f"above {request.spelt('max_error_fraction')} {request.max_error_fraction:g}")
    except BaseException as exc:
        reason = storage.redact(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary.status = status
        try:
            record.finish(status, by_category=summary.by_category, model_versions=models.versions,
                          files=summary.files_written, late=summary.late, markers=markers, reason=reason)
        except Exception:
            if status != runlog.FAILED:
                raise  # the work is done, but a record left "running" would say otherwise: fail loudly
            log.exception("could not write the run record %s", storage.redact(record.url))  # keep the run's own error
    return summary


def _run_log(request: ScoreRequest, run_id: str, started_at: datetime) -> runlog.RunLog:
    return runlog.RunLog(request.output, request.run_date, run_id, started_at, inputs=request.inputs,
                         manifest=request.manifest, models=request.models, max_error_fraction=request.max_error_fraction)


def _score_passes(request: ScoreRequest, units: list, models: ModelIndex, gpus: float, run_id: str,
                  started_at: datetime, summary: ScoreSummary) -> None:
    """The main pass, then the second pass over objects modified after ``started_at``; counts go to ``summary``."""
    late = LateArrivals.remote()
    try:
        context = ListingContext(request.output, request.run_date, run_id, models.versions, started_at,
                                 request.category_filter, request.listing_block_rows, late)
        summary.add_written(_score_and_write(ray.data.read_datasource(ListingDatasource(units, context)),
                                             request, models, gpus, run_id))
        late_rows = ray.get(late.rows.remote())
    finally:
        ray.kill(late)
    if late_rows:
        summary.late = Counter(row["category"] for row in late_rows)
        summary.late_examples = [row["image_uri"] for row in late_rows[:LATE_EXAMPLES]]
        log.warning("%d objects modified after the run started (%s) are scored in a second pass, e.g. %s",
                    len(late_rows), started_at.isoformat(), ", ".join(summary.late_examples))
        late_dataset = ray.data.from_arrow(pa.Table.from_pylist(late_rows, schema=LISTING_SCHEMA))
        summary.add_written(_score_and_write(late_dataset, request, models, gpus, run_id))


def _score_and_write(dataset: ray.data.Dataset, request: ScoreRequest, models: ModelIndex, gpus: float,
                     run_id: str) -> list[dict]:
    """Decode, score and commit listed objects (one pass of a run); returns the part files written."""
    resources = request.resources
    sink = PartSink(request.output, request.rows_per_file, run_id)
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
            "runtime": resources.runtime,
        },
        batch_size=resources.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_gpus=gpus, num_cpus=resources.cpus_per_actor,
    )
    with warnings.catch_warnings():
        # A re-run with everything already scored gives the actors no input: expected, not a sizing problem.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        dataset.write_datasink(sink)
    return getattr(sink, "written", [])
