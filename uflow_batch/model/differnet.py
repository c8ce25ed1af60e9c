"""DifferNet (Rudolph et al. 2021): a flow on one pooled feature vector per image.

Every scale's feature map is averaged over its positions and the averages are
concatenated, so an image becomes one vector of sum(C) values; a 1D flow of
FrEIA ``AllInOneBlock`` steps with MLP subnets maps it to N(0, I). The
latent is that vector as a 1 x 1 map, so the a-contrario test, fitted on
held-out normal images like any other, becomes a calibrated image-level
threshold on ||z||^2: one test per image, no number of positions.

DifferNet sees no positions, so it gives **no defect mask**: a flagged image
has an empty mask and no regions (``localizes = False``), and its anomaly map
is constant. The paper derives masks from gradients of the likelihood with
respect to the input; that is not offered here.

Like the paper, an image is scored as several transformed copies of itself
(``test_views = 4``: identity, horizontal and vertical flips, 180-degree
rotation; :mod:`.views` says why these and not 90-degree rotations): the
detector runs the backbone and this flow on each view and concatenates the
views' latents into one (4 D, 1, 1) latent, whose energy is 4 times the
mean of the views' energies, the paper's averaged score. Training sees the
same views (the paper's augmentation), and so does the held-out
calibration, since both take their features from the detector. The
exported graph includes the views, so ONNX Runtime gives the same latents.
The price is four backbone passes per image, in training and in scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import FrEIA.framework as ff
import torch
from torch import nn
from torch.nn import functional as F

from ..config import FlowConfig
from .cflow import mlp_subnet
from .flow import CouplingStep, Shape


class DifferNet(nn.Module):
    """A flow on the concatenated, spatially pooled features of every scale."""

    scales_independent = True  # one latent grid of one cell: nothing to combine
    localizes = False
    test_views = 4  # the paper's test-time transformations (and training augmentation), :mod:`.views`

    def __init__(self, feature_shapes: Sequence[Shape], config: FlowConfig) -> None:
        super().__init__()
        self.feature_shapes = [tuple(s) for s in feature_shapes]
        self.config = config
        dims = sum(channels for channels, _, _ in self.feature_shapes)
        self.latent_shapes = [(dims, 1, 1)]
        self.flow = ff.SequenceINN(dims)
        for _ in range(config.steps_per_stage):
            self.flow.append(CouplingStep, subnet_constructor=mlp_subnet, affine_clamping=config.affine_clamp,
                             permute_soft=False)

    @staticmethod
    def standardize(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale averaged over its positions, concatenated, and standardized: one (B, D, 1, 1) vector."""
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)
        return [F.layer_norm(pooled, pooled.shape[1:])[:, :, None, None]]

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.transform(self.standardize(features))

    def transform(self, normalized: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        (vector,) = normalized
        z, log_jac_det = self.flow(vector.flatten(1))
        return [z[:, :, None, None]], log_jac_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The standardized pooled vector from the latent."""
        (z,) = latents
        vector, _ = self.flow(z.flatten(1), rev=True, jac=False)
        return [vector[:, :, None, None]]
