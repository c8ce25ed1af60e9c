"""The paper's block test on the flow's latents (U-Flow, section 3.3, eq. 6), ``nfa.test: block``.

Kept so it can be compared with the default scan test (:mod:`.scan_nfa`) on
the same model; it is not calibrated on held-out images (only measured).

Under the background model (a normal image), every latent value is N(0, 1)
and independent of the others, so z^2 ~ chi-square(1). A value is a
*candidate* when z^2 exceeds the chi-square(1) quantile at ``p``; under the
background model that happens with probability ``q = 1 - p``.

For scale l and a w_l x w_l block around a pixel, let K be the number of
candidates among the w_l^2 * C_l values of the block. The event tested is
"at least K/C_l candidates per channel among w_l^2 positions", with
probability P_l = P(Bin(w_l^2, q) >= K/C_l). Because K/C_l is fractional, the
binomial tail is extended to real counts through the regularized incomplete
beta function: P(Bin(n, q) >= x) = I_q(x, n - x + 1), which equals the usual
tail at integer x. Counting per channel rather than over all w^2*C values is
deliberately conservative: channels of a real flow are not perfectly
independent.

The flow makes scales independent, so probabilities multiply:
log10 NFA = log10(number of tests) + sum_l log10 P_l, the tests being every
pixel of every scale taking part. A pixel is a detection when NFA < epsilon.

K only takes the values 0..w^2*C, so log10 P is tabulated once per
(w, C, p) in float64 with scipy and gathered on the model's device: exact,
vectorized, and no per-pixel Python.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import special, stats
from torch import nn
from torch.nn import functional as F

from ..config import NFAConfig, require
from .anomaly import NFAMaps
from .calibration import Calibration, false_alarms


def candidate_threshold(p: float) -> float:
    """The chi-square(1) quantile at p: z^2 above it is a candidate."""
    return float(stats.chi2.ppf(p, df=1))


def log10_binomial_tail(x: np.ndarray, n: int, q: float) -> np.ndarray:
    """log10 P(Bin(n, q) >= x) for real x in [0, n], in float64.

    P(X >= x) = I_q(x, n - x + 1). Where the tail is close to 1 it is taken as
    1 - I_{1-q}(n - x + 1, x) so its logarithm keeps full precision.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    positive = x > 0
    a, b = x[positive], n - x[positive] + 1.0
    tail = special.betainc(a, b, q)
    upper = special.betaincc(a, b, q)
    small = tail < 0.5
    logs = np.empty_like(tail)
    logs[small] = np.log10(tail[small])
    logs[~small] = np.log1p(-upper[~small]) / math.log(10.0)
    out[positive] = logs
    return out


@functools.lru_cache(maxsize=64)
def log10_tail_table(window: int, channels: int, p: float) -> np.ndarray:
    """log10 P(Bin(w^2, 1-p) >= K/C) for every possible candidate count K."""
    n = window * window
    counts = np.arange(n * channels + 1, dtype=np.float64)
    table = log10_binomial_tail(counts / channels, n, 1.0 - p)
    table.setflags(write=False)
    return table


class BlockNFA(nn.Module):
    """-log10 NFA maps from latents; the scales taking part are the finest ones.

    ``latent_channels`` lists the channel count of each scale, finest first.
    Outputs are on the finest latent grid; coarser scales are brought there
    by nearest-neighbour upsampling, so each fine pixel is tested together
    with the coarse block that contains it.
    """

    def __init__(self, latent_shapes: Sequence[Sequence[int]], config: NFAConfig, calibration: Calibration | None = None) -> None:
        super().__init__()
        latent_channels = [int(shape[0]) for shape in latent_shapes]
        require(len(config.windows) <= len(latent_channels),
                f"nfa.windows has {len(config.windows)} entries but the flow has {len(latent_channels)} scales")
        self.config = config
        self.calibration = calibration or Calibration(fits={})
        self.threshold = candidate_threshold(config.p)
        self.windows = tuple(config.windows)
        for scale, (window, channels) in enumerate(zip(self.windows, latent_channels)):
            table = torch.from_numpy(log10_tail_table(window, int(channels), config.p).copy())
            self.register_buffer(f"table_{scale}", table, persistent=False)

    def tables(self) -> list[torch.Tensor]:
        return [getattr(self, f"table_{scale}") for scale in range(len(self.windows))]

    def candidate_counts(self, latent: torch.Tensor, window: int) -> torch.Tensor:
        """K per pixel: candidates in the w x w x C block (zero padding at borders).

        Padding with non-candidates makes border blocks conservative rather
        than inventing evidence. Summing through average pooling with a unit
        divisor stays exact for integer counts (no TF32 matrix units involved).
        """
        per_pixel = (latent.pow(2) > self.threshold).float().sum(dim=1, keepdim=True)
        counts = F.avg_pool2d(per_pixel, window, stride=1, padding=window // 2, count_include_pad=True, divisor_override=1)
        return counts.round().long()[:, 0]

    def log10_probabilities(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """log10 P_l per scale on that scale's own grid, (B, H_l, W_l) each."""
        return [
            table[self.candidate_counts(z, window)]
            for z, window, table in zip(latents, self.windows, self.tables())
        ]

    def number_of_tests(self, latents: Sequence[torch.Tensor]) -> int:
        return sum(z.shape[-2] * z.shape[-1] for z in latents[: len(self.windows)])

    def forward(self, latents: Sequence[torch.Tensor]) -> NFAMaps:
        log10_nfa = self.log10_nfa(latents)
        return NFAMaps(log10_nfa=log10_nfa, min_log10_nfa=log10_nfa.flatten(1).amin(dim=1))

    def calibrate(self, latent_batches: Sequence[Sequence[torch.Tensor]]) -> Calibration:
        """The paper's test has no fitted background: only measure it on held-out normal latents."""
        maps = [self(batch) for batch in latent_batches]
        n_images = sum(len(m.min_log10_nfa) for m in maps)
        self.calibration = Calibration(fits={}, n_images=n_images, false_alarms=false_alarms(maps))
        return self.calibration

    def log10_nfa(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """log10 NFA on the finest latent grid, (B, H_0, W_0), float64."""
        size = latents[0].shape[-2:]
        log10_nfa = torch.full_like(latents[0][:, 0], math.log10(self.number_of_tests(latents)), dtype=torch.float64)
        for log10_p in self.log10_probabilities(latents):
            if log10_p.shape[-2:] != size:
                log10_p = F.interpolate(log10_p[:, None], size=size, mode="nearest")[:, 0]
            log10_nfa = log10_nfa + log10_p
        return log10_nfa
