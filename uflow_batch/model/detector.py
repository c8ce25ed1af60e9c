"""The detector: frozen features, the U-shaped flow and the NFA as one module.

A saved detector is a directory with ``model.safetensors`` (the trained flow)
and ``manifest.json`` (the configuration, the backbone's weight checksum, the
training statistics). That is enough to score on any machine: nothing is
unpickled and no code path is recorded. The backbone itself is rebuilt from
its registry name and checked against the recorded checksum, so a model never
silently runs on other backbone weights than it was trained on.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import DetectorConfig, NFAConfig, from_dict, to_dict
from .anomaly import ImageResult, anomaly_map, image_result
from .backbones import FeatureExtractor, backbone_spec, build_extractor, state_dict_sha256
from .calibration import CALIBRATION_VERSION, Calibration
from .flow import UFlow
from .nfa import BlockNFA
from .scan_nfa import ScanNFA

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

log = logging.getLogger(__name__)


class ModelFormatError(RuntimeError):
    """A model directory is incomplete, of another format, or does not fit its backbone."""


@dataclass
class ScoreMaps:
    """Dense outputs for a batch at the model's input size."""

    anomaly: torch.Tensor  # (B, H, W) in [0, 1]
    neg_log10_nfa: torch.Tensor  # (B, H, W), the mask map
    significance: torch.Tensor  # (B,) -log10 of each image's smallest NFA
    image_score: torch.Tensor  # (B,)


def build_nfa(latent_shapes: list[tuple[int, int, int]], config: NFAConfig, calibration: Calibration | None = None) -> BlockNFA | ScanNFA:
    """The a-contrario test the configuration names, with its background calibration if any."""
    test = ScanNFA if config.test == "scan" else BlockNFA
    return test(latent_shapes, config, calibration)


