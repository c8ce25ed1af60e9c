"""On a CUDA GPU, training and scoring give what the CPU gives (skipped where there is no GPU)."""

import pytest
import torch

from shared_data import make_tiny_mvtec
from uflow_batch import data
from uflow_batch.config import BackboneConfig, DetectorConfig, TrainConfig
from uflow_batch.checkpoint import load_detector
from uflow_batch.train import train_category

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = DetectorConfig(backbone=BackboneConfig(input_size=(64, 64)))


@pytest.fixture
def exact_float32(monkeypatch):
    """TF32 convolutions would differ from the CPU by more than float32 rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def test_a_model_trained_on_the_gpu_scores_alike_on_gpu_and_cpu(tmp_path, exact_float32):
    root = make_tiny_mvtec(tmp_path / "mtd")
    report = train_category(str(root), "tile_exp1", tmp_path / "model", SMALL,
                            TrainConfig(max_epochs=2, batch_size=4, warmup_epochs=0, device="cuda"))
    assert report.device.startswith("cuda")

    paths = sorted((root / "tile_exp1" / "test").glob("*/*.png"))
    images = torch.stack([data.resize_to_model(data.decode_image(p.read_bytes()), (64, 64)) for p in paths])
    on_cpu = load_detector(tmp_path / "model", device="cpu").score_maps(images)
    on_gpu = load_detector(tmp_path / "model", device="cuda").score_maps(images.cuda())

    assert on_gpu.anomaly.is_cuda and on_gpu.neg_log10_nfa.is_cuda, "the NFA runs on the model's device"
    assert torch.allclose(on_gpu.anomaly.cpu(), on_cpu.anomaly, atol=1e-4)
    assert torch.allclose(on_gpu.neg_log10_nfa.cpu(), on_cpu.neg_log10_nfa, atol=1e-3)
