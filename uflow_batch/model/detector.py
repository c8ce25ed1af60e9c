"""The detector: frozen features, a flow (U-Flow or another kind, :mod:`.registry`) and the NFA as one module.

A kind that scores test-time views (``test_views`` > 1, DifferNet) gets them
here, where images become features (:mod:`.views`): :meth:`features` runs the
backbone on every view and :meth:`latents` combines the views' latents into
one latent per image, of the shapes :attr:`latent_shapes` declares. Training,
the held-out calibration, evaluation and scoring all go through these two
methods, so the test is fitted on latents made exactly as the ones it judges.

Torch only: saving and loading a detector is :mod:`uflow_batch.checkpoint`'s,
its training loss :mod:`.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import DetectorConfig, NFAConfig
from .anomaly import ImageResult, anomaly_map, image_result
from .backbones import FeatureExtractor, backbone_spec, build_extractor
from .calibration import Calibration
from .nfa import BlockNFA
from .registry import build_flow
from .scan_nfa import ScanNFA
from .views import check_views, view_features, view_latent_shapes, view_latents

@dataclass
class ScoreMaps:
    """Dense outputs for a batch at the model's input size."""

    anomaly: torch.Tensor  # (B, H, W) in [0, 1]
    neg_log10_nfa: torch.Tensor  # (B, H, W), the mask map
    significance: torch.Tensor  # (B,) -log10 of each image's smallest NFA
    image_score: torch.Tensor  # (B,)


def build_nfa(latent_shapes: list[tuple[int, int, int]], config: NFAConfig, calibration: Calibration | None = None,
              scales_independent: bool = True) -> BlockNFA | ScanNFA:
    """The a-contrario test the configuration names, with its background calibration if any.

    ``scales_independent`` (the flow's) decides how the scan test combines scales.
    """
    if config.test == "scan":
        return ScanNFA(latent_shapes, config, calibration, scales_independent=scales_independent)
    return BlockNFA(latent_shapes, config, calibration)


class UFlowDetector(nn.Module):
    def __init__(self, config: DetectorConfig, extractor: FeatureExtractor | None = None) -> None:
        super().__init__()
        self.extractor = extractor if extractor is not None else build_extractor(config.backbone)
        if config.backbone.layers is None and self.extractor.layers is not None:
            # Record the stages actually used, so a saved model does not depend on a registry default.
            config = replace(config, backbone=replace(config.backbone, layers=self.extractor.layers))
        self.config = config
        spec = backbone_spec(config.backbone.name)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.flow = build_flow(config.kind, self.extractor.feature_shapes(config.backbone.input_size), config.flow)
        self.views = check_views(self.flow.test_views)
        self.nfa = build_nfa(self.latent_shapes, config.nfa, scales_independent=self.flow.scales_independent)

    def use_nfa(self, config: NFAConfig, calibration: Calibration | None = None) -> None:
        """Test with other NFA settings: they act only on the latents, so no retraining is needed.

        A test of another kind needs its own calibration (:meth:`calibrate`);
        the current one is kept only while the kind is the same.
        """
        if calibration is None and config.test == self.config.nfa.test:
            calibration = self.nfa.calibration
        self.nfa = build_nfa(self.latent_shapes, config, calibration, self.flow.scales_independent).to(self.device)
        self.config = replace(self.config, nfa=config)

    @torch.inference_mode()
    def calibrate(self, features: list[torch.Tensor], batch_size: int) -> Calibration:
        """Fit and measure the test's background on held-out *normal* features (never test images).

        ``features`` are :meth:`features` of the held-out images, every view
        included, so the background is that of the latents scoring gives.
        """
        batches = [
            self.latents([f[start : start + batch_size] for f in features])[0]
            for start in range(0, len(features[0]), batch_size)
        ]
        return self.nfa.calibrate(batches)

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent :meth:`latents` gives, finest first: the flow's, with channels times the views."""
        return view_latent_shapes(self.flow.latent_shapes, self.views)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.backbone.input_size

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) at input size -> the backbone's normalized floats.

        The uint8 pixels travel to the device (a quarter of the bytes of
        floats; asynchronously from pinned memory) and are converted there.
        """
        return (images.to(self.device, non_blocking=True).to(torch.float32) / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features per scale, (B, C, H, W), or (B, V, C, H, W) for a flow with V test views."""
        return view_features(self.extractor, self.normalize(images), self.views)

    def latents(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One latent per image and scale (the views' combined) and log|det J| per image (summed over views)."""
        return view_latents(self.flow, features, self.views)

    def score_maps(self, images: torch.Tensor) -> ScoreMaps:
        """Anomaly and -log10 NFA maps for uint8 images already at input size."""
        with torch.inference_mode():
            return self.maps_from_features(self.features(images))

    @torch.inference_mode()
    def maps_from_features(self, features: list[torch.Tensor]) -> ScoreMaps:
        """The maps from backbone features already extracted (training caches them)."""
        return self.maps_from_latents(self.latents(features)[0])

    @torch.inference_mode()
    def maps_from_latents(self, latents: list[torch.Tensor]) -> ScoreMaps:
        """Anomaly map, verdict maps and image scores from the flow's latents."""
        anomaly = anomaly_map(latents, self.input_size)
        nfa = self.nfa(latents)
        neg_log10_nfa = -torch.nn.functional.interpolate(
            nfa.log10_nfa[:, None], size=self.input_size, mode="bilinear", align_corners=False
        )[:, 0]
        significance = -nfa.min_log10_nfa
        score = significance.float() if self.config.image_score == "nfa_max" else anomaly.flatten(1).amax(dim=1)
        return ScoreMaps(anomaly=anomaly, neg_log10_nfa=neg_log10_nfa, significance=significance, image_score=score)

    def results(self, maps: ScoreMaps, original_sizes: list[tuple[int, int]], epsilon: float | None = None,
                false_alarm_rate: float | None = None) -> list[ImageResult]:
        """Per-image verdicts, masks, areas and regions at each image's original (height, width).

        ``epsilon`` (mask threshold) and ``false_alarm_rate`` (image verdict)
        override the model's settings, e.g. with a job's.
        """
        epsilon = self.config.nfa.epsilon if epsilon is None else epsilon
        rate = self.config.nfa.false_alarm_rate if false_alarm_rate is None else false_alarm_rate
        significance = maps.significance.cpu().tolist()
        return [
            image_result(float(maps.image_score[i]), maps.neg_log10_nfa[i], significance[i], size, epsilon, rate,
                         self.flow.localizes)
            for i, size in enumerate(original_sizes)
        ]

    def score(self, images: torch.Tensor, original_sizes: list[tuple[int, int]], epsilon: float | None = None,
              false_alarm_rate: float | None = None) -> list[ImageResult]:
        return self.results(self.score_maps(images), original_sizes, epsilon, false_alarm_rate)

    def backbone_checksum(self) -> str:
        """SHA-256 of the frozen backbone's weights: what a saved model records and its loader checks."""
        return self.extractor.weights_sha256()
