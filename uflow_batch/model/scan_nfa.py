"""The scan test: chi-square evidence over every latent scale and several window sizes.

Why not only the paper's block test (:mod:`.nfa`)? It binarizes each latent
value and averages the count over channels, so its evidence is capped by the
fraction of a block's cells that fire: a defect covering one to four cells of
the finest grid can never reach NFA < 1, however extreme its latents, and the
coarser scales are not tested at all.

Here the statistic keeps the magnitudes. For scale l, window side w and the
w x w block at each position (valid positions only, so every test sees a
full block), S = sum of z^2 over the block's w^2 * C_l values. Under the
background model (a normal image) S / s follows chi-square(k), with
(s, k) = (1, w^2 C_l) for latents that are exactly N(0, I). For a real flow
on real normal images the law is *fitted* on held-out normal images
(:mod:`.calibration`): a scaled chi-square with fewer degrees of freedom for
the bulk (flows are over-dispersed on images they did not train on, and
neighbouring latents are correlated) and a generalized Pareto tail where the
samples allow one. Window 1 lets a single extreme cell fire; windows 3 and 5
let a faint defect spread over a block add up.

Every test is counted: N = sum over scales and windows of the valid
positions. log10 NFA = log10 N + log10 P(chi2(k) >= S / s) (+ a calibration
correction, see :class:`~.calibration.Calibration`). The per-image verdict
uses the smallest NFA over all tests, so the expected number of false
detections per normal image is at most epsilon, and so is the probability of
flagging a normal image.

The chi-square tail is exact: the regularized upper incomplete gamma
Q(k/2, S/(2s)) in float64 on the model's device (``torch.special.gammaincc``);
where it underflows (below 1e-280) its asymptotic expansion takes over, so
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


def cell_energy(latent: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float64: the sum of z^2 over channels, S of the single-cell test."""
    return latent.to(torch.float64).pow(2).sum(dim=1)


def block_sums(energy: torch.Tensor, window: int) -> torch.Tensor:
    """S per valid w x w position, (B, H-w+1, W-w+1): the cell energies summed over the block."""
    if window == 1:
        return energy
    return F.avg_pool2d(energy[:, None], window, stride=1, divisor_override=1)[:, 0]


class ScanNFA(nn.Module):
    """Log10 NFA of every (scale, window, position) test, and the maps a mask is cut from.

    ``latent_shapes`` lists each scale's (C, H, W), finest first; a window
    larger than a scale's grid is skipped on that scale.
    """

    def __init__(self, latent_shapes: Sequence[Sequence[int]], config: NFAConfig,
                 calibration: Calibration | None = None) -> None:
        super().__init__()
        self.config = config
        self.latent_shapes = [tuple(int(v) for v in shape) for shape in latent_shapes]
        self.tests = [
            (scale, window)
            for scale, (_, height, width) in enumerate(self.latent_shapes)
            for window in config.scan_windows
            if window <= min(height, width)
        ]
        self.calibration = calibration or theoretical_calibration(self.latent_shapes, config.scan_windows)
        self.log10_n_tests = math.log10(self.number_of_tests())

    def number_of_tests(self) -> int:
        return sum((self.latent_shapes[s][1] - w + 1) * (self.latent_shapes[s][2] - w + 1) for s, w in self.tests)

    def fit(self, scale: int, window: int) -> BackgroundFit:
        return self.calibration.fit(scale, window)

    def statistics(self, latents: Sequence[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """The block sums S of every test, on each test's own grid of valid positions."""
        energies = {scale: cell_energy(latents[scale]) for scale in {s for s, _ in self.tests}}
        return {(scale, window): block_sums(energies[scale], window) for scale, window in self.tests}

    def log10_p(self, statistics: dict[tuple[int, int], torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """log10 P(S) under the background model, per test, floored where the NFA reaches ``NFA_CEILING``.

        Only the tests that could matter are evaluated exactly: a test whose
        NFA is above the ceiling can be neither a detection nor part of a
        mask at any epsilon up to it, so on a normal image almost no tail is
        computed at all.
        """
        floor = math.log10(NFA_CEILING) - self.log10_offset()
        out = {}
        for (scale, window), sums in statistics.items():
            fit = self.fit(scale, window)
            relevant = sums > fit.statistic_at(floor - fit.log10_factor)
            values = torch.full_like(sums, floor)
            values[relevant] = fit.log10_sf(sums[relevant]).clamp_max(floor)
            out[scale, window] = values
        return out

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
        min_log10_nfa = torch.stack([p.flatten(1).amin(dim=1) for p in log10_p.values()]).amin(dim=0) + offset
        return NFAMaps(log10_nfa=self._mask_map(statistics, log10_p, offset), min_log10_nfa=min_log10_nfa)

    def _mask_map(self, statistics: dict, log10_p: dict, offset: float) -> torch.Tensor:
        """log10 NFA per cell of the finest grid, for cutting masks.

        A cell takes the smallest NFA of the tests whose block contains it,
        but only if the cell itself deviates, on the block's scale and on the
        finest one (its single-cell tail probability below 1 - ``nfa.mask_p``):
        otherwise a strong one-cell defect would paint the whole 5x5 block
        around it, and a coarse detection a 32x32-pixel square. Coarse
        scales are brought to the finest grid by nearest neighbour.
        """
        finest = statistics[0, 1]
        size = finest.shape[-2:]
        floor = math.log10(NFA_CEILING) - offset
        scales = sorted({s for s, _ in self.tests})
        deviates = {scale: self.deviates(statistics[scale, 1], scale)[:, None] for scale in scales}
        best = torch.full_like(finest[:, None], floor)
        for scale in scales:
            per_scale = None
            for window in (w for s, w in self.tests if s == scale):
                values = log10_p[scale, window][:, None]
                if window > 1:
                    pad = window // 2
                    values = -F.max_pool2d(F.pad(-values, (pad,) * 4, value=-math.inf), window, stride=1, padding=pad)
                per_scale = values if per_scale is None else torch.minimum(per_scale, values)
            per_scale = torch.where(deviates[scale], per_scale, torch.full_like(per_scale, floor))
            if per_scale.shape[-2:] != size:
                per_scale = F.interpolate(per_scale, size=size, mode="nearest")
            best = torch.minimum(best, per_scale)
        # Every value is at most the floor, so the finest-scale gate applies once to the minimum over scales.
        best = torch.where(deviates[0], best, torch.full_like(best, floor))
        return best[:, 0] + offset
