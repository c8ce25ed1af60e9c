"""CS-Flow (Rudolph et al. 2022): fully convolutional couplings across scales, all scales mapped jointly.

Why another flow: FastFlow and CFlow-AD see each scale alone, so a defect
that is faint on every scale must be found by one of them; U-Flow passes
information only from coarse to fine. In CS-Flow every coupling reads all
scales at once: each block splits every scale's channels in two halves and
transforms one half of each scale with affine parameters computed from the
other halves of *that scale and its neighbours* (the paper's cross
convolutions: a conv of the scale's own half, plus a conv of the coarser
scale's hidden map upsampled to it, plus a stride-2 conv of the finer one's),
then the other way round; a fixed random channel permutation per scale
follows each block. The affine scale is soft-clamped as in the paper,
log s = alpha * (2 / pi) * atan(a / alpha) with alpha = ``flow.affine_clamp``,
and each scale's subnet output is multiplied by a learned factor that starts
at zero, so every block starts as the identity.

Adapted to this package's backbones, honestly: the paper feeds one feature
extractor (EfficientNet-B5) the image at three resolutions, so its scales have
the same channels and are the same features seen larger or smaller. Here the
scales are the 3-4 stages of one backbone pass (finest first, each half the
previous side, different channel counts), so "neighbouring scales" are
neighbouring stages; the cross convolutions map between their channel counts.
The hidden width of each scale's subnet equals its input channels (as in
:func:`.flow.coupling_subnet`; the paper used 1024), and the subnet kernels
alternate as ``flow.subnet_kernels`` says, block by block (the paper used
3x3 only: ``subnet_kernels: [3]`` follows it). ``flow.steps_per_stage`` is
the number of coupling blocks (the paper's default is 4). As in the other
kinds, each scale is standardized first and the learnable per-position
scale and shift of the LayerNorm is an invertible layer inside the flow
(see :mod:`.flow`).

``scales_independent = True``, as for U-Flow, and for the same reason: the
whole map, every scale together, is one invertible function trained so that
its joint output is N(0, I). Under that model the latents of all scales are
jointly standard normal, hence independent across scales, which is what the
scan test's k-of-L combination needs. (FastFlow's and CFlow's scales are
separate flows whose latents are each N(0, I) on their own: nothing makes
them independent of each other.) Where a real flow misses this on real
images, the calibration on held-out normals absorbs it, as for U-Flow.

The anomaly map and image score are the shared ones (:mod:`.anomaly`,
``image_score``), as for FastFlow whose paper also had its own: every scale's
channel mean of z^2 enters through exp(-0.5 mean_c z^2), upsampled and
averaged over scales. The paper's localization map is the channel mean of
z^2 on the finest scale alone, and its image score the mean of z^2 / 2 over
all latents; neither is used here, since the verdict comes from the
calibrated scan test either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import FrEIA.modules as fm
import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, FlowConfig
from .flow import PositionAffine, Shape, check_pyramid, standardize

LEAKY_SLOPE = 0.1  # the paper's subnet activation


def soft_clamp(raw: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's clamp of the log-scale, smooth and within (-alpha, alpha)."""
    return alpha * (2.0 / math.pi) * torch.atan(raw / alpha)


class CrossConvolutions(nn.Module):
    """One coupling half's subnet: for every scale, affine parameters from its own input and its neighbours'.

    Scale s's output is conv(h_s) + conv(upsample(h_{s+1})) + strided_conv(h_{s-1}),
    h being each scale's hidden map (conv then leaky ReLU), times a learned
    per-scale factor that starts at zero (identity coupling at the start).
    """

    def __init__(self, channels_in: Sequence[int], channels_out: Sequence[int], kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2

        def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size, padding=pad, stride=stride)

        scales = len(channels_in)
        self.hidden = nn.ModuleList(conv(c, c) for c in channels_in)
        self.own = nn.ModuleList(conv(c, o) for c, o in zip(channels_in, channels_out))
        self.from_coarser = nn.ModuleList(conv(channels_in[s + 1], channels_out[s]) for s in range(scales - 1))
        self.from_finer = nn.ModuleList(conv(channels_in[s - 1], channels_out[s], stride=2) for s in range(1, scales))
        self.gamma = nn.Parameter(torch.zeros(scales))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), LEAKY_SLOPE) for conv, x in zip(self.hidden, inputs)]
        outputs = []
        for s, h in enumerate(hidden):
            y = self.own[s](h)
            if s + 1 < len(hidden):
                coarser = F.interpolate(hidden[s + 1], size=h.shape[-2:], mode="bilinear", align_corners=False)
                y = y + self.from_coarser[s](coarser)
            if s > 0:
                y = y + self.from_finer[s - 1](hidden[s - 1])
            outputs.append(self.gamma[s] * y)
        return outputs


