"""Fit one category's detector on its normal training images.

The backbone is frozen and there is no random augmentation, so each image's
features are computed once and the flow is trained on that cache: on a CPU
this is most of the training time saved. A validation split carved out of
``train/good`` (never from ``test``) drives early stopping and model
selection, and gives the held-out normal scores behind the "fair" threshold.

A kind with test-time views (DifferNet) caches every view's features
(``UFlowDetector.features``): it trains on all of them, the paper's
augmentation with a fixed set of transformations, and its verdict is
calibrated on the held-out images' views, as scoring will see them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import data, storage
from .checkpoint import load_detector, read_manifest, save_detector
from .config import DetectorConfig, TrainConfig
from .manifest import TrainingReport
from .model import UFlowDetector, negative_log_likelihood, resolve_device
from .model.calibration import Calibration

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, float, float], None]


class TrainingError(RuntimeError):
    """Training of a category cannot proceed; the message says why."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    """FrEIA draws its fixed channel permutations from numpy, so numpy is seeded too."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_images(urls: list[str], size: tuple[int, int], skip_corrupt: bool) -> tuple[torch.Tensor, list[str], str]:
    """Decode and resize training images; returns (uint8 batch, skipped urls, data fingerprint).

    The fingerprint hashes every file's name and bytes, so a manifest says
    exactly which data a model was trained on.
    """
    fingerprint = hashlib.sha256()
    images, skipped = [], []
    for url in urls:
        raw = storage.read_bytes(url)
        fingerprint.update(url.rsplit("/", 1)[-1].encode())
        fingerprint.update(hashlib.sha256(raw).digest())
        try:
            images.append(data.decode_for_model(raw, size)[0])
        except data.ImageDecodeError as exc:
            if not skip_corrupt:
                raise TrainingError(f"training image {url} cannot be used: {exc} (pass --skip-corrupt to skip such images)") from exc
            log.warning("skipping training image %s: %s", url, exc)
            skipped.append(url)
    if len(images) < 2:
        raise TrainingError(f"need at least 2 usable training images, got {len(images)}")
    return torch.stack(images), skipped, fingerprint.hexdigest()


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def extract_features(detector: UFlowDetector, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Backbone features of all images, kept on the detector's device."""
    chunks = [detector.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(scale) for scale in zip(*chunks)]


def _take(features: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    return [f[index] for f in features]


def validation_scores(detector: UFlowDetector, features: list[torch.Tensor], batch_size: int) -> tuple[list[float], float]:
    """Image scores of the validation images and the highest anomaly-map value among them, batch by batch."""
    scores, peak = [], -math.inf
    for start in range(0, len(features[0]), batch_size):
        maps = detector.maps_from_features([f[start : start + batch_size] for f in features])
        scores += [float(s) for s in maps.image_score]
        peak = max(peak, float(maps.anomaly.max()))
    return scores, peak


def _mean_loss(detector: UFlowDetector, features: list[torch.Tensor], batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features[0]), batch_size):
            batch = [f[start : start + batch_size] for f in features]
            latents, log_jac_det = detector.latents(batch)
            total += negative_log_likelihood(latents, log_jac_det).item() * len(batch[0])
            count += len(batch[0])
    return total / count


def _lr_factor(epoch: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at ``max_epochs``."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    span = max(1, config.max_epochs - config.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def fit_flow(
    detector: UFlowDetector,
    train_features: list[torch.Tensor],
    val_features: list[torch.Tensor],
    config: TrainConfig,
    report: TrainingReport,
    on_epoch: EpochCallback | None = None,
) -> None:
    """Adam on the flow, early-stopped on validation loss; keeps the best weights."""
    flow = detector.flow
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(e, config))
    generator = torch.Generator().manual_seed(config.seed)
    n = len(train_features[0])
    latent_dims = sum(c * h * w for c, h, w in detector.latent_shapes)  # every view's values: the loss sums them
    best_state, since_best = None, 0
    report.initial_val_loss = _mean_loss(detector, val_features, config.batch_size)
    for epoch in range(config.max_epochs):
        flow.train()
        epoch_loss = 0.0
        order = torch.randperm(n, generator=generator).to(train_features[0].device)
        for step, start in enumerate(range(0, n, config.batch_size)):
            latents, log_jac_det = detector.latents(_take(train_features, order[start : start + config.batch_size]))
            loss = negative_log_likelihood(latents, log_jac_det)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"{report.category}: training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    "lower the learning rate or the coupling clamp"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(latents[0])
        scheduler.step()
        flow.eval()
        train_loss = epoch_loss / n
        val_loss = _mean_loss(detector, val_features, config.batch_size)
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"{report.category}: validation loss became {val_loss} at epoch {epoch + 1}")
        report.epochs, report.final_train_loss = epoch + 1, train_loss
        if val_loss < report.best_val_loss:
            report.best_val_loss, report.best_epoch = val_loss, epoch + 1
            report.best_val_nll_per_dim = val_loss / latent_dims + 0.5 * math.log(2 * math.pi)
            best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
            since_best = 0
        else:
            since_best += 1
        if on_epoch:
            on_epoch(epoch + 1, train_loss, val_loss)
        log.debug("%s epoch %d train %.2f val %.2f", report.category, epoch + 1, train_loss, val_loss)
        if since_best >= config.patience:
            log.info("%s: early stop at epoch %d (best %d)", report.category, epoch + 1, report.best_epoch)
            break
    flow.load_state_dict(best_state)


