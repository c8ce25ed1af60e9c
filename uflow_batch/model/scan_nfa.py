"""The scan test: chi-square evidence on every latent scale and several window sizes, combined across scales.

Why not only the paper's block test (:mod:`.nfa`)? It binarizes each latent
value and averages the count over channels, so its evidence is capped by the
fraction of a block's cells that fire: a defect covering one to four cells of
the finest grid can never reach NFA < 1, however extreme its latents, and the
coarser scales are not tested at all.

Here the statistic keeps the magnitudes. For scale l, window side w and the
w x w block centred on each cell, S = sum of z^2 over the block's w^2 * C_l
values. Under the background model (a normal image) S / s follows
chi-square(k), with (s, k) = (1, w^2 C_l) for latents that are exactly
N(0, I). For a real flow on real normal images the law is *fitted* on
held-out normal images (:mod:`.calibration`): a scaled chi-square with fewer
degrees of freedom for the bulk (flows are over-dispersed on images they did
not train on, and neighbouring latents are correlated) and a generalized
Pareto tail where the samples allow one. Window 1 lets a single extreme cell
fire; windows 3 and 5 let a faint defect spread over a block add up.

A defect seldom lives on one scale: the same spot is somewhat unusual on
several (U-Flow's own anomaly map averages the scales for that reason). So
one test is made per cell x of the finest grid and window w: it takes the
L per-scale tail probabilities p_1..p_L of the blocks that contain x, one per
scale, and asks how unlikely it is that k of L independent uniform values
are as small as the k smallest of them, for the best k:
P_k = P(Binomial(L, p_(k)) >= k), and P = L * min_k P_k (Bonferroni over
k). A single extreme scale fires through k = 1 (P = L p_(1) at most); a
defect that every scale sees moderately fires through k = L, where no scale
alone would. The scales are independent under the background model of
U-Flow: its latents of all scales together are N(0, I) on normal images.
Flows that map each scale on its own (FastFlow, CFlow-AD) give latents that
are N(0, I) scale by scale but transforms of the same image's features
across scales, so for them (``scales_independent=False``) only k = 1 is
used: P = L p_(1), the Bonferroni bound, which holds whatever the dependence
(a product of the scales' tails would not).

Every test is counted: N = (windows) x (cells of the finest grid), and
log10 NFA = log10 N + log10 P (+ a calibration correction, see
:class:`~.calibration.Calibration`). The per-image verdict uses the smallest
NFA over all tests, so the expected number of false detections per normal
image is at most epsilon, and so is the probability of flagging a normal
image; a calibrated model raises that smallest NFA to the probability that
whole normal images reach it where that is higher (the image tail of
:mod:`.calibration`).

The tails are exact: the chi-square one is the regularized upper incomplete
gamma Q(k/2, S/(2s)) in float64 on the model's device
(``torch.special.gammaincc``), with its asymptotic expansion where it
underflows (below 1e-280); the binomial one is summed in log space. So
-log10 NFA stays finite and ordered for arbitrarily strong defects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..config import NFAConfig
from .anomaly import NFAMaps
from .calibration import BackgroundFit, Calibration, fit_background, theoretical_calibration

# NFAs above this are reported as this: no detection or mask at any epsilon up to it depends on them.
NFA_CEILING = 100.0

_LN10 = math.log(10.0)


def cell_energy(latent: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float64: the sum of z^2 over channels, S of the single-cell test."""
    return latent.to(torch.float64).pow(2).sum(dim=1)


def block_sums(energy: torch.Tensor, window: int) -> torch.Tensor:
    """S per valid w x w position, (B, H-w+1, W-w+1): the cell energies summed over the block."""
    if window == 1:
        return energy
    return F.avg_pool2d(energy[:, None], window, stride=1, divisor_override=1)[:, 0]


