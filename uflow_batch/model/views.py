"""Test-time views: an image scored as several fixed transformed copies of itself (DifferNet's test-time transformations).

A flow kind names how many views it scores (``test_views``: 1, the image
alone, for every kind but DifferNet). With V > 1 the backbone runs on each
view, the flow maps each view's features on its own, and the V latents of
an image are concatenated along channels into **one** latent of V * C
channels per scale. Everything after the latents (the scan test and its
calibration, the anomaly map, the results) then works unchanged: each value
is still one view's N(0, 1) latent on a normal image, the energy sum z^2
the test uses is V times the mean of the views' energies (the paper's
average negative log-likelihood, up to that constant factor, which the
background fitted on held-out images absorbs), and the anomaly map's mean
of z^2 over channels is the mean over views and channels. The log-determinant
is summed over views, so the training loss of one image is the sum of its
views' losses: training on all views is DifferNet's augmentation with this
fixed set of transformations (Adam does not see the constant factor V).

The views are the first V of :data:`VIEWS`: identity, horizontal flip,
vertical flip, 180-degree rotation, the symmetries of a rectangle. They keep
the image's shape for any aspect ratio, so every view has the backbone input
and the feature grid the model was built for; the paper's 90-degree
rotations swap height and width and would hold only for square inputs. Each
view is its own inverse, so applying it again to its latent maps puts their
positions back in the image's orientation before they are concatenated.
Flips are index reversals: they export to ONNX and give torch's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

View = Callable[[torch.Tensor], torch.Tensor]

VIEWS: tuple[View, ...] = (
    lambda x: x,  # identity
    lambda x: x.flip(-1),  # horizontal flip
    lambda x: x.flip(-2),  # vertical flip
    lambda x: x.flip(-2, -1),  # 180-degree rotation
)

Shape = tuple[int, int, int]


def check_views(count: int) -> int:
    """A kind's ``test_views``, checked when a detector is built: at least the image, at most :data:`VIEWS`."""
    if not 1 <= count <= len(VIEWS):
        raise ValueError(f"test_views must be between 1 and {len(VIEWS)}, got {count}")
    return count


def view_features(extractor: nn.Module, normalized: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Backbone features of every view: (B, C, H, W) per scale for one view, (B, V, C, H, W) for V > 1.

    The image axis stays first, so a cache of features is indexed by image
    whatever V (training's held-out split takes its images' views with it).
    """
    if count == 1:
        return extractor(normalized)
    stacked = _merge(torch.stack([view(normalized) for view in VIEWS[:count]], dim=1))
    return [_split(f, count) for f in extractor(stacked)]


def view_latents(flow: nn.Module, features: Sequence[torch.Tensor], count: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The flow on every view's features, combined into one latent per image and scale, and log|det J| per image."""
    if count == 1:
        return flow(features)
    latents, log_jac_det = flow([_merge(f) for f in features])
    combined = []
    for z in latents:
        per_view = _split(z, count)
        aligned = [view(per_view[:, index]) for index, view in enumerate(VIEWS[:count])]
        combined.append(torch.cat(aligned, dim=1))
    return combined, _split(log_jac_det, count).sum(dim=1)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, V, ...) -> (B * V, ...), each image's views side by side."""
    return x.reshape(-1, *x.shape[2:])


def _split(x: torch.Tensor, count: int) -> torch.Tensor:
    """(B * V, ...) -> (B, V, ...).

    Both are reshapes with -1 for the images: traced, they keep an exported
    graph's batch dynamic (with ``flatten``/``unflatten`` the ONNX graph
    kept the traced batch).
    """
    return x.reshape(-1, count, *x.shape[1:])


def view_latent_shapes(shapes: Sequence[Shape], count: int) -> list[Shape]:
    """The combined latents' shapes: each scale's channels times the number of views."""
    return [(channels * count, height, width) for channels, height, width in shapes]
