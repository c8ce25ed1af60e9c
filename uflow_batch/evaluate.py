"""Metrics of a trained detector on an MVTec-AD-layout test split.

- image AUROC: image scores vs "is the image defective";
- pixel AUROC: anomaly map vs ground-truth masks, at original resolution;
- AUPRO: area under the per-region-overlap curve up to a false positive
  rate of 0.3, normalized to [0, 1] (Bergmann et al.);
- IoU of masks for three thresholds: the automatic NFA mask, the oracle
  anomaly-map threshold (best pooled IoU, chosen on the test labels: an upper
  bound no deployment has), and the "fair" threshold chosen from held-out
  normal training images only. Each pooled over the split (total
  intersection over total union) and as the paper's per-image mean (an
  image with neither a prediction nor a defect counts 1);
- the verdict: the false-alarm rate on test/good and the recall on defective
  images at the model's settings, beside the recall that the best
  image-score threshold chosen *with* the test labels reaches at the same
  false-alarm rate (the oracle);
- the calibration curve: mean false detections per good test image and the
  fraction of good images flagged, against the promised epsilon.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from . import data, storage
from .config import EVALUATION_BATCH_SIZE
from .model.anomaly import NFAMaps, resize_map
from .model.calibration import REPORT_EPSILONS, false_alarms
from .model import ScoreMaps, UFlowDetector

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


def mean_iou(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> float:
    """The paper's per-image mean IoU: an image with neither prediction nor defect counts 1."""
    return float(np.mean([iou(p, t) for p, t in zip(preds, truths)]))


def oracle_recall(scores: np.ndarray, labels: np.ndarray, false_alarm_rate: float) -> float:
    """The best recall any threshold on ``scores`` reaches with at most this false-alarm rate (uses the labels)."""
    good = np.sort(scores[~labels])[::-1]
    allowed = int(math.floor(false_alarm_rate * len(good) + 1e-9))
    # Flag what scores above the (allowed+1)-th highest good image.
    threshold = good[allowed] if allowed < len(good) else -np.inf
    return float(np.mean(scores[labels] > threshold))


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
    kind: str
    n_images: int
    n_anomalous: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    nfa_test: str
    false_alarm_rate: float
    false_alarms_good: float
    recall: float
    oracle_recall: float
    iou_nfa: float
    iou_oracle: float
    oracle_threshold: float
    iou_fair: float
    fair_threshold: float
    mean_iou_nfa: float
    mean_iou_oracle: float
    mean_iou_fair: float
    image_auroc_nfa: float
    ms_per_image: float
    trainable_parameters: int
    training_seconds: float
    per_defect_image_auroc: dict[str, float] = field(default_factory=dict)
    calibration_curve: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _ScoredImage:
    item: data.TestImage
    image_score: float
    max_neg_log10_nfa: float
    flagged: bool
    anomaly: np.ndarray
    nfa_mask: np.ndarray
    truth: np.ndarray
    nfa_maps: NFAMaps | None  # the verdict's maps at input size, kept for good images to count false detections


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
        decoded = [data.decode_for_model(storage.read_bytes(item.url), detector.input_size) for item in batch]
        sizes = [size for _, size in decoded]
        images = torch.stack([image for image, _ in decoded])
        started = time.perf_counter()
        maps = detector.score_maps(images)
        results = detector.results(maps, sizes)
        anomaly = [resize_map(maps.anomaly[i], size).cpu().numpy() for i, size in enumerate(sizes)]
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        for index, (item, result, amap, size) in enumerate(zip(batch, results, anomaly, sizes)):
            truth = np.zeros(size, dtype=bool)
            if item.mask_url:
                truth = data.decode_mask(storage.read_bytes(item.mask_url))
                if truth.shape != tuple(size):
                    raise ValueError(f"mask {item.mask_url} is {truth.shape}, image is {size}")
            elif item.is_anomalous:
                log.warning("%s has no ground-truth mask; its pixels count as normal", item.url)
            scored.append(_ScoredImage(item, result.image_score, result.max_neg_log10_nfa, result.is_anomalous, amap,
                                       result.mask, truth, None if item.is_anomalous else _image_maps(maps, index)))
            if on_image:
                on_image(len(scored), len(items))
    return scored, seconds


def _image_maps(maps: ScoreMaps, index: int) -> NFAMaps:
    return NFAMaps(log10_nfa=-maps.neg_log10_nfa[index : index + 1].cpu(), min_log10_nfa=-maps.significance[index : index + 1].cpu())


def evaluate_detector(
    detector: UFlowDetector,
    data_root: str,
    category: str,
    batch_size: int = EVALUATION_BATCH_SIZE,
    on_image: Callable[[int, int], None] | None = None,
    fair_threshold: float = math.nan,
    training_seconds: float = math.nan,
) -> EvaluationReport:
    """Every metric of the module docstring on ``category``'s test split.

    ``fair_threshold`` and ``training_seconds`` are the model's (its
    manifest's): without a fair threshold, the fair masks' IoUs are NaN.
    """
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

    flagged = np.array([s.flagged for s in scored])
    false_alarms_good = float(flagged[~labels].mean()) if (~labels).any() else float("nan")
    good_maps = [s.nfa_maps for s in scored if s.nfa_maps is not None]
    curve = false_alarms(good_maps, REPORT_EPSILONS) if good_maps else None
    oracle_masks = [s.anomaly >= oracle_threshold for s in scored]
    fair_masks = [s.anomaly >= fair_threshold for s in scored] if np.isfinite(fair_threshold) else None
    truths = [s.truth for s in scored]

    per_defect = {}
    for defect in sorted({s.item.defect for s in scored} - {"good"}):
        keep = np.array([s.item.defect in ("good", defect) for s in scored])
        per_defect[defect] = float(roc_auc_score(labels[keep], image_scores[keep]))

    return EvaluationReport(
        category=category,
        kind=detector.config.kind,
        n_images=len(scored),
        n_anomalous=int(labels.sum()),
        image_auroc=float(roc_auc_score(labels, image_scores)),
        pixel_auroc=float(roc_auc_score(truth, pixel_scores)),
        aupro=aupro(pixel_scores, np.concatenate(regions)),
        nfa_test=detector.config.nfa.test,
        false_alarm_rate=detector.config.nfa.false_alarm_rate,
        false_alarms_good=false_alarms_good,
        recall=float(flagged[labels].mean()),
        oracle_recall=oracle_recall(image_scores, labels, false_alarms_good),
        iou_nfa=iou(nfa_masks, truth),
        iou_oracle=oracle_iou,
        oracle_threshold=oracle_threshold,
        iou_fair=iou(pixel_scores >= fair_threshold, truth) if np.isfinite(fair_threshold) else float("nan"),
        fair_threshold=fair_threshold,
        mean_iou_nfa=mean_iou([s.nfa_mask for s in scored], truths),
        mean_iou_oracle=mean_iou(oracle_masks, truths),
        mean_iou_fair=mean_iou(fair_masks, truths) if fair_masks is not None else float("nan"),
        image_auroc_nfa=float(roc_auc_score(labels, nfa_scores)),
        ms_per_image=1000.0 * seconds / len(scored),
        trainable_parameters=sum(p.numel() for p in detector.flow.parameters() if p.requires_grad),
        training_seconds=training_seconds,
        per_defect_image_auroc=per_defect,
        calibration_curve={} if curve is None else {
            "epsilon": list(curve.epsilons),
            "detections_per_good_image": list(curve.detections_per_image),
            "good_images_flagged": list(curve.images_flagged),
        },
    )
