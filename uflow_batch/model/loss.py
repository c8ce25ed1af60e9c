"""The training objective, apart from the model so that it is found where a reader looks for it."""

from __future__ import annotations

import torch


def negative_log_likelihood(latents: list[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """U-Flow's loss: mean over images of sum(0.5 z^2) - log|det J|.

    Constants of the Gaussian density are left out; they do not move the optimum.
    """
    energy = sum(0.5 * z.pow(2).flatten(1).sum(dim=1) for z in latents)
    return (energy - log_jac_det).mean()