def negative_log_likelihood(latents: list[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """U-Flow's loss: mean over images of sum(0.5 z^2) - log|det J|.

    Constants of the Gaussian density are left out; they do not move the optimum.
    """
    energy = sum(0.5 * z.pow(2).flatten(1).sum(dim=1) for z in latents)
    return (energy - log_jac_det).mean()


class UFlowDetector(nn.Module):
    def __init__(self, config: DetectorConfig, extractor: FeatureExtractor | None = None) -> None:
        super().__init__()
        self.manifest: dict[str, Any] = {}
        self.extractor = extractor if extractor is not None else build_extractor(config.backbone)
        if config.backbone.layers is None and self.extractor.layers is not None:
            # Record the stages actually used, so a saved model does not depend on a registry default.
            config = replace(config, backbone=replace(config.backbone, layers=self.extractor.layers))
        self.config = config
        spec = backbone_spec(config.backbone.name)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.flow = UFlow(self.extractor.feature_shapes(config.backbone.input_size), config.flow)
        self.nfa = build_nfa(self.flow.latent_shapes, config.nfa)

    def use_nfa(self, config: NFAConfig, calibration: Calibration | None = None) -> None:
        """Test with other NFA settings: they act only on the latents, so no retraining is needed.

        A test of another kind needs its own calibration (:meth:`calibrate`);
        the current one is kept only while the kind is the same.
        """
        if calibration is None and config.test == self.config.nfa.test:
            calibration = self.nfa.calibration
        self.nfa = build_nfa(self.flow.latent_shapes, config, calibration).to(self.device)
        self.config = replace(self.config, nfa=config)

    @torch.inference_mode()
    def calibrate(self, features: list[torch.Tensor], batch_size: int) -> Calibration:
        """Fit and measure the test's background on held-out *normal* features (never test images)."""
        batches = [
            self.latents([f[start : start + batch_size] for f in features])[0]
            for start in range(0, len(features[0]), batch_size)
        ]
        return self.nfa.calibrate(batches)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.backbone.input_size

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) at input size -> the backbone's normalized floats."""
        return (images.to(self.device, torch.float32) / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(self.normalize(images))

    def latents(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.flow(features)

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
            image_result(float(maps.image_score[i]), maps.neg_log10_nfa[i], significance[i], size, epsilon, rate)
            for i, size in enumerate(original_sizes)
        ]

    def score(self, images: torch.Tensor, original_sizes: list[tuple[int, int]], epsilon: float | None = None,
              false_alarm_rate: float | None = None) -> list[ImageResult]:
        return self.results(self.score_maps(images), original_sizes, epsilon, false_alarm_rate)

    # --- persistence -------------------------------------------------------------------------

    def backbone_checksum(self) -> str:
        return state_dict_sha256(self.extractor.state_dict())

    def save(self, directory: str | Path, manifest: dict[str, Any] | None = None) -> Path:
        """Write weights and manifest into a local directory.

        ``manifest`` adds entries (category, training statistics); it cannot
        override what describes the model itself (configuration, calibration).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.flow.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        from .. import __version__

        full = {
            **(manifest or {}),
            "format": MANIFEST_FORMAT,
            "package_version": __version__,
            "config": to_dict(self.config),
            "backbone_sha256": self.backbone_checksum(),
            "normalization": {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "input": "RGB uint8 / 255"},
            "feature_shapes": [list(s) for s in self.flow.feature_shapes],
            "latent_shapes": [list(s) for s in self.flow.latent_shapes],
            "calibration": self.nfa.calibration.as_dict(),
        }
        (directory / MANIFEST_FILE).write_text(json.dumps(_strict_json(full), indent=2, sort_keys=True, allow_nan=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", extractor: FeatureExtractor | None = None) -> UFlowDetector:
        directory = Path(directory)
        manifest = read_manifest(directory)
        manifest = _with_test_of_its_time(manifest, directory)
        config = from_dict(DetectorConfig, manifest["config"])
        detector = cls(config, extractor=extractor)
        if manifest.get("calibration"):
            detector.nfa.calibration = Calibration.from_dict(manifest["calibration"])
        checksum = detector.backbone_checksum()
        if checksum != manifest["backbone_sha256"]:
            raise ModelFormatError(
                f"{directory}: backbone {config.backbone.name!r} weights have checksum {checksum[:12]}..., "
                f"but the model was trained on {manifest['backbone_sha256'][:12]}...; provide the same backbone weights"
            )
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelFormatError(f"{directory}: missing {WEIGHTS_FILE}")
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors has its own error type for truncated or foreign files
            raise ModelFormatError(f"{weights} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        try:
            detector.flow.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFormatError(f"{weights} does not fit the configured flow: {exc}") from exc
        detector.manifest = manifest
        return detector.to(device).eval()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ModelFormatError(f"{directory} is not a model directory: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelFormatError(f"{path} is not a JSON manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFormatError(f"{path}: manifest format {found!r}, this version reads {MANIFEST_FORMAT}")
    return manifest


def _with_test_of_its_time(manifest: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """A model whose verdict was never calibrated for the current scan test scores with the paper's block test.

    Models saved before ``nfa.test`` existed used the block test; models
    calibrated for the first scan test (the minimum over per-scale tests,
    calibration version 1) carry a correction that does not hold for the
    cross-scale one. ``uflow-batch calibrate --nfa-test scan`` moves either
    to the calibrated scan test.
    """
    nfa = manifest["config"].get("nfa", {})
    if "test" not in nfa:
        return {**manifest, "config": {**manifest["config"], "nfa": {**nfa, "test": "block"}}}
    calibration = manifest.get("calibration") or {}
    if nfa["test"] == "scan" and calibration.get("fits") and calibration.get("version", 1) != CALIBRATION_VERSION:
        log.warning("%s: calibrated for an earlier scan test; scoring with the block test until "
                    "`uflow-batch calibrate --nfa-test scan` refits it", directory)
        return {**manifest, "config": {**manifest["config"], "nfa": {**nfa, "test": "block"}}, "calibration": None}
    return manifest


def _strict_json(value: Any) -> Any:
    """Manifest values as strict JSON: NaN/inf become null, arrays lists.

    Python would write ``NaN``, which most other JSON readers reject.
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
