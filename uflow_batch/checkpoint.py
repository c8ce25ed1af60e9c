"""A detector on disk: ``model.safetensors`` (the trained flow) and ``manifest.json``.

That is enough to score on any machine: nothing is unpickled and no code path
is recorded. The backbone itself is rebuilt from its registry name and checked
against the recorded checksum, so a model never silently runs on other
backbone weights than it was trained on. The files live here, not in
:mod:`uflow_batch.model`, so the model package stays torch only.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import TrainConfig
from .manifest import ModelFormatError, ModelManifest, Normalization, TrainingReport
from .model.backbones import FeatureExtractor
from .model.calibration import CALIBRATION_VERSION
from .model import UFlowDetector

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

log = logging.getLogger(__name__)


def save_detector(detector: UFlowDetector, directory: str | Path, category: str | None = None,
                  train_config: TrainConfig | None = None, training: TrainingReport | None = None) -> ModelManifest:
    """Write weights and manifest into a local directory.

    The caller adds the training's record (category, configuration, report);
    what describes the model itself (configuration, calibration, shapes) is
    always taken from the detector, so the two cannot disagree.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.flow.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    manifest = ModelManifest(
        package_version=__version__,
        config=detector.config,
        backbone_sha256=detector.backbone_checksum(),
        feature_shapes=tuple(tuple(s) for s in detector.flow.feature_shapes),
        latent_shapes=tuple(tuple(s) for s in detector.latent_shapes),  # what the verdict was calibrated on
        normalization=Normalization(tuple(detector.mean.flatten().tolist()), tuple(detector.std.flatten().tolist())),
        calibration=detector.nfa.calibration,
        category=category,
        train_config=train_config,
        training=training,
    )
    (directory / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def read_manifest(directory: str | Path) -> ModelManifest:
    """The validated manifest of a local model directory, as written."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ModelFormatError(f"{directory} is not a model directory: no {MANIFEST_FILE}")
    return ModelManifest.from_json(path.read_text(), str(path))


def load_detector(directory: str | Path, device: str | torch.device = "cpu",
                  extractor: FeatureExtractor | None = None) -> UFlowDetector:
    """The saved detector, in eval mode on ``device``, with the verdict its manifest allows."""
    directory = Path(directory)
    manifest = _with_test_of_its_time(read_manifest(directory), directory)
    detector = UFlowDetector(manifest.config, extractor=extractor)
    if manifest.calibration is not None and _calibrated_for(manifest, detector, directory):
        detector.nfa.calibration = manifest.calibration
    checksum = detector.backbone_checksum()
    if checksum != manifest.backbone_sha256:
        raise ModelFormatError(
            f"{directory}: backbone {manifest.config.backbone.name!r} weights have checksum {checksum[:12]}..., "
            f"but the model was trained on {manifest.backbone_sha256[:12]}...; provide the same backbone weights"
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
    return detector.to(device).eval()


def _with_test_of_its_time(manifest: ModelManifest, directory: Path) -> ModelManifest:
    """A model calibrated for the first scan test scores with the paper's block test.

    Models calibrated for the first scan test (the minimum over per-scale
    tests, calibration version 1) carry a correction that does not hold for
    the cross-scale one. ``uflow-batch calibrate --nfa-test scan`` moves them
    to the calibrated scan test. (Models saved before ``nfa.test`` existed
    read as block-test models already: :mod:`uflow_batch.manifest`.)
    """
    calibration = manifest.calibration
    if manifest.config.nfa.test == "scan" and calibration is not None and calibration.fits \
            and calibration.version != CALIBRATION_VERSION:
        log.warning("%s: calibrated for an earlier scan test; scoring with the block test until "
                    "`uflow-batch calibrate --nfa-test scan` refits it", directory)
        block = replace(manifest.config, nfa=replace(manifest.config.nfa, test="block"))
        return replace(manifest, config=block, calibration=None)
    return manifest


def _calibrated_for(manifest: ModelManifest, detector: UFlowDetector, directory: Path) -> bool:
    """Whether the manifest's calibration was fitted on latents of the shapes this detector gives.

    A DifferNet saved before it scored test-time views was calibrated on
    one view's latents; this version combines four (``test_views``), whose
    energies follow another law. Its flow is still valid, so it scores with
    the uncalibrated test until ``uflow-batch calibrate`` refits it on the
    held-out views.
    """
    if [tuple(s) for s in manifest.latent_shapes] == detector.latent_shapes:
        return True
    log.warning("%s: calibrated on latents of shapes %s, this version gives %s; scoring uncalibrated until "
                "`uflow-batch calibrate` refits it", directory, list(manifest.latent_shapes), detector.latent_shapes)
    return False
