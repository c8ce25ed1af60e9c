"""The flow kinds a detector can use, by the name a configuration gives them (timm-style registry).

Every kind takes backbone features (finest first) and returns latents that
are N(0, I) on normal images, finest first, and log|det J| per image; it says
whether its scales' latents are jointly independent (``scales_independent``,
which the verdict needs), whether its latents have positions to cut a
mask from (``localizes``), and how many test-time views of each image it
scores (``test_views``, :mod:`.views`; 1 but for DifferNet).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..config import FlowConfig
from .cflow import CFlow
from .csflow import CSFlow
from .differnet import DifferNet
from .fastflow import FastFlow
from .flow import Shape, UFlow

FLOWS: dict[str, type[nn.Module]] = {
    "uflow": UFlow, "fastflow": FastFlow, "cflow": CFlow, "csflow": CSFlow, "differnet": DifferNet,
}


def build_flow(kind: str, feature_shapes: Sequence[Shape], config: FlowConfig) -> nn.Module:
    return FLOWS[kind](feature_shapes, config)
