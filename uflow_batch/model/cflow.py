"""CFlow-AD (Gudovskiy et al. 2022): a conditional 1D flow per scale over feature vectors.

Each position's feature vector is mapped on its own, conditioned on a 2D
sinusoidal encoding of where it is, so one small flow learns a different
density for every place of the part. The coupling subnets are MLPs
(Linear-ReLU-Linear, twice as wide as their input); the steps are FrEIA's
``AllInOneBlock`` with hard channel permutations (anomalib's default; a soft,
random orthogonal one is stored in float32 and is invertible only to about
1e-5).

The latents are returned as maps of the features' shapes, so the anomaly map
and the verdict read them like any other flow's. Positions are transformed
independently given their encodings, and scales by separate flows: neither
the positions' nor the scales' latents are jointly independent in the way a
single invertible map of the whole image makes them (see ``scales_independent``).

The paper trains on random subsets of positions ("fiber batches") to bound
memory on large GPUs maps; here every position of the batch enters the loss,
which is the same objective without the sampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import FrEIA.framework as ff
import torch
from torch import nn

from ..config import FlowConfig
from .flow import CouplingStep, PerScaleFlows, Shape

CONDITION_DIMS = 128  # the paper's positional encoding size


def positional_encoding(dims: int, height: int, width: int) -> torch.Tensor:
    """(dims, H, W): half the channels encode the column, half the row, as sin/cos pairs of falling frequency."""
    if dims % 4:
        raise ValueError(f"the positional encoding needs a multiple of 4 channels, got {dims}")
    quarter = dims // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float64) / quarter)
    columns = torch.arange(width, dtype=torch.float64)[None, :] * frequencies[:, None]  # (quarter, W)
    rows = torch.arange(height, dtype=torch.float64)[None, :] * frequencies[:, None]  # (quarter, H)
    encoding = torch.cat([
        torch.sin(columns)[:, None, :].expand(-1, height, -1),
        torch.cos(columns)[:, None, :].expand(-1, height, -1),
        torch.sin(rows)[:, :, None].expand(-1, -1, width),
        torch.cos(rows)[:, :, None].expand(-1, -1, width),
    ])
    return encoding.float()


def mlp_subnet(channels_in: int, channels_out: int) -> nn.Module:
    """Linear-ReLU-Linear, twice as wide as its input; the last layer starts at zero (identity coupling)."""
    last = nn.Linear(2 * channels_in, channels_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(channels_in, 2 * channels_in), nn.ReLU(), last)


def build_conditional_flow(shape: Shape, config: FlowConfig) -> ff.SequenceINN:
    """One scale's flow over its (C,) feature vectors, conditioned on the position encoding."""
    flow = ff.SequenceINN(shape[0])
    for _ in range(config.steps_per_stage):
        flow.append(CouplingStep, cond=0, cond_shape=(CONDITION_DIMS,), subnet_constructor=mlp_subnet,
                    affine_clamping=config.affine_clamp, permute_soft=False)
    return flow


class CFlow(PerScaleFlows):
    """A conditional flow over the feature vectors of each scale; latents keep the features' shapes."""

    def __init__(self, feature_shapes: Sequence[Shape], config: FlowConfig) -> None:
        super().__init__(feature_shapes, config, build_conditional_flow)
        for index, (_, height, width) in enumerate(self.feature_shapes):
            self.register_buffer(f"encoding_{index}", positional_encoding(CONDITION_DIMS, height, width), persistent=False)

    def _vectors(self, maps: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*H*W, C) vectors and their (B*H*W, P) conditions."""
        batch, channels, height, width = maps.shape
        encoding = getattr(self, f"encoding_{index}").to(maps.dtype)
        condition = encoding.flatten(1).T.repeat(batch, 1)
        return maps.permute(0, 2, 3, 1).reshape(-1, channels), condition

    @staticmethod
    def _maps(vectors: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        batch, channels, height, width = shape
        return vectors.view(batch, height, width, channels).permute(0, 3, 1, 2)

    def transform(self, normalized: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Standardized features to latents; log|det J| per image is the sum over its positions and scales."""
        latents, log_jac_det = [], 0.0
        for index, (flow, x) in enumerate(zip(self.scales, normalized)):
            vectors, condition = self._vectors(x, index)
            z, log_det = flow(vectors, c=[condition])
            latents.append(self._maps(z, x.shape))
            log_jac_det = log_jac_det + log_det.view(x.shape[0], -1).sum(dim=1)
        return latents, log_jac_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Standardized features from latents (finest first)."""
        features = []
        for index, (flow, z) in enumerate(zip(self.scales, latents)):
            vectors, condition = self._vectors(z, index)
            x, _ = flow(vectors, c=[condition], rev=True, jac=False)
            features.append(self._maps(x, z.shape))
        return features
