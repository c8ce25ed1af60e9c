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
    result = image_result(0.7, neg_log10_nfa, 4.0, (64, 128), epsilon=1.0, false_alarm_rate=0.01)
    assert result.mask.shape == (64, 128)
    assert result.is_anomalous and len(result.regions) == 1
    region = result.regions[0]
    assert 14 <= region.x0 <= 34 and 14 <= region.y0 <= 18
    assert result.defect_area_px == result.mask.sum()
    assert result.defect_area_fraction == pytest.approx(result.mask.sum() / (64 * 128))
    assert result.max_neg_log10_nfa == pytest.approx(4.0)


def test_the_false_alarm_rate_decides_the_verdict_from_the_images_significance():
    neg_log10_nfa = torch.full((8, 8), 1.5, dtype=torch.float64)
    flagged = image_result(0.1, neg_log10_nfa, 2.5, (8, 8), epsilon=1.0, false_alarm_rate=0.01)  # NFA 10^-2.5 < 0.01
    assert flagged.is_anomalous and flagged.false_alarm_rate == 0.01
    assert not image_result(0.1, neg_log10_nfa, 2.5, (8, 8), epsilon=1.0, false_alarm_rate=0.001).is_anomalous


def test_epsilon_sets_the_mask_threshold_of_a_flagged_image():
    neg_log10_nfa = torch.zeros(8, 8, dtype=torch.float64)
    neg_log10_nfa[1:3, 1:3], neg_log10_nfa[5:7, 5:7] = 3.0, 0.5
    loose = image_result(0.1, neg_log10_nfa, 3.0, (8, 8), epsilon=1.0, false_alarm_rate=0.01)
    strict = image_result(0.1, neg_log10_nfa, 3.0, (8, 8), epsilon=0.01, false_alarm_rate=0.01)
    assert len(loose.regions) == 2 and len(strict.regions) == 1
    assert strict.mask[1:3, 1:3].all() and not strict.mask[5:7, 5:7].any()


def test_an_image_that_is_not_flagged_has_an_empty_mask():
    neg_log10_nfa = torch.full((8, 8), 1.5, dtype=torch.float64)  # below epsilon = 1 everywhere
    clean = image_result(0.1, neg_log10_nfa, 1.5, (8, 8), epsilon=1.0, false_alarm_rate=0.01)  # but NFA 0.03 > 0.01
    assert not clean.is_anomalous and clean.regions == [] and clean.defect_area_px == 0


def test_a_flagged_image_always_shows_where_even_when_interpolation_shaves_its_peak():
    neg_log10_nfa = torch.zeros(4, 4, dtype=torch.float64)
    neg_log10_nfa[2, 1] = 1.2
    result = image_result(0.1, neg_log10_nfa, 2.5, (16, 16), epsilon=0.01, false_alarm_rate=0.01)
    assert result.is_anomalous and result.defect_area_px == 1 and len(result.regions) == 1
