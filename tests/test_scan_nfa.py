"""The scan test: exact chi-square tails on every scale and window, and a background that holds on real normals."""

import json
import math
from dataclasses import replace

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from uflow_batch.config import NFAConfig
from uflow_batch.model.calibration import (
    Calibration,
    ImageTail,
    correction,
    detections,
    false_alarms,
    fit_scaled_chi2,
    fit_image_tail,
    fit_tail,
    log10_chi2_sf,
    tolerated_images,
)
from uflow_batch.model.nfa import BlockNFA
from uflow_batch.model.scan_nfa import NFA_CEILING, ScanNFA, log10_binomial_tail, log10_cross_scale

SHAPES = [(8, 16, 16), (12, 8, 8), (24, 4, 4)]


def noise(n, shapes=SHAPES, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, *shape, generator=generator, dtype=torch.float64) for shape in shapes]


@pytest.mark.parametrize("dof", [1.0, 12.0, 300.0, 4000.0])
def test_the_chi_square_tail_is_exact_where_scipy_can_tell(dof):
    x = torch.tensor([0.0, 0.5, dof, 1.5 * dof + 10], dtype=torch.float64)
    expected = stats.chi2.logsf(x.numpy(), dof) / math.log(10)
    np.testing.assert_allclose(log10_chi2_sf(x, dof).numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dof", [2.0, 12.0, 300.0])
def test_the_chi_square_tail_stays_exact_far_below_double_precision(dof):
    x = torch.tensor([3000.0, 20000.0], dtype=torch.float64)
    exact = [float(mpmath.log10(mpmath.gammainc(dof / 2, v / 2, mpmath.inf, regularized=True))) for v in x.tolist()]
    assert all(e < -300 for e in exact), "the point of the test is the underflow region"
    np.testing.assert_allclose(log10_chi2_sf(x, dof).numpy(), exact, rtol=1e-3)


def reference_log10_p(latent: np.ndarray, window: int) -> np.ndarray:
    """Per-position scipy reference, written independently of the vectorized code."""
    channels, height, width = latent.shape
    out = np.zeros((height - window + 1, width - window + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = latent[:, i : i + window, j : j + window]
            out[i, j] = stats.chi2.logsf((block**2).sum(), window * window * channels) / math.log(10)
    return out


def test_every_block_tail_that_can_matter_matches_the_per_position_reference():
    latents = noise(2)
    latents[0][:, :, 5:9, 5:9] *= 3.0  # make tails reach far
    test = ScanNFA(SHAPES, NFAConfig())
    for (scale, window), values in test.log10_p(test.statistics(latents)).items():
        level = test.relevance(window)
        for b in range(2):
            exact = reference_log10_p(latents[scale][b].numpy(), window)
            expected = np.where(exact < level, exact, 0.0)  # above relevance no test can reach the ceiling: p = 1
            np.testing.assert_allclose(values[b].numpy(), expected, rtol=1e-9, atol=1e-9)
            if scale == 0:
                assert (exact < level).any() and (exact >= level).any(), "both sides of the cut are exercised"


def test_skipping_irrelevant_tails_changes_no_nfa_below_the_ceiling():
    latents = noise(4, seed=5)
    latents[1][0, :, 3:5, 3:5] *= 1.8
    test = ScanNFA(SHAPES, NFAConfig())
    statistics = test.statistics(latents)
    exact = {key: test.fit(*key).log10_sf(sums) for key, sums in statistics.items()}
    for window in test.windows:
        cut = test.cross_scale(test.log10_p(statistics), window) + test.log10_offset()
        full = test.cross_scale(exact, window) + test.log10_offset()
        ceiling = math.log10(NFA_CEILING)
        below = full < ceiling
        assert below.any()
        torch.testing.assert_close(cut[below], full[below], rtol=1e-12, atol=1e-12)
        assert (cut[~below] >= ceiling).all()


def test_every_window_and_cell_of_the_finest_grid_is_counted_in_the_number_of_tests():
    test = ScanNFA(SHAPES, NFAConfig(scan_windows=(1, 3, 5)))
    assert test.number_of_tests() == 3 * 16 * 16
    small = ScanNFA([(4, 4, 4), (8, 2, 2)], NFAConfig(scan_windows=(1, 3, 5)))
    assert small.tests == [(0, 1), (0, 3), (1, 1)], "windows larger than a grid are skipped there"
    assert small.number_of_tests() == 2 * 4 * 4


@pytest.mark.parametrize("k, n", [(1, 1), (1, 4), (2, 4), (4, 4), (3, 6)])
def test_the_binomial_tail_is_exact_where_scipy_can_tell(k, n):
    p = np.array([1e-12, 1e-5, 0.01, 0.3, 0.9, 1.0])
    expected = np.log10(stats.binom.sf(k - 1, n, p))
    np.testing.assert_allclose(log10_binomial_tail(torch.tensor(np.log10(p)), k, n).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_the_binomial_tail_stays_exact_far_below_double_precision():
    log10_p = torch.tensor([-200.0, -1000.0], dtype=torch.float64)
    exact = [float(mpmath.log10(sum(mpmath.binomial(4, j) * mpmath.power(10, v * j) * (1 - mpmath.power(10, v)) ** (4 - j)
                                    for j in range(2, 5)))) for v in log10_p.tolist()]
    np.testing.assert_allclose(log10_binomial_tail(log10_p, 2, 4).numpy(), exact, rtol=1e-9)


def test_a_spot_every_scale_finds_mildly_unusual_fires_though_no_scale_alone_would():
    latents = noise(1, seed=4)
    for scale, (channels, size, _) in enumerate(SHAPES):
        cell = size // 2  # the same spot on every grid
        target = stats.chi2.isf(1e-3, channels)  # each scale alone: p = 1e-3, NFA = 768 * 3 * 1e-3 > 1
        latents[scale][0, :, cell, cell] = math.sqrt(target / channels)
    test = ScanNFA(SHAPES, NFAConfig())
    alone = min(float(p.min()) for p in test.log10_p(test.statistics(latents)).values())
    assert alone + test.log10_n_tests + math.log10(len(SHAPES)) > 0, "no scale's own tail fires under the test's count"
    assert test(latents).min_log10_nfa.item() < -3


def test_cross_scale_evidence_is_the_best_k_of_l_binomial_tail_with_its_count():
    log10_p = torch.tensor([-9.0, -1.0, -2.0, -0.5], dtype=torch.float64).view(1, 4, 1, 1)
    p = np.sort(10.0 ** log10_p.flatten().numpy())
    expected = np.log10(4 * min(stats.binom.sf(k - 1, 4, p[k - 1]) for k in range(1, 5)))
    assert log10_cross_scale(log10_p).item() == pytest.approx(expected, rel=1e-9)


def test_a_single_extreme_cell_is_detected_where_the_block_test_cannot_see_it():
    latents = noise(1, seed=1)
    latents[0][0, :, 7, 9] = 8.0  # one cell of the finest grid, every channel extreme
    scan = ScanNFA(SHAPES, NFAConfig())(latents)
    assert scan.min_log10_nfa.item() < -10
    assert np.unravel_index(int(scan.log10_nfa[0].argmin()), (16, 16)) == (7, 9)
    block = BlockNFA(SHAPES, NFAConfig(windows=(5, 3)))(latents)
    assert block.min_log10_nfa.item() > 0, "one cell of 25 cannot reach NFA < 1 in the paper's test"


def test_a_faint_defect_spread_over_a_block_fires_through_the_larger_windows():
    shapes = [(32, 16, 16), (48, 8, 8)]
    latents = noise(1, shapes, seed=2)
    latents[0][0, :, 4:9, 4:9] *= 1.2  # every cell only mildly unusual
    assert ScanNFA(shapes, NFAConfig())(latents).min_log10_nfa.item() < -2
    cells_only = ScanNFA(shapes, NFAConfig(scan_windows=(1,)))(latents)
    assert cells_only.min_log10_nfa.item() > -1, "no single cell reaches NFA < 0.1 on its own"


def test_a_one_cell_defect_paints_its_cell_not_the_block_around_it():
    latents = noise(1, seed=3)
    latents[0][0, :, 8, 8] = 8.0
    mask = ScanNFA(SHAPES, NFAConfig())(latents).log10_nfa[0] < 0
    assert mask[8, 8] and int(mask.sum()) <= 3


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 10.0])
def test_pure_noise_gives_at_most_epsilon_false_detections_per_image(epsilon):
    test = ScanNFA(SHAPES, NFAConfig())
    maps = [test(noise(50, seed=seed)) for seed in range(4)]
    measured = false_alarms(maps, (epsilon,))
    assert measured.detections_per_image[0] <= epsilon
    assert measured.images_flagged[0] <= epsilon


def correlated_normals(n, seed):
    """What a real flow gives on held-out normal images: over-dispersed and correlated across channels."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for c, h, w in SHAPES:
        shared = torch.randn(n, 1, h, w, generator=generator, dtype=torch.float64)
        out.append(1.3 * (0.6 * shared + 0.8 * torch.randn(n, c, h, w, generator=generator, dtype=torch.float64)))
    return out


def test_the_theoretical_background_floods_real_normals_and_the_fitted_one_keeps_the_promise():
    test = ScanNFA(SHAPES, NFAConfig())
    fresh = correlated_normals(100, seed=11)
    flooded = false_alarms([test(fresh)], (1.0,))
    assert flooded.images_flagged[0] > 0.9
    held_out = correlated_normals(100, seed=10)
    calibration = test.calibrate([[z[i : i + 20] for z in held_out] for i in range(0, 100, 20)])
    assert calibration.n_images == 100 and calibration.false_alarms.n_images == 100
    kept = false_alarms([test(fresh)], (0.1, 1.0, 10.0))
    # 100 held-out images pin the 0.1 level only to about +-30%: that much is sampling, not a broken promise.
    for epsilon, measured, flagged, slack in zip(kept.epsilons, kept.detections_per_image, kept.images_flagged, (1.5, 1, 1)):
        assert measured <= slack * epsilon and flagged <= slack * epsilon


def test_the_fit_recovers_the_far_tail_of_a_scaled_chi_square():
    samples = 2.5 * stats.chi2.rvs(7.0, size=200_000, random_state=np.random.default_rng(4))
    fit = fit_scaled_chi2(samples, dof=50.0)
    for tail in (1e-6, 1e-9):  # far beyond the samples: the extrapolation the test relies on
        assert fit.scale * stats.chi2.isf(tail, fit.dof) == pytest.approx(2.5 * stats.chi2.isf(tail, 7.0), rel=0.1)
    light = stats.chi2.rvs(50.0, size=200_000, random_state=np.random.default_rng(5))
    assert fit_scaled_chi2(light, dof=20.0).dof == 20.0, "a lighter tail than the theory's is not trusted"


def maps_with_spots(spots_per_image, significance=8.0, size=16):
    """Held-out maps: log10 NFA at the ceiling except the given number of separate spots per image."""
    maps = []
    for spots in spots_per_image:
        grid = torch.full((1, size, size), 2.0, dtype=torch.float64)
        for k in range(spots):
            grid[0, 2 + 3 * k, 2] = -significance
        maps.append(_nfa_maps(grid))
    return maps


def _nfa_maps(grid):
    from uflow_batch.model.anomaly import NFAMaps

    return NFAMaps(log10_nfa=grid, min_log10_nfa=grid.flatten(1).amin(dim=1))


def test_the_correction_tolerates_one_atypical_held_out_image_in_fifteen_but_not_two():
    one_odd = maps_with_spots([3] + [0] * 14)
    assert correction(one_odd) == 0.0
    two_odd = maps_with_spots([1, 1] + [0] * 13)
    factor = correction(two_odd)
    assert factor >= 7.0  # the second one must be pushed above NFA = 0.1
    shifted = [_nfa_maps(m.log10_nfa + factor) for m in two_odd]
    assert false_alarms(shifted, (0.1,)).images_flagged[0] <= 0.1


def test_a_detection_is_a_region_not_every_window_that_fires_on_it():
    grid = np.full((8, 8), 2.0)
    grid[2:4, 2:4] = -5.0
    grid[6, 6] = -3.0
    assert detections(grid, -5.0, 1.0) == 2
    assert detections(np.full((8, 8), 2.0), -1.0, 1.0) == 1, "a test that fires with no cell below epsilon flags the image"


def test_the_calibration_travels_as_json():
    test = ScanNFA(SHAPES, NFAConfig())
    calibration = test.calibrate([correlated_normals(10, seed=12)])
    restored = Calibration.from_dict(json.loads(json.dumps(calibration.as_dict())))
    assert restored == calibration


def test_with_fewer_than_ten_held_out_images_no_image_is_tolerated():
    few = maps_with_spots([1] + [0] * 8)
    assert tolerated_images(9) == 0 and tolerated_images(15) == 1 and tolerated_images(100) == 1
    assert correction(few) >= 7.0, "nine images cannot tell an atypical part from a badly fitted background"


def test_a_heavy_tail_is_extrapolated_from_its_own_exceedances_not_from_the_bulk():
    rng = np.random.default_rng(6)
    samples = stats.t.rvs(3, size=400_000, random_state=rng) ** 2  # P(S > x) falls like x^-1.5, no chi-square does
    truth = stats.t.isf(0.5e-6, 3) ** 2  # P(S > truth) = 1e-6
    tailed = fit_tail(samples, dof=50.0)
    assert tailed.tail_start is not None and tailed.tail_shape > 0.3
    assert tailed.statistic_at(-6.0) == pytest.approx(truth, rel=0.35)
    bulk_only = fit_scaled_chi2(samples, dof=50.0)
    assert bulk_only.statistic_at(-6.0) < 0.3 * truth, "the chi-square shape would flag normal parts a hundred times too often"
    values = tailed.log10_sf(torch.tensor([0.0, tailed.tail_start, truth], dtype=torch.float64))
    assert values[0] == 0.0 and values[1] == pytest.approx(math.log10(tailed.tail_mass)) and values[2] == pytest.approx(-6.0, abs=0.3)


def test_scales_that_are_not_jointly_independent_are_combined_by_their_minimum_and_keep_the_promise():
    one = noise(50, shapes=[(8, 16, 16)], seed=6)[0]
    copies = [one, one.clone(), one.clone()]  # three "scales" that are one: the worst dependence there is
    shapes = [(8, 16, 16)] * 3
    product = false_alarms([ScanNFA(shapes, NFAConfig())(copies)], (1.0,))
    assert product.detections_per_image[0] > 1.0, "k-of-L tails multiply evidence that is not independent"
    bonferroni = false_alarms([ScanNFA(shapes, NFAConfig(), scales_independent=False)(copies)], (0.1, 1.0))
    assert all(d <= e for d, e in zip(bonferroni.detections_per_image, bonferroni.epsilons))


def test_an_image_without_evidence_reports_its_nfa_at_the_ceiling():
    quiet = [torch.zeros(1, *shape, dtype=torch.float64) for shape in SHAPES]  # every z = 0: nothing unusual anywhere
    assert ScanNFA(SHAPES, NFAConfig())(quiet).min_log10_nfa.item() == pytest.approx(math.log10(NFA_CEILING))


def test_the_image_tail_extrapolates_how_widely_whole_normal_images_spread():
    rng = np.random.default_rng(7)
    # Significances of normal images that spread 4x wider than a calibrated test's (10^-t): P(> t) = 0.5 e^-(t - 1) / 1.7.
    def normal_images(n):
        above = rng.random(n) < 0.5
        return np.where(above, 1.0 + rng.exponential(1.7, size=n), rng.random(n))

    spread = normal_images(4000)
    tail = fit_image_tail(spread)
    assert tail.start == pytest.approx(1.0, abs=0.1) and tail.mass == pytest.approx(0.5, abs=0.02)
    assert tail.scale == pytest.approx(1.7, rel=0.1)
    fresh = normal_images(200_000)
    flagged = tail.log10_p(-torch.tensor(fresh)) < -2.0
    assert flagged.double().mean().item() == pytest.approx(0.01, rel=0.2), "the verdict at 0.01 flags 1 % of such images"
    assert (fresh > 2.0).mean() > 0.15, "their smallest NFA alone would flag a sixth of them"


def test_the_image_tail_never_makes_the_test_bolder_than_a_calibrated_one():
    calibrated = np.random.default_rng(8).exponential(1 / math.log(10), size=2000)  # P(significance > t) = 10^-t
    assert fit_image_tail(calibrated).scale == pytest.approx(1 / math.log(10), rel=0.1)
    assert fit_image_tail(0.1 * calibrated).scale == 1 / math.log(10), "a narrower spread than theory's is not trusted"
    assert fit_image_tail([-2.0] * 13 + [1.0, 3.0]) is None, "two images above the ceiling are no tail"
    test = ScanNFA(SHAPES, NFAConfig())
    spot = noise(2, seed=9)
    spot[0][1, :, 5, 5] = 9.0
    plain = test(spot)
    tail = ImageTail(start=-1.0, mass=0.5, scale=3.0)
    test.calibration = replace(test.calibration, image_tail=tail)
    raised = test(spot)
    assert plain.min_log10_nfa[1] < -2.0 and raised.min_log10_nfa[1] > plain.min_log10_nfa[1], \
        "an image the tail finds less surprising is less significant"
    for before, after in ((plain.min_log10_nfa, raised.min_log10_nfa), (plain.log10_nfa, raised.log10_nfa)):
        assert torch.equal(after, torch.maximum(before, tail.log10_p(before)).clamp_max(2.0)), "the map follows its image"


def test_calibration_fits_the_image_tail_without_the_tolerated_image_and_records_its_effect():
    test = ScanNFA(SHAPES, NFAConfig())
    held_out = correlated_normals(30, seed=13)
    held_out[0][0, :, 4, 4] = 12.0  # one atypical part
    calibration = test.calibrate([[z[i : i + 10] for z in held_out] for i in range(0, 30, 10)])
    significance = -test([z[1:] for z in held_out]).min_log10_nfa
    assert calibration.image_tail is not None and calibration.image_tail.start < 2.0
    assert calibration.false_alarms.images_flagged[0] <= 1 / 30 + 1e-9, "at 0.01 at most the tolerated image"
    assert (significance > 2.0).sum() == 0
