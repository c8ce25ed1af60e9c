"""Evaluation metrics, checked against brute-force definitions."""

import numpy as np
import pytest
from scipy import ndimage

from uflow_batch.evaluate import aupro, best_iou_threshold, iou, mean_iou, oracle_recall


def brute_force_aupro(scores, masks, max_fpr=0.3, steps=4000):
    """PRO and FPR recomputed at many thresholds, straight from the definition."""
    flat_scores = np.concatenate([s.ravel() for s in scores])
    normal = ~np.concatenate([m.ravel() for m in masks])
    thresholds = np.unique(flat_scores)[::-1]
    per_image_regions = []
    for s, m in zip(scores, masks):
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        per_image_regions += [s[labels == k] for k in range(1, count + 1)]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(np.mean(flat_scores[normal] >= t))
        pros.append(np.mean([np.mean(r >= t) for r in per_image_regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    grid = np.linspace(0, max_fpr, steps)
    return np.trapezoid(np.interp(grid, fprs, pros), grid) / max_fpr


def random_case(seed):
    rng = np.random.default_rng(seed)
    masks, scores = [], []
    for _ in range(4):
        mask = np.zeros((12, 12), bool)
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, 9, 2)
            mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
        score = rng.random((12, 12)) + 0.6 * mask
        masks.append(mask)
        scores.append(np.round(score, 2))  # ties on purpose
    return scores, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_the_definition(seed):
    scores, masks = random_case(seed)
    labels, offset = [], 0
    for m in masks:
        lab, count = ndimage.label(m, structure=np.ones((3, 3)))
        labels.append(np.where(lab > 0, lab + offset, 0))
        offset += count
    fast = aupro(np.concatenate([s.ravel() for s in scores]), np.concatenate([l.ravel() for l in labels]))
    assert fast == pytest.approx(brute_force_aupro(scores, masks), abs=2e-3)


def test_aupro_is_one_for_a_perfect_map_and_low_for_an_inverted_one():
    mask = np.zeros((20, 20), bool)
    mask[5:9, 5:9] = True
    labels = mask.astype(int)
    assert aupro(mask.astype(float), labels) == pytest.approx(1.0)
    assert aupro(1.0 - mask.astype(float), labels) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_threshold_is_the_best_over_all_thresholds(seed):
    scores, masks = random_case(seed)
    flat, truth = np.concatenate([s.ravel() for s in scores]), np.concatenate([m.ravel() for m in masks])
    threshold, best = best_iou_threshold(flat, truth)
    brute = max(iou(flat >= t, truth) for t in np.unique(flat))
    assert best == pytest.approx(brute)
    assert iou(flat >= threshold, truth) == pytest.approx(best)


def test_iou_of_disjoint_and_identical_masks():
    a = np.array([True, False, True])
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    assert iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_the_per_image_mean_iou_counts_an_image_with_neither_prediction_nor_defect_as_one():
    empty = np.zeros((4, 4), dtype=bool)
    hit = empty.copy()
    hit[1, 1] = True
    assert mean_iou([empty, hit], [empty, hit]) == 1.0
    assert mean_iou([empty, empty], [empty, hit]) == 0.5
    assert iou(np.concatenate([empty, empty]), np.concatenate([empty, hit])) == 0.0, "pooled, the same masks score 0"


def test_oracle_recall_is_the_best_recall_at_the_same_false_alarm_rate():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.25, 0.5, 0.8, 0.95])
    labels = np.array([False, False, False, False, True, True, True, True])
    assert oracle_recall(scores, labels, 0.0) == 0.25, "above the highest good score: only 0.95"
    assert oracle_recall(scores, labels, 0.25) == 0.75, "one of four good images may be flagged: above 0.3"
