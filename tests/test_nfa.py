"""The paper's block test: exact binomial tails, vectorized, and calibrated on noise."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch.nn import functional as F

from uflow_batch.config import NFAConfig
from uflow_batch.model.nfa import BlockNFA, candidate_threshold, log10_binomial_tail, log10_tail_table


def test_candidate_threshold_is_the_chi_square_quantile():
    assert candidate_threshold(0.9) == pytest.approx(2.705543454, rel=1e-9)
    z = np.random.default_rng(0).standard_normal(1_000_000)
    assert np.mean(z**2 > candidate_threshold(0.9)) == pytest.approx(0.1, abs=2e-3)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_integer_counts_give_the_probability_of_at_least_k_candidates(window):
    n = window * window
    table = log10_tail_table(window, 1, 0.9)
    k = np.arange(n + 1)
    # "at least k" is P(X >= k) = sf(k - 1); scipy's sf(k) would be "more than k".
    expected = np.log10(stats.binom.sf(k - 1, n, 0.1))
    np.testing.assert_allclose(table, expected, rtol=1e-10, atol=1e-12)
    if n > 1:  # scipy's sf(k) = P(X > k) is another, smaller number
        assert not np.allclose(table[1:-1], np.log10(stats.binom.sf(k[1:-1], n, 0.1)))


def test_fractional_counts_follow_the_regularized_incomplete_beta():
    x = np.array([0.25, 1.5, 3.7, 12.01, 24.9])
    expected = np.log10(special.betainc(x, 25 - x + 1, 0.1))
    np.testing.assert_allclose(log10_binomial_tail(x, 25, 0.1), expected, rtol=1e-12)


def test_tail_is_monotone_and_keeps_precision_near_one():
    table = log10_tail_table(5, 59, 0.9)
    assert table[0] == 0.0
    assert np.all(np.diff(table) <= 0)
    # P(X >= 1/59) is just below 1: its log must not round to zero.
    assert -1e-3 < table[1] < 0


def reference_log10_p(latent: np.ndarray, window: int, p: float) -> np.ndarray:
    """Per-pixel scipy reference, written independently of the vectorized code."""
    channels, height, width = latent.shape
    threshold = stats.chi2.ppf(p, 1)
    candidates = (latent**2 > threshold).sum(axis=0)
    half, n = window // 2, window * window
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            block = candidates[max(0, i - half) : i + half + 1, max(0, j - half) : j + half + 1]
            x = block.sum() / channels
            out[i, j] = 0.0 if x == 0 else math.log10(special.betainc(x, n - x + 1, 1 - p))
    return out


def random_latents(rng, shapes, anomaly_scale=4.0):
    """N(0,1) latents with a patch of inflated values so tails reach far."""
    latents = []
    for c, h, w in shapes:
        z = rng.standard_normal((2, c, h, w))
        z[:, :, h // 4 : h // 2, w // 4 : w // 2] *= anomaly_scale
        latents.append(torch.from_numpy(z))
    return latents


def test_vectorized_nfa_matches_the_scipy_reference_per_pixel():
    rng = np.random.default_rng(1)
    shapes = [(7, 16, 16), (12, 8, 8), (20, 4, 4)]
    config = NFAConfig(p=0.9, windows=(5, 3))
    nfa = BlockNFA(shapes, config)
    latents = random_latents(rng, shapes)

    per_scale = nfa.log10_probabilities(latents)
    for scale, window in enumerate(config.windows):
        for b in range(2):
            expected = reference_log10_p(latents[scale][b].numpy(), window, config.p)
            np.testing.assert_allclose(per_scale[scale][b].numpy(), expected, rtol=1e-6, atol=1e-12)

    combined = nfa(latents).log10_nfa.numpy()
    n_tests = 16 * 16 + 8 * 8
    for b in range(2):
        fine = reference_log10_p(latents[0][b].numpy(), 5, 0.9)
        coarse = np.kron(reference_log10_p(latents[1][b].numpy(), 3, 0.9), np.ones((2, 2)))
        np.testing.assert_allclose(combined[b], math.log10(n_tests) + fine + coarse, rtol=1e-6)
    assert combined.min() < 0, "the inflated patch should be detected"


def test_the_test_is_exact_at_its_attainable_levels():
    """Single scale, one channel: P(log10 P <= table[k]) must equal P(X >= k)."""
    nfa = BlockNFA([(1, 24, 24)], NFAConfig(windows=(3,)))
    z = torch.randn(400, 1, 24, 24, generator=torch.Generator().manual_seed(3))
    inner = nfa.log10_probabilities([z])[0][:, 1:-1, 1:-1].flatten().numpy()  # full blocks only
    table = log10_tail_table(3, 1, 0.9)
    for k in (1, 2, 3, 4):
        expected = stats.binom.sf(k - 1, 9, 0.1)
        observed = np.mean(inner <= table[k] + 1e-12)
        assert observed == pytest.approx(expected, rel=0.05, abs=2e-4), k


def test_pure_noise_gives_at_most_epsilon_false_detections_per_image():
    shapes = [(59, 32, 32), (76, 16, 16), (160, 8, 8)]
    for epsilon in (1.0, 100.0):
        nfa = BlockNFA(shapes, NFAConfig(epsilon=epsilon))
        generator = torch.Generator().manual_seed(4)
        detections, images = 0, 0
        for _ in range(10):
            latents = [torch.randn(20, *s, generator=generator) for s in shapes]
            detections += int((nfa(latents).log10_nfa < math.log10(epsilon)).sum())
            images += 20
        assert detections / images <= epsilon


def test_counts_are_exact_integers_with_zero_padding_at_borders():
    nfa = BlockNFA([(2, 4, 4)], NFAConfig(windows=(3,)))
    z = torch.zeros(1, 2, 4, 4)
    z[0, :, 0, 0] = 10.0  # both channels are candidates at the corner
    counts = nfa.candidate_counts(z, 3)[0]
    expected = F.pad(torch.ones(1, 1, 2, 2) * 2, (0, 2, 0, 2))[0, 0].long()
    assert torch.equal(counts, expected)


def test_more_windows_than_scales_is_rejected():
    with pytest.raises(ValueError, match="windows"):
        BlockNFA([(8, 4, 4)], NFAConfig(windows=(5, 3)))


def test_the_image_significance_is_the_smallest_nfa_of_the_map():
    shapes = [(7, 16, 16), (12, 8, 8)]
    maps = BlockNFA(shapes, NFAConfig(windows=(5, 3)))(random_latents(np.random.default_rng(2), shapes))
    assert torch.equal(maps.min_log10_nfa, maps.log10_nfa.flatten(1).amin(dim=1))