def log10_binomial_tail(log10_p: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """log10 P(Binomial(n, p) >= k) elementwise, float64, exact for p down to any underflow."""
    ln_p = (log10_p.to(torch.float64) * _LN10).clamp_max(0.0)
    ln_q = torch.log1p(-torch.exp(ln_p))  # -inf where p = 1
    terms = []
    for j in range(k, n + 1):
        ln_choose = math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
        failures = ln_q * (n - j) if j < n else torch.zeros_like(ln_q)
        terms.append(ln_choose + j * ln_p + failures)
    return torch.logsumexp(torch.stack(terms), dim=0) / _LN10


def log10_cross_scale(log10_p: torch.Tensor, independent: bool = True) -> torch.Tensor:
    """(B, L, H, W) per-scale log10 p -> (B, H, W) log10 P of the cross-scale test (see the module docstring).

    Only cells where some scale has p < 1 are computed: with the tails above
    the relevance level reported as p = 1 (:meth:`ScanNFA.log10_p`), that is
    a small share of a normal image.
    """
    batch, scales, height, width = log10_p.shape
    cells = log10_p.permute(0, 2, 3, 1).reshape(-1, scales)
    active = (cells < 0).any(dim=1)
    ordered = torch.sort(cells[active], dim=1).values
    orders = range(1, scales + 1) if independent else (1,)
    per_k = torch.stack([log10_binomial_tail(ordered[:, k - 1], k, scales) for k in orders])
    out = torch.zeros(cells.shape[0], dtype=torch.float64, device=log10_p.device)
    out[active] = (per_k.amin(dim=0) + math.log10(scales)).clamp_max(0.0)
    return out.view(batch, height, width)


class ScanNFA(nn.Module):
    """Log10 NFA of every (window, cell) test, and the maps a mask is cut from.

    ``latent_shapes`` lists each scale's (C, H, W), finest first; a window
    larger than a scale's grid is skipped on that scale.
    ``scales_independent`` says whether the flow makes its scales' latents
    jointly independent (U-Flow does; per-scale flows do not).
    """

    def __init__(self, latent_shapes: Sequence[Sequence[int]], config: NFAConfig,
                 calibration: Calibration | None = None, scales_independent: bool = True) -> None:
        super().__init__()
        self.config = config
        self.scales_independent = scales_independent
        self.latent_shapes = [tuple(int(v) for v in shape) for shape in latent_shapes]
        self.tests = [
            (scale, window)
            for scale, (_, height, width) in enumerate(self.latent_shapes)
            for window in config.scan_windows
            if window <= min(height, width)
        ]
        self.windows = sorted({window for _, window in self.tests})
        self.calibration = calibration or theoretical_calibration(self.latent_shapes, config.scan_windows)
        self.log10_n_tests = math.log10(self.number_of_tests())

    def number_of_tests(self) -> int:
        _, height, width = self.latent_shapes[0]
        return len(self.windows) * height * width

    def fit(self, scale: int, window: int) -> BackgroundFit:
        return self.calibration.fit(scale, window)

    def statistics(self, latents: Sequence[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """The block sums S of every (scale, window), on each one's own grid of valid positions."""
        energies = {scale: cell_energy(latents[scale]) for scale in {s for s, _ in self.tests}}
        return {(scale, window): block_sums(energies[scale], window) for scale, window in self.tests}

    def log10_p(self, statistics: dict[tuple[int, int], torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """log10 P(S) under the background model, for every (scale, window) and position, 0 above relevance.

        Only tails that could matter are evaluated exactly: a probability
        above :meth:`relevance` cannot bring any cross-scale test of its
        window below ``NFA_CEILING`` (through the best k, the L-th smallest
        value counts at most p^L), so it is reported as 1 and on a normal
        image most tails are never computed.
        """
        out = {}
        for (scale, window), sums in statistics.items():
            fit = self.fit(scale, window)
            level = self.relevance(window)
            relevant = sums > fit.statistic_at(level - fit.log10_factor)
            values = torch.zeros_like(sums)
            values[relevant] = fit.log10_sf(sums[relevant]).clamp(max=level)
            out[scale, window] = values.masked_fill(values >= level, 0.0)
        return out

    def relevance(self, window: int) -> float:
        """log10 of the largest per-scale tail probability that can matter to a test of this window."""
        scales = sum(1 for _, w in self.tests if w == window)
        level = math.log10(NFA_CEILING) - self.log10_offset() - math.log10(scales)
        # With few tests (DifferNet's one per image) every tail can matter: a probability is at most 1.
        return min(0.0, level / scales if self.scales_independent else level)

    def cross_scale(self, log10_p: dict[tuple[int, int], torch.Tensor], window: int) -> torch.Tensor:
        """(B, H0, W0) log10 P of the cross-scale test of ``window`` at every cell of the finest grid.

        Each scale's block is the one centred on the cell's own cell of that
        scale; where that block would leave the grid, the scale adds no
        evidence (p = 1).
        """
        size = self.latent_shapes[0][1:]
        pad = window // 2
        per_scale = []
        for scale in (s for s, w in self.tests if w == window):
            values = F.pad(log10_p[scale, window][:, None], (pad,) * 4, value=0.0)
            per_scale.append(F.interpolate(values, size=size, mode="nearest")[:, 0])
        return log10_cross_scale(torch.stack(per_scale, dim=1), self.scales_independent)

    def deviates(self, energy: torch.Tensor, scale: int) -> torch.Tensor:
        """(B, H, W): cells whose own single-cell tail probability is below 1 - ``nfa.mask_p``."""
        return energy > self.fit(scale, 1).statistic_at(math.log10(1.0 - self.config.mask_p))

    def log10_offset(self) -> float:
        """log10 of the number of tests times the calibration's correction factor."""
        return self.log10_n_tests + self.calibration.log10_factor

    def calibrate(self, latent_batches: Sequence[Sequence[torch.Tensor]]) -> Calibration:
        """Fit the background on held-out normal latents (see :mod:`.calibration`)."""
        return fit_background(self, latent_batches)

    def forward(self, latents: Sequence[torch.Tensor]) -> NFAMaps:
        statistics = self.statistics(latents)
        log10_p = self.log10_p(statistics)
        offset = self.log10_offset()
        tests = {window: self.cross_scale(log10_p, window) for window in self.windows}
        smallest = torch.stack([p.flatten(1).amin(dim=1) for p in tests.values()]).amin(dim=0) + offset
        min_log10_nfa = self._through_image_tail(smallest)
        return NFAMaps(log10_nfa=self._through_image_tail(self._mask_map(statistics, tests, offset)), min_log10_nfa=min_log10_nfa)

    def _through_image_tail(self, log10_nfa: torch.Tensor) -> torch.Tensor:
        """Raise NFAs to the image tail's probability where it is higher, then cap them at ``NFA_CEILING``.

        Whole normal images spread wider than their cells tell (see
        :mod:`.calibration`). The mask map goes through the same monotone
        map as the image's smallest NFA, so a map region below epsilon
        exists only where the image itself is significant at epsilon.
        """
        tail = self.calibration.image_tail
        if tail is not None:
            log10_nfa = torch.maximum(log10_nfa, tail.log10_p(log10_nfa))
        return log10_nfa.clamp_max(math.log10(NFA_CEILING))  # above the ceiling, tails were not computed

    def _mask_map(self, statistics: dict, tests: dict[int, torch.Tensor], offset: float) -> torch.Tensor:
        """log10 NFA per cell of the finest grid, for cutting masks, at most ``NFA_CEILING``.

        A cell takes the smallest NFA of the tests whose finest-grid block
        contains it, but only if the cell itself deviates (its single-cell
        tail probability below 1 - ``nfa.mask_p``): otherwise a strong
        one-cell defect would paint the whole 5x5 block around it, and a
        coarse scale's evidence a 32x32-pixel square.
        """
        best = None
        for window, values in tests.items():
            values = values[:, None]
            if window > 1:
                pad = window // 2
                values = -F.max_pool2d(F.pad(-values, (pad,) * 4, value=-math.inf), window, stride=1)
            best = values if best is None else torch.minimum(best, values)
        floor = math.log10(NFA_CEILING) - offset
        best = torch.where(self.deviates(statistics[0, 1], 0)[:, None], best.clamp_max(floor), torch.full_like(best, floor))
        return best[:, 0] + offset