class CrossScaleCoupling(fm.InvertibleModule):
    """One CS-Flow block over all scales: two cross-scale affine couplings, then a fixed channel permutation per scale.

    The permutations are buffers saved with the weights, so a model loaded
    into a freshly built flow gives the same latents.
    """

    def __init__(self, dims_in: Sequence[Sequence[int]], dims_c=None, kernel_size: int = 3, clamp: float = 2.0) -> None:
        super().__init__(dims_in, dims_c)
        channels = [int(dims[0]) for dims in dims_in]
        self.clamp = clamp
        self.first = [c // 2 for c in channels]
        self.second = [c - c // 2 for c in channels]
        self.subnet_first = CrossConvolutions(self.second, [2 * c for c in self.first], kernel_size)
        self.subnet_second = CrossConvolutions(self.first, [2 * c for c in self.second], kernel_size)
        for s, c in enumerate(channels):
            self.register_buffer(f"permutation_{s}", torch.randperm(c))

    def _permutation(self, scale: int) -> torch.Tensor:
        return getattr(self, f"permutation_{scale}")

    def _affine(self, params: torch.Tensor, x: torch.Tensor, rev: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw_scale, shift = params.chunk(2, dim=1)
        log_scale = soft_clamp(raw_scale, self.clamp)
        log_det = log_scale.flatten(1).sum(dim=1)
        if rev:
            return (x - shift) * torch.exp(-log_scale), -log_det
        return x * torch.exp(log_scale) + shift, log_det

    def _couple(self, subnet: CrossConvolutions, condition: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                rev: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        outputs, log_det = [], 0.0
        for params, x in zip(subnet(condition), targets):
            y, scale_log_det = self._affine(params, x, rev)
            outputs.append(y)
            log_det = log_det + scale_log_det
        return outputs, log_det

    def forward(self, x, c=None, rev=False, jac=True):
        if rev:
            x = [xs[:, torch.argsort(self._permutation(s))] for s, xs in enumerate(x)]
        first = [xs[:, :n] for xs, n in zip(x, self.first)]
        second = [xs[:, n:] for xs, n in zip(x, self.first)]
        if not rev:
            first, log_det_first = self._couple(self.subnet_first, second, first, rev)
            second, log_det_second = self._couple(self.subnet_second, first, second, rev)
        else:
            second, log_det_second = self._couple(self.subnet_second, first, second, rev)
            first, log_det_first = self._couple(self.subnet_first, second, first, rev)
        out = [torch.cat([a, b], dim=1) for a, b in zip(first, second)]
        if not rev:
            out = [ys[:, self._permutation(s)] for s, ys in enumerate(out)]
        return tuple(out), log_det_first + log_det_second

    def output_dims(self, input_dims):
        return input_dims


class CSFlow(nn.Module):
    """Standardize each scale, then the per-position affines and the cross-scale blocks over all scales jointly.

    ``forward`` takes backbone features (finest first) and returns latents of
    the features' shapes (finest first) and log|det J| per image.
    """

    scales_independent = True  # one invertible map of all scales jointly: their latents are jointly N(0, I)
    localizes = True  # latents keep positions, so masks can be cut
    test_views = 1  # each image scored as it is

    def __init__(self, feature_shapes: Sequence[Shape], config: FlowConfig) -> None:
        super().__init__()
        self.feature_shapes = [tuple(s) for s in feature_shapes]
        check_pyramid(self.feature_shapes)  # the cross convolutions move between scales by 2x
        narrow = [shape for shape in self.feature_shapes if shape[0] < 2]
        if narrow:
            raise ConfigError(f"CS-Flow splits every scale's channels in two; scales {narrow} have fewer than 2")
        self.latent_shapes = list(self.feature_shapes)
        self.config = config
        self.position = nn.ModuleList(PositionAffine([shape]) for shape in self.feature_shapes)
        kernels = config.subnet_kernels
        self.blocks = nn.ModuleList(
            CrossScaleCoupling(self.feature_shapes, kernel_size=kernels[block % len(kernels)], clamp=config.affine_clamp)
            for block in range(config.steps_per_stage)
        )

    standardize = staticmethod(standardize)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.transform(self.standardize(features))

    def transform(self, normalized: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The invertible map from standardized features to latents, every scale at once."""
        maps, log_jac_det = [], 0.0
        for affine, x in zip(self.position, normalized):
            (y,), log_det = affine([x])
            maps.append(y)
            log_jac_det = log_jac_det + log_det
        for block in self.blocks:
            maps, log_det = block(maps)
            log_jac_det = log_jac_det + log_det
        return list(maps), log_jac_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Standardized features from latents (finest first)."""
        maps = list(latents)
        for block in reversed(self.blocks):
            maps, _ = block(maps, rev=True, jac=False)
        return [affine([z], rev=True)[0][0] for affine, z in zip(self.position, maps)]
