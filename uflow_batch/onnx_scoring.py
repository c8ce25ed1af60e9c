"""Scoring with the exported graph: ONNX Runtime runs backbone + flow, torch the verdict.

:class:`OnnxRuntimeDetector` answers ``score`` and ``score_maps`` as
:class:`~uflow_batch.model.UFlowDetector` does (same arguments, same
results), so a caller that scores with a detector can be handed one instead:
that is the whole hook (``bench/export_throughput.py`` measures it against
torch). The graph's latents go through the detector's own
``maps_from_latents`` and ``results``, so the anomaly map, the calibrated NFA,
masks and regions are computed by the same code as with torch; only the
tensor part changes runtime. CPU only (ONNX Runtime's CPU provider): on a
GPU, torch stays the runtime.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from .checkpoint import load_detector
from .export import default_output, export_detector, onnx_session, run_exported
from .model import UFlowDetector
from .model.anomaly import ImageResult
from .model.detector import ScoreMaps

log = logging.getLogger(__name__)


class OnnxRuntimeDetector:
    """A detector whose backbone and flow run in an ONNX Runtime session on the CPU."""

    def __init__(self, detector: UFlowDetector, onnx_file: str | Path, threads: int | None = None) -> None:
        if detector.device.type != "cpu":
            raise ValueError(f"ONNX Runtime scoring runs on the CPU; the detector is on {detector.device}")
        self.detector = detector
        self.session = onnx_session(onnx_file, threads)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.detector.input_size

    def score_maps(self, images: torch.Tensor) -> ScoreMaps:
        """:meth:`UFlowDetector.score_maps` with the exported graph's latents."""
        with torch.inference_mode():
            normalized = self.detector.normalize(images)
        _, latents = run_exported(self.session, normalized)
        return self.detector.maps_from_latents(latents)

    def score(self, images: torch.Tensor, original_sizes: list[tuple[int, int]], epsilon: float | None = None,
              false_alarm_rate: float | None = None) -> list[ImageResult]:
        return self.detector.results(self.score_maps(images), original_sizes, epsilon, false_alarm_rate)


def load_onnx_detector(directory: str | Path, onnx_file: str | Path | None = None,
                       threads: int | None = None) -> OnnxRuntimeDetector:
    """The saved detector scoring through ONNX Runtime.

    ``onnx_file`` defaults to the directory's ``model.onnx`` (what
    ``uflow-batch export`` writes); without one, the graph is exported once
    into a temporary file (a few seconds), since a model store's directories
    hold only what training published.
    """
    detector = load_detector(directory, device="cpu")
    path = Path(onnx_file) if onnx_file is not None else default_output(directory, "onnx")
    if path.is_file():
        return OnnxRuntimeDetector(detector, path, threads)
    with tempfile.TemporaryDirectory(prefix="uflow-onnx-") as scratch:
        exported = export_detector(detector, Path(scratch) / "model.onnx", check=False).path
        log.info("%s has no %s: exported the scoring graph for this process", directory, path.name)
        return OnnxRuntimeDetector(detector, exported, threads)  # the session holds the graph; the file may go