def recalibrate(model_dir: str | Path, data_root: str, test: str | None = None, device: str = "auto") -> Calibration:
    """Fit a trained model's verdict again on its own held-out normal images, without retraining.

    The held-out split is rebuilt from the manifest (same images, same seed),
    and the data must be the data the model was trained on (its fingerprint
    is checked). ``test`` switches the model to that a-contrario test, its
    other settings kept (e.g. a model of an earlier version to ``scan``).
    """
    manifest = read_manifest(model_dir)
    train_config, training = manifest.train_config, manifest.training
    if manifest.category is None or train_config is None or training is None:
        raise TrainingError(f"{model_dir} records no training to repeat (category, train_config, training)")
    detector = load_detector(model_dir, device=resolve_device(device))
    urls = data.train_images(data_root, manifest.category)
    images, _, fingerprint = load_images(urls, detector.input_size, train_config.skip_corrupt)
    if fingerprint != training.data_fingerprint:
        raise TrainingError(f"{data_root}/{manifest.category}/train/good is not the data {model_dir} was trained on")
    _, val_idx = split_indices(len(images), train_config.val_fraction, train_config.seed)
    if test is not None:
        detector.use_nfa(replace(detector.config.nfa, test=test))
    features = extract_features(detector, images[torch.as_tensor(val_idx)].to(detector.device), train_config.batch_size)
    calibration = detector.calibrate(features, train_config.batch_size)
    save_detector(detector, model_dir, manifest.category, train_config, training)
    return calibration


def train_category(
    data_root: str,
    category: str,
    out_dir: str | Path,
    detector_config: DetectorConfig | None = None,
    train_config: TrainConfig | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainingReport:
    """Train one category from ``<data_root>/<category>/train/good`` into ``out_dir``."""
    detector_config = detector_config or DetectorConfig()
    train_config = train_config or TrainConfig()
    device = resolve_device(train_config.device)
    seed_everything(train_config.seed)

    urls = data.train_images(data_root, category)
    images, skipped, fingerprint = load_images(urls, detector_config.backbone.input_size, train_config.skip_corrupt)
    train_idx, val_idx = split_indices(len(images), train_config.val_fraction, train_config.seed)
    report = TrainingReport(category, len(train_idx), len(val_idx), skipped, device=str(device), data_fingerprint=fingerprint)

    detector = UFlowDetector(detector_config).to(device)
    started = time.perf_counter()
    features = extract_features(detector, images.to(device), train_config.batch_size)
    report.feature_seconds = time.perf_counter() - started

    started = time.perf_counter()
    index = lambda idx: torch.as_tensor(idx, device=device)  # noqa: E731
    fit_flow(detector, _take(features, index(train_idx)), _take(features, index(val_idx)), train_config, report, on_epoch)
    report.fit_seconds = time.perf_counter() - started

    val_features = _take(features, index(val_idx))
    val_scores, val_peak = validation_scores(detector, val_features, train_config.batch_size)
    report.val_image_scores = val_scores
    # The "fair" threshold: the lowest anomaly-map level that raises no alarm on
    # held-out normal images. Like the NFA, it never looks at an anomalous image.
    report.fair_threshold = val_peak
    calibration = detector.calibrate(val_features, train_config.batch_size)
    log.info("%s: NFA calibrated on %d held-out images (correction x%.2f)",
             category, calibration.n_images, 10.0**calibration.log10_factor)

    save_detector(detector, out_dir, category, train_config, report)
    log.info(
        "%s: %d epochs (best %d), val NLL/dim %.4f, %.1fs features + %.1fs fit",
        category, report.epochs, report.best_epoch, report.best_val_nll_per_dim, report.feature_seconds, report.fit_seconds,
    )
    return report
