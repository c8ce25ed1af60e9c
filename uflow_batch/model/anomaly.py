"""From latents to what a QA analyst reads: maps, scores, masks and regions.

The anomaly map (U-Flow, section 3.3) is one minus the mean over scales of
each scale's likelihood proxy exp(-0.5 * mean_c z^2), upsampled to the input
size: 0 where the flow finds the pixel perfectly typical, towards 1 where it
does not. The verdict and the defect mask come from the NFA, not from the
map, so they need no threshold tuned on anomalous images: an image is
anomalous when its smallest NFA over all tests is below the false-alarm rate
(the expected number of false detections bounds the chance of flagging a
normal image), and only then is a mask cut, at the mask threshold epsilon.

Per-image results are computed at the image's *original* resolution, since
areas and bounding boxes must be in the pixels the factory photographed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F


@dataclass
class NFAMaps:
    """What an a-contrario test gives for a batch."""

    log10_nfa: torch.Tensor  # (B, H0, W0) on the finest latent grid, for cutting masks
    min_log10_nfa: torch.Tensor  # (B,) the smallest NFA over every test of the image: its significance


def anomaly_map(latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) anomaly map in [0, 1] at ``size``."""
    likelihood = torch.zeros((latents[0].shape[0], 1, *size), device=latents[0].device, dtype=latents[0].dtype)
    for z in latents:
        proxy = torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
        likelihood += F.interpolate(proxy, size=size, mode="bilinear", align_corners=False)
    return 1.0 - likelihood[:, 0] / len(latents)


def resize_map(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, H, W) or (H, W) map, keeping its dtype."""
    squeeze = values.dim() == 2
    batch = values[None, None] if squeeze else values[:, None]
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return out[0, 0] if squeeze else out[:, 0]


@dataclass(frozen=True)
class Region:
    """One connected defect: bounding box [x0, y0, x1, y1) in original pixels."""

    x0: int
    y0: int
    x1: int
    y1: int
    area_px: int
    peak_neg_log10_nfa: float

    def as_dict(self) -> dict:
        return {
            "x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1,
            "area_px": self.area_px, "peak_neg_log10_nfa": self.peak_neg_log10_nfa,
        }


@dataclass
class ImageResult:
    """The per-image contract the scoring pipeline writes, one row per image."""

    image_score: float
    max_neg_log10_nfa: float  # the image's significance: -log10 of its smallest NFA over all tests
    false_alarm_rate: float  # the verdict's level: anomalous when max_neg_log10_nfa > -log10(false_alarm_rate)
    is_anomalous: bool
    mask: np.ndarray  # bool (height, width) at original resolution
    regions: list[Region] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def defect_area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def defect_area_fraction(self) -> float:
        return self.defect_area_px / self.mask.size


# 8-connectivity: a diagonal crack is one defect, not a staircase of many.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def find_regions(mask: np.ndarray, neg_log10_nfa: np.ndarray) -> list[Region]:
    """Connected components of ``mask`` with their boxes, areas and peaks."""
    # Area and peak are taken inside each component's box: scipy's
    # ndimage.maximum sorts the whole image for that, ~50 ms per image.
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    regions = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        own = labels[box] == label
        rows, cols = box
        regions.append(Region(cols.start, rows.start, cols.stop, rows.stop, int(own.sum()), float(neg_log10_nfa[box][own].max())))
    return regions


def image_result(
    image_score: float,
    neg_log10_nfa: torch.Tensor,
    significance: float,
    original_size: tuple[int, int],
    epsilon: float,
    false_alarm_rate: float,
    localizes: bool = True,
) -> ImageResult:
    """Verdict, mask and regions for one image.

    ``neg_log10_nfa`` is the mask map at input size and ``significance`` the
    image's -log10 of its smallest NFA. The image is anomalous when its
    smallest NFA is below ``false_alarm_rate``; its mask is then the pixels
    with NFA < ``epsilon``. Interpolation to the original size can shave a
    one-cell peak below the mask threshold: a flagged image then keeps its
    peak pixel, so a verdict always shows where it comes from. An image that
    is not flagged has an empty mask (and costs no resize). A model that
    does not ``localize`` (DifferNet: one latent per image) gives the
    verdict only, never a mask.
    """
    is_anomalous = significance > -math.log10(false_alarm_rate)
    if not is_anomalous or not localizes:
        return ImageResult(float(image_score), float(significance), false_alarm_rate, is_anomalous, np.zeros(original_size, dtype=bool))
    full = resize_map(neg_log10_nfa.float(), original_size).cpu().numpy()
    mask = full > -math.log10(epsilon)
    if not mask.any():
        mask[np.unravel_index(int(full.argmax()), full.shape)] = True
    return ImageResult(float(image_score), float(significance), false_alarm_rate, True, mask, find_regions(mask, full))
