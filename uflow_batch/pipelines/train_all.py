"""Train every category in parallel: one Ray task per category.

Each task trains into a scratch directory on its worker and publishes the
result to the model store (files first, the CURRENT pointer last), so a
scorer never sees a half-written model. Categories are independent: one that
fails is retried a bounded number of times and then reported, while the
others finish.

Retries follow the kind of failure:
- a worker that dies (killed, out of memory) is retried by Ray itself;
- a diverged loss is retried with half the learning rate, since the same
  learning rate would diverge the same way;
- bad data (no ``train/good``, an unreadable image) fails at once: running
  it again cannot help, and the message says what to fix.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import ray
import torch

from .. import data
from ..config import DetectorConfig, TaskResources, TrainConfig
from ..storage import ModelStore, redact
from ..train import TrainingDiverged, TrainingError, train_category
from .cluster import check_fits, gpus_per_worker

log = logging.getLogger(__name__)

PERMANENT_ERRORS = (data.DatasetLayoutError, TrainingError)


@dataclass
class CategoryOutcome:
    category: str
    status: str  # "ok" or "failed"
    attempts: int
    epochs: int = 0
    best_val_loss: float | None = None
    seconds: float = 0.0
    model_version: str | None = None
    device: str | None = None
    node_id: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpochProgress:
    """Where one category's training stands: what ``train-all`` shows while tasks run."""

    epoch: int
    max_epochs: int
    val_loss: float


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest epoch of every category, reported by the training tasks (fire and forget)."""

    def __init__(self) -> None:
        self.latest: dict[str, EpochProgress] = {}

    def report(self, category: str, progress: EpochProgress) -> None:
        self.latest[category] = progress

    def snapshot(self) -> dict[str, EpochProgress]:
        return dict(self.latest)


def train_and_publish(
    data_url: str,
    category: str,
    models_url: str,
    detector_config: DetectorConfig,
    train_config: TrainConfig,
    max_attempts: int,
    num_cpus: float,
    board: ray.actor.ActorHandle | None = None,
) -> CategoryOutcome:
    """Train one category (retrying divergence) and publish it; never raises for training failures.

    Each epoch is reported to ``board``, if given, so the driver can show progress.
    """
    torch.set_num_threads(max(1, int(num_cpus)))
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    started = time.perf_counter()
    config = train_config

    def on_epoch(epoch: int, _train_loss: float, val_loss: float) -> None:
        board.report.remote(category, EpochProgress(epoch, config.max_epochs, val_loss))

    for attempt in range(1, max_attempts + 1):
        try:
            with tempfile.TemporaryDirectory(prefix=f"uflow-{category}-") as scratch:
                report = train_category(data_url, category, scratch, detector_config, config,
                                        on_epoch=on_epoch if board is not None else None)
                version = ModelStore(models_url).publish(scratch, category)
            return CategoryOutcome(
                category, "ok", attempt, report.epochs, report.best_val_loss,
                time.perf_counter() - started, version, report.device, node_id,
            )
        except TrainingDiverged as exc:
            log.warning("%s (attempt %d/%d)", exc, attempt, max_attempts)
            error = str(exc)
            config = replace(config, learning_rate=config.learning_rate / 2)
        except PERMANENT_ERRORS as exc:
            return CategoryOutcome(category, "failed", attempt, seconds=time.perf_counter() - started,
                                   node_id=node_id, error=redact(str(exc)))
        except Exception as exc:  # noqa: BLE001 - transient (storage, memory): retried, then reported
            log.warning("%s: attempt %d/%d failed: %s", category, attempt, max_attempts, exc)
            error = f"{type(exc).__name__}: {exc}"
            log.debug("%s", traceback.format_exc())
    return CategoryOutcome(category, "failed", max_attempts, seconds=time.perf_counter() - started,
                           node_id=node_id, error=redact(error))


def train_all(
    data_url: str,
    models_url: str,
    categories: list[str] | None = None,
    detector_config: DetectorConfig | None = None,
    train_config: TrainConfig | None = None,
    resources: TaskResources | None = None,
    on_done: Callable[[CategoryOutcome], None] | None = None,
    kinds: dict[str, str] | None = None,
    on_progress: Callable[[dict[str, EpochProgress]], None] | None = None,
    progress_interval: float = 2.0,
) -> list[CategoryOutcome]:
    """Fan training out over the Ray cluster (the caller holds the Ray session).

    ``kinds`` picks another flow for some categories (the others use
    ``detector_config.kind``), so one night trains each product line with
    the detector chosen for it. ``on_progress`` is called about every
    ``progress_interval`` seconds with the latest epoch of each category
    still training.
    """
    detector_config = detector_config or DetectorConfig()
    train_config = train_config or TrainConfig()
    resources = resources or TaskResources()
    available = data.discover_categories(data_url)
    categories = categories or available
    unknown = sorted(set(categories) - set(available))
    outcomes = [CategoryOutcome(c, "failed", 0, error=f"no category {c!r} with train/good under {data_url}") for c in unknown]
    todo = [c for c in categories if c in available]

    num_gpus = gpus_per_worker(resources.num_gpus)
    check_fits("a training task (--num-cpus, --num-gpus)", resources.num_cpus, num_gpus)
    if num_gpus == 0 and train_config.device == "auto":
        train_config = replace(train_config, device="cpu")  # a CPU task must not take a GPU it did not ask for
    task = ray.remote(train_and_publish).options(
        num_cpus=resources.num_cpus, num_gpus=num_gpus, max_retries=resources.max_attempts - 1, retry_exceptions=False,
    )
    board = ProgressBoard.remote() if on_progress else None
    pending = {
        task.remote(data_url, c, models_url, replace(detector_config, kind=(kinds or {}).get(c, detector_config.kind)),
                    train_config, resources.max_attempts, resources.num_cpus, board): c
        for c in todo
    }
    log.info("training %d categories (%s CPU, %s GPU each)", len(todo), resources.num_cpus, num_gpus)
    try:
        outcomes += _collect(pending, resources, on_done, board, on_progress, progress_interval)
    finally:
        if board is not None:
            ray.kill(board)
    order = {c: i for i, c in enumerate(categories)}
    return sorted(outcomes, key=lambda o: order.get(o.category, len(order)))


def _collect(pending: dict, resources: TaskResources, on_done: Callable[[CategoryOutcome], None] | None,
             board: ray.actor.ActorHandle | None, on_progress: Callable[[dict[str, EpochProgress]], None] | None,
             interval: float) -> list[CategoryOutcome]:
    """Outcomes as the tasks finish, with progress in between."""
    outcomes = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=interval if board is not None else None)
        if board is not None:
            latest = ray.get(board.snapshot.remote())
            on_progress({c: p for c, p in latest.items() if c in pending.values()})
        if not done:
            continue
        category = pending.pop(done[0])
        try:
            outcome = ray.get(done[0])
        except ray.exceptions.RayError as exc:  # the worker died on every attempt
            outcome = CategoryOutcome(category, "failed", resources.max_attempts, error=redact(f"{type(exc).__name__}: {exc}")[:500])
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)
    return outcomes
