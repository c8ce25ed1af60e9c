"""Export (issue 12, item 4): the exported scoring graph gives torch's numbers on real images.

Tolerances, fixed here and not tuned per run:

* anomaly maps and the image score (the map's maximum), both in [0, 1]:
  **absolute** 1e-4;
* latents: |exported - torch| <= 1e-4 * (1 + |torch|), i.e. absolute near
  zero and **relative** where an untypical image sends a latent far out
  (float32 round-off grows with the value);
* the verdict's significance (-log10 of the smallest NFA, computed by the
  torch NFA from either runtime's latents): **relative** 1e-4 (absolute
  1e-4 below 1).

TorchScript replays torch's own kernels, so it is held to the same bounds
(in practice it matches exactly).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import TINY_DETECTOR
from shared_data import require_mtd
from test_flow import randomized
from uflow_batch import data
from uflow_batch.checkpoint import load_detector
from uflow_batch.config import MODEL_KINDS
from uflow_batch.export import INPUT_NAME, ScoringGraph, export_detector, onnx_session, run_exported
from uflow_batch.model import UFlowDetector
from uflow_batch.model.backbones import build_extractor
from uflow_batch.onnx_scoring import OnnxRuntimeDetector, load_onnx_detector
from uflow_batch.storage import ModelStore

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    """Four MTD images (train/good, test/good, a blowhole, a crack) at the tiny model's 64x64, uint8."""
    root = require_mtd() / "tile_exp1"
    picks = [sorted((root / split).glob("*.png"))[0] for split in ("train/good", "test/good", "test/blowhole", "test/crack")]
    return torch.stack([data.resize_to_model(data.decode_image(p.read_bytes()), TINY_DETECTOR.backbone.input_size)
                        for p in picks])


def assert_latents_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        scaled = ((g - e).abs() / (1 + e.abs())).max().item()
        assert scaled <= TOLERANCE, f"latent of shape {tuple(e.shape)}: |d| / (1 + |z|) = {scaled:.2e}"


@pytest.mark.slow
def test_onnx_scores_equal_torch_on_real_images(model_store, real_images, tmp_path):
    pytest.importorskip("onnxruntime")
    directory, _ = ModelStore(model_store).fetch("fabric")
    detector = load_detector(directory)
    report = export_detector(detector, tmp_path / "model.onnx")
    assert report.max_abs_error_anomaly <= TOLERANCE and report.max_scaled_error_latents <= TOLERANCE

    expected = detector.score_maps(real_images)
    with torch.inference_mode():
        expected_latents = detector.latents(detector.features(real_images))[0]
    anomaly, latents = run_exported(onnx_session(report.path, threads=1), detector.normalize(real_images))
    assert (anomaly - expected.anomaly).abs().max().item() <= TOLERANCE
    assert_latents_close(latents, expected_latents)

    got = detector.maps_from_latents(latents)  # the verdict in torch, on the exported graph's latents
    assert (anomaly.flatten(1).amax(dim=1) - expected.image_score).abs().max().item() <= TOLERANCE
    torch.testing.assert_close(got.significance, expected.significance, rtol=TOLERANCE, atol=TOLERANCE)

    # The scoring hook: the same results as the torch detector's, row for row.
    sizes = [(231, 400), (300, 250), (399, 616), (240, 105)]
    rows = OnnxRuntimeDetector(detector, report.path, threads=1).score(real_images, sizes)
    for row, reference in zip(rows, detector.score(real_images, sizes), strict=True):
        assert row.is_anomalous == reference.is_anomalous and row.mask.shape == reference.mask.shape
        assert row.image_score == pytest.approx(reference.image_score, abs=TOLERANCE)
        assert row.max_neg_log10_nfa == pytest.approx(reference.max_neg_log10_nfa, rel=TOLERANCE, abs=TOLERANCE)


@pytest.fixture(scope="module")
def tiny_extractor():
    """One backbone for every kind (each detector would otherwise rebuild the same frozen network)."""
    return build_extractor(TINY_DETECTOR.backbone)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_every_kind_exports_with_a_dynamic_batch_and_torch_numbers(kind, tiny_extractor, real_images, tmp_path):
    """Untrained flows start as the identity; moved off it, every coupling, permutation and ActNorm counts."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    detector = UFlowDetector(replace(TINY_DETECTOR, kind=kind), extractor=tiny_extractor).eval()
    randomized(detector.flow, scale=0.02)
    normalized = detector.normalize(real_images)  # 4 images; the graph is traced at a batch of 2
    with torch.inference_mode():
        expected_anomaly, *expected_latents = ScoringGraph(detector)(normalized)

    onnx_file = export_detector(detector, tmp_path / "model.onnx", check=False).path
    session = onnx_session(onnx_file, threads=1)
    assert session.get_inputs()[0].name == INPUT_NAME and session.get_inputs()[0].shape[0] == "batch"
    anomaly, latents = run_exported(session, normalized)
    assert (anomaly - expected_anomaly).abs().max().item() <= TOLERANCE
    assert_latents_close(latents, expected_latents)

    script = export_detector(detector, tmp_path / "model.pt", fmt="torchscript", check=False).path
    with torch.inference_mode():
        scripted_anomaly, *scripted_latents = torch.jit.load(str(script))(normalized)
    assert (scripted_anomaly - expected_anomaly).abs().max().item() <= TOLERANCE
    assert_latents_close(scripted_latents, expected_latents)


def uflow(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "uflow_batch.cli", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_export_writes_a_checked_graph_and_bad_usage_exits_2(model_store, tmp_path):
    pytest.importorskip("onnxruntime")
    directory, _ = ModelStore(model_store).fetch("brushed_metal")
    output = tmp_path / "exported" / "tile.onnx"
    exported = uflow("export", "--model", str(directory), "--output", str(output))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert output.is_file() and f"{output}: uflow scoring graph (onnx)" in exported.stdout
    assert "largest difference to torch: anomaly map" in exported.stdout

    missing = uflow("export", "--model", str(tmp_path / "no-model"))
    assert missing.returncode == 2 and "no-model is not a model directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    # Without the onnx package (import blocked), the same one-line refusal, before anything is loaded.
    no_onnx = uflow("export", "--model", str(directory), "--output", str(tmp_path / "never.onnx"),
                    code="import sys; sys.modules['onnx'] = None; sys.argv[0] = 'uflow-batch'; "
                         "from uflow_batch.cli import run; run()")
    assert no_onnx.returncode == 2 and "pip install 'uflow-batch[export]'" in no_onnx.stderr
    assert len(no_onnx.stderr.strip().splitlines()) == 1 and not (tmp_path / "never.onnx").exists()
    assert not Path(directory, "model.onnx").exists(), "--output was honoured: nothing written beside the weights"

    # The scoring hook on a model directory without a graph exports one for the process, and scores like torch.
    scorer = load_onnx_detector(directory, threads=1)
    images = torch.randint(0, 256, (2, 3, *scorer.input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = scorer.detector.score_maps(images)
    got = scorer.score_maps(images)
    assert (got.anomaly - expected.anomaly).abs().max().item() <= TOLERANCE
    torch.testing.assert_close(got.significance, expected.significance, rtol=TOLERANCE, atol=TOLERANCE)
