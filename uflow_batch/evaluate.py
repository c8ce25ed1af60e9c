"""Metrics of a trained detector on an MVTec-AD-layout test split.

- image AUROC: image scores vs "is the image defective";
- pixel AUROC: anomaly map vs ground-truth masks, at original resolution;
- AUPRO: area under the per-region-overlap curve up to a false positive
  rate of 0.3, normalized to [0, 1] (Bergmann et al.);
- IoU of masks pooled over the whole test split (total intersection over
  total union) for three thresholds: the automatic NFA mask, the oracle
  anomaly-map threshold (best IoU, chosen on the test labels: an upper bound),
  and the "fair" threshold chosen from held-out normal training images only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from . import data, storage
from .model.anomaly import resize_map
from .model.detector import UFlowDetector

log = logging.getLogger(__name__)


# --- metrics on flat arrays ------------------------------------------------------------------

def _descending(scores: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cumulative sums of ``weights`` over scores sorted high to low, one entry per distinct score.

    Entry i answers: what is selected by the threshold "score >= i-th distinct score".
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    return (sorted_scores[last_of_value],) + tuple(np.cumsum(w[order], dtype=np.float64)[last_of_value] for w in weights)


def aupro(scores: np.ndarray, regions: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalized area under PRO(FPR) for FPR in [0, max_fpr].

    ``regions`` labels each pixel with its ground-truth region (0 = normal,
    1..R = connected defect regions, numbered over the whole split). A
    region's overlap at a threshold is the fraction of its pixels at or above
    it; PRO is the mean overlap over regions.
    """
    scores, regions = scores.ravel(), regions.ravel()
    n_regions = int(regions.max())
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one defect region")
    normal = regions == 0
    areas = np.bincount(regions, minlength=n_regions + 1).astype(np.float64)
    weight = np.where(normal, 0.0, 1.0 / (areas[regions] * n_regions))
    _, fp, pro = _descending(scores, normal.astype(np.float64), weight)
    fpr = np.r_[0.0, fp / normal.sum()]
    pro = np.r_[0.0, pro]
    pro_at_max = np.interp(max_fpr, fpr, pro)
    keep = fpr <= max_fpr
    fpr, pro = np.r_[fpr[keep], max_fpr], np.r_[pro[keep], pro_at_max]
    return float(np.trapezoid(pro, fpr) / max_fpr)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def best_iou_threshold(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(threshold, IoU) maximizing pooled IoU of ``scores >= threshold`` (the oracle)."""
    truth = truth.ravel().astype(np.float64)
    values, tp, selected = _descending(scores.ravel(), truth, np.ones_like(truth))
    ious = tp / (truth.sum() + (selected - tp))
    best = int(np.argmax(ious))
    return float(values[best]), float(ious[best])


# --- evaluation of a detector ----------------------------------------------------------------

@dataclass
class EvaluationReport:
    category: str
    n_images: int
    n_anomalous: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    iou_nfa: float
    iou_oracle: float
    oracle_threshold: float
    iou_fair: float
    fair_threshold: float
    image_auroc_nfa: float
    ms_per_image: float
    per_defect_image_auroc: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _ScoredImage:
    item: data.TestImage
    image_score: float
    max_neg_log10_nfa: float
    anomaly: np.ndarray
    nfa_mask: np.ndarray
    truth: np.ndarray


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score_test_split(
    detector: UFlowDetector, items: list[data.TestImage], batch_size: int,
    on_image: Callable[[int, int], None] | None = None,
) -> tuple[list[_ScoredImage], float]:
    """Score every test image; returns per-image outputs and scoring seconds (I/O excluded).

    ``on_image(done, total)`` is called after each image, for progress bars.
    """
    scored, seconds = [], 0.0
    for batch in _batches(items, batch_size):
        arrays = [data.decode_image(storage.read_bytes(item.url)) for item in batch]
        sizes = [a.shape[:2] for a in arrays]
        images = torch.stack([data.resize_to_model(a, detector.input_size) for a in arrays])
        started = time.perf_counter()
        maps = detector.score_maps(images)
        results = detector.results(maps, sizes)
        anomaly = [resize_map(maps.anomaly[i], size).cpu().numpy() for i, size in enumerate(sizes)]
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        for item, result, amap, size in zip(batch, results, anomaly, sizes):
            truth = np.zeros(size, dtype=bool)
            if item.mask_url:
                truth = data.decode_mask(storage.read_bytes(item.mask_url))
                if truth.shape != tuple(size):
                    raise ValueError(f"mask {item.mask_url} is {truth.shape}, image is {size}")
            elif item.is_anomalous:
                log.warning("%s has no ground-truth mask; its pixels count as normal", item.url)
            scored.append(_ScoredImage(item, result.image_score, result.max_neg_log10_nfa, amap, result.mask, truth))
            if on_image:
                on_image(len(scored), len(items))
    return scored, seconds


def evaluate_detector(
    detector: UFlowDetector,
    data_root: str,
    category: str,
    batch_size: int = 8,
    on_image: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    items = data.test_images(data_root, category)
    scored, seconds = score_test_split(detector, items, batch_size, on_image)

    labels = np.array([s.item.is_anomalous for s in scored])
    image_scores = np.array([s.image_score for s in scored])
    nfa_scores = np.array([s.max_neg_log10_nfa for s in scored])
    pixel_scores = np.concatenate([s.anomaly.ravel() for s in scored])
    truth = np.concatenate([s.truth.ravel() for s in scored])
    nfa_masks = np.concatenate([s.nfa_mask.ravel() for s in scored])

    regions, offset = [], 0
    for s in scored:
        labelled, count = ndimage.label(s.truth, structure=np.ones((3, 3)))
        regions.append(np.where(labelled > 0, labelled + offset, 0).ravel())
        offset += count
    oracle_threshold, oracle_iou = best_iou_threshold(pixel_scores, truth)
    fair_threshold = detector.manifest.get("fair_threshold")  # null when training had no validation maps
    fair_threshold = np.nan if fair_threshold is None else float(fair_threshold)

    per_defect = {}
    for defect in sorted({s.item.defect for s in scored} - {"good"}):
        keep = np.array([s.item.defect in ("good", defect) for s in scored])
        per_defect[defect] = float(roc_auc_score(labels[keep], image_scores[keep]))

    return EvaluationReport(
        category=category,
        n_images=len(scored),
        n_anomalous=int(labels.sum()),
        image_auroc=float(roc_auc_score(labels, image_scores)),
        pixel_auroc=float(roc_auc_score(truth, pixel_scores)),
        aupro=aupro(pixel_scores, np.concatenate(regions)),
        iou_nfa=iou(nfa_masks, truth),
        iou_oracle=oracle_iou,
        oracle_threshold=oracle_threshold,
        iou_fair=iou(pixel_scores >= fair_threshold, truth) if np.isfinite(fair_threshold) else float("nan"),
        fair_threshold=fair_threshold,
        image_auroc_nfa=float(roc_auc_score(labels, nfa_scores)),
        ms_per_image=1000.0 * seconds / len(scored),
        per_defect_image_auroc=per_defect,
    )
