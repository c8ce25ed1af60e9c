"""Anomaly maps, masks and regions: the per-image contract."""

import math

import numpy as np
import pytest
import torch

from uflow_batch.model.anomaly import anomaly_map, find_regions, image_result


def test_anomaly_map_is_zero_for_typical_latents_and_near_one_for_extreme_ones():
    typical = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 4, 4)]
    assert torch.allclose(anomaly_map(typical, (32, 32)), torch.zeros(1, 32, 32))
    extreme = [torch.full((1, 4, 8, 8), 10.0), torch.full((1, 8, 4, 4), 10.0)]
    assert torch.all(anomaly_map(extreme, (32, 32)) > 0.99)


def test_anomaly_map_averages_scales_and_localizes():
    fine = torch.zeros(1, 4, 8, 8)
    fine[0, :, 2, 5] = 6.0
    amap = anomaly_map([fine, torch.zeros(1, 8, 4, 4)], (8, 8))[0]
    assert amap.argmax() == 2 * 8 + 5
    assert amap.max().item() == pytest.approx(0.5 * (1 - math.exp(-18)), rel=1e-6), "one of two scales is anomalous"


def test_regions_are_8_connected_with_boxes_areas_and_peaks():
    mask = np.zeros((10, 12), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal line: one region
    mask[6:9, 7:11] = True
    score = np.zeros(mask.shape)
    score[2, 2], score[7, 9] = 5.0, 9.0
    regions = sorted(find_regions(mask, score), key=lambda r: r.x0)
    assert [(r.x0, r.y0, r.x1, r.y1, r.area_px) for r in regions] == [(1, 1, 4, 4, 3), (7, 6, 11, 9, 12)]
    assert [r.peak_neg_log10_nfa for r in regions] == [5.0, 9.0]


def test_image_result_is_at_the_original_resolution():
    neg_log10_nfa = torch.zeros(32, 32, dtype=torch.float64)
    neg_log10_nfa[8:16, 8:16] = 4.0  # NFA = 1e-4 < epsilon = 1
    result = image_result(0.7, neg_log10_nfa, (64, 128), epsilon=1.0)
    assert result.mask.shape == (64, 128)
    assert result.is_anomalous and len(result.regions) == 1
    region = result.regions[0]
    assert 14 <= region.x0 <= 34 and 14 <= region.y0 <= 18
    assert result.defect_area_px == result.mask.sum()
    assert result.defect_area_fraction == pytest.approx(result.mask.sum() / (64 * 128))
    assert result.max_neg_log10_nfa == pytest.approx(4.0)


def test_epsilon_sets_the_detection_threshold():
    neg_log10_nfa = torch.full((8, 8), 1.5, dtype=torch.float64)
    assert image_result(0.1, neg_log10_nfa, (8, 8), epsilon=1.0).is_anomalous
    assert not image_result(0.1, neg_log10_nfa, (8, 8), epsilon=0.01).is_anomalous
    clean = image_result(0.1, torch.full((8, 8), -2.0, dtype=torch.float64), (8, 8), epsilon=1.0)
    assert clean.regions == [] and clean.defect_area_px == 0
