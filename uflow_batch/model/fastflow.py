"""FastFlow (Yu et al. 2021): an independent 2D normalizing flow per feature scale.

Each scale's standardized feature map goes through its own stack of
Glow-style steps (FrEIA's ``AllInOneBlock``: affine coupling whose subnet is
conv-ReLU-conv, the kernels alternating 3x3 and 1x1 as ``flow.subnet_kernels``
says, a fixed channel permutation, ActNorm). Nothing passes between scales,
so each scale's latent has its feature map's shape, and the latents of
different scales are *not* jointly independent: each is N(0, I) on its own,
but they are transforms of features of the same image. The verdict takes that
into account (see :mod:`.scan_nfa`, ``scales_independent``).

Same contract as :class:`~.flow.UFlow`: ``forward`` takes backbone features,
finest first, and returns latents, finest first, and log|det J| per image;
the learnable per-position scale and shift of the LayerNorm sit inside the
flow so that their log-determinant counts (see :mod:`.flow`).
"""

from __future__ import annotations

from collections.abc import Sequence

import FrEIA.framework as ff
import torch

from ..config import FlowConfig
from .flow import CouplingStep, PerScaleFlows, PositionAffine, Shape, coupling_subnet


def build_scale_flow(shape: Shape, config: FlowConfig) -> ff.SequenceINN:
    """One scale's flow: the per-position affine, then ``flow.steps_per_stage`` coupling steps."""
    flow = ff.SequenceINN(*shape)
    flow.append(PositionAffine)
    for step in range(config.steps_per_stage):
        kernel = config.subnet_kernels[step % len(config.subnet_kernels)]
        flow.append(CouplingStep, subnet_constructor=coupling_subnet(kernel),
                    affine_clamping=config.affine_clamp, permute_soft=False)
    return flow


class FastFlow(PerScaleFlows):
    """One 2D flow per feature scale; latents keep the features' shapes."""

    def __init__(self, feature_shapes: Sequence[Shape], config: FlowConfig) -> None:
        super().__init__(feature_shapes, config, build_scale_flow)

    def transform(self, normalized: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The invertible map from standardized features to latents, scale by scale."""
        latents, log_jac_det = [], 0.0
        for flow, x in zip(self.scales, normalized):
            z, log_det = flow(x)
            latents.append(z)
            log_jac_det = log_jac_det + log_det
        return latents, log_jac_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Standardized features from latents (finest first)."""
        return [flow(z, rev=True, jac=False)[0] for flow, z in zip(self.scales, latents)]
