"""Training one category: cached features, held-out validation, a self-describing model."""

import json

import numpy as np
import pytest
import torch

from shared_data import make_tiny_mvtec
from uflow_batch import data
from uflow_batch.config import BackboneConfig, ConfigError, DetectorConfig, NFAConfig, TrainConfig
from uflow_batch.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, load_detector, read_manifest, save_detector
from uflow_batch.manifest import ModelFormatError, ModelManifest
from uflow_batch.model import UFlowDetector, negative_log_likelihood
from uflow_batch.model.calibration import Calibration
from uflow_batch.train import (
    TrainingDiverged,
    TrainingError,
    TrainingReport,
    fit_flow,
    recalibrate,
    split_indices,
    train_category,
    validation_scores,
)

SMALL = DetectorConfig(backbone=BackboneConfig(input_size=(64, 64)))
QUICK = TrainConfig(max_epochs=3, batch_size=4, patience=5, warmup_epochs=1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_mvtec(tmp_path_factory.mktemp("mtd"))


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    report = train_category(str(tiny_root), "tile_exp1", out, SMALL, QUICK)
    return out, report


def test_training_writes_weights_and_a_self_describing_manifest(trained):
    out, report = trained
    assert (out / WEIGHTS_FILE).is_file()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["category"] == "tile_exp1"
    assert manifest["config"]["backbone"]["input_size"] == [64, 64]
    assert manifest["config"]["backbone"]["name"] == "lite0"
    assert manifest["config"]["backbone"]["layers"] == [1, 2, 3, 4], "the stages used are recorded, not left to a default"
    assert manifest["config"]["nfa"] == {"test": "scan", "p": 0.9, "windows": [5, 3], "scan_windows": [1, 3, 5], "mask_p": 0.99,
                                         "epsilon": 1.0, "false_alarm_rate": 0.01}
    assert len(manifest["backbone_sha256"]) == 64
    assert manifest["normalization"]["mean"] == [0.5, 0.5, 0.5] and manifest["normalization"]["std"] == [0.5, 0.5, 0.5]
    assert manifest["training"]["n_train"] + manifest["training"]["n_val"] == 12
    assert len(manifest["training"]["data_fingerprint"]) == 64
    assert manifest["package_version"]
    assert report.epochs == 3 and 1 <= report.best_epoch <= 3
    assert np.isfinite(report.best_val_loss) and np.isfinite(report.fair_threshold)


def test_a_trained_models_manifest_reads_back_typed_with_its_fair_threshold_stored_once(trained):
    out, report = trained
    manifest = read_manifest(out)
    assert manifest.category == "tile_exp1" and manifest.input_size == (64, 64) and manifest.train_config == QUICK
    assert manifest.training == report and manifest.fair_threshold == report.fair_threshold
    assert ModelManifest.from_json(manifest.to_json(), "again") == manifest
    assert "fair_threshold" not in json.loads((out / MANIFEST_FILE).read_text())["training"]


def test_a_manifest_of_the_old_layout_with_two_fair_threshold_copies_still_loads(trained, tmp_path):
    out, report = trained
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["training"]["fair_threshold"] = manifest["fair_threshold"]  # what training wrote before the typed manifest
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    (tmp_path / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
    assert read_manifest(tmp_path).fair_threshold == report.fair_threshold
    assert load_detector(tmp_path).config == load_detector(out).config


def test_the_verdict_is_calibrated_on_the_held_out_normal_images_and_travels_in_the_manifest(trained):
    out, report = trained
    calibration = json.loads((out / MANIFEST_FILE).read_text())["calibration"]
    assert calibration["n_images"] == report.n_val, "fitted on the held-out split of train/good, nothing else"
    assert calibration["false_alarms"]["n_images"] == report.n_val
    assert calibration["false_alarms"]["epsilons"] == [0.01, 0.1, 1.0, 10.0, 100.0]
    assert set(calibration["fits"]) >= {"0/1", "1/1"}
    assert load_detector(out).nfa.calibration == Calibration.from_dict(calibration)


def test_recalibration_rebuilds_the_same_held_out_split(trained, tiny_root, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    before = json.loads((copy / MANIFEST_FILE).read_text())["calibration"]
    assert recalibrate(copy, str(tiny_root)) == Calibration.from_dict(before)
    block = recalibrate(copy, str(tiny_root), test="block")
    assert block.fits == {} and load_detector(copy).config.nfa.test == "block"
    with pytest.raises(TrainingError, match="not the data"):
        recalibrate(copy, str(make_tiny_mvtec(tmp_path / "other", n_train=11)))


def test_a_model_saved_before_the_scan_test_keeps_scoring_with_the_papers_block_test(trained, tmp_path):
    out, _ = trained
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["config"]["nfa"] = {"p": 0.9, "windows": [5, 3], "epsilon": 1.0}
    del manifest["calibration"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    (tmp_path / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
    assert load_detector(tmp_path).config.nfa.test == "block"


def test_a_model_calibrated_for_the_first_scan_test_scores_with_the_block_test_until_recalibrated(trained, tiny_root, tmp_path):
    out, _ = trained
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["calibration"]["version"] == 2
    del manifest["calibration"]["version"]  # what the per-scale scan test of version 1 wrote
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    (tmp_path / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
    assert load_detector(tmp_path).config.nfa.test == "block", "its correction factor does not hold for this test"
    recalibrate(tmp_path, str(tiny_root), test="scan")
    reloaded = load_detector(tmp_path)
    assert reloaded.config.nfa.test == "scan" and reloaded.nfa.calibration.version == 2


def test_a_loaded_model_scores_exactly_like_the_trained_one(trained, tiny_root):
    out, _ = trained
    first, second = load_detector(out), load_detector(out)
    image = data.resize_to_model(data.decode_image(next((tiny_root / "tile_exp1/test/crack").glob("*.png")).read_bytes()), (64, 64))
    a, b = first.score_maps(image[None]), second.score_maps(image[None])
    assert torch.equal(a.anomaly, b.anomaly) and torch.equal(a.neg_log10_nfa, b.neg_log10_nfa)


def test_loading_refuses_a_model_trained_on_other_backbone_weights(trained, tmp_path):
    out, _ = trained
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["backbone_sha256"] = "0" * 64
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    (tmp_path / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelFormatError, match="backbone"):
        load_detector(tmp_path)
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        load_detector(tmp_path / "nowhere")


def test_manifests_are_strict_json_even_with_non_finite_statistics(trained, tmp_path):
    out, _ = trained
    detector = load_detector(out)
    save_detector(detector, tmp_path, training=TrainingReport("x", 1, 1, fair_threshold=float("nan"), best_val_loss=float("inf")))
    text = (tmp_path / MANIFEST_FILE).read_text()
    manifest = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert manifest["fair_threshold"] is None and manifest["training"]["best_val_loss"] is None


def test_validation_scoring_in_batches_matches_scoring_the_images_whole(trained, tiny_root):
    out, _ = trained
    detector = load_detector(out)
    paths = sorted((tiny_root / "tile_exp1/train/good").glob("*.png"))[:5]
    images = torch.stack([data.resize_to_model(data.decode_image(p.read_bytes()), (64, 64)) for p in paths])
    whole = detector.score_maps(images)
    scores, peak = validation_scores(detector, detector.features(images), batch_size=2)
    assert np.allclose(scores, whole.image_score.numpy(), rtol=1e-5)
    assert peak == pytest.approx(float(whole.anomaly.max()), rel=1e-5)


def test_other_nfa_settings_apply_to_a_trained_model_without_retraining(trained, tiny_root):
    out, _ = trained
    detector = load_detector(out)
    image = data.resize_to_model(data.decode_image(next((tiny_root / "tile_exp1/test/crack").glob("*.png")).read_bytes()), (64, 64))
    scan = detector.score_maps(image[None])
    detector.use_nfa(NFAConfig(test="block"))
    default = detector.score_maps(image[None])
    assert not torch.equal(scan.neg_log10_nfa, default.neg_log10_nfa), "the other test, on the same latents"
    detector.use_nfa(NFAConfig(test="block", windows=(3,)))
    finer = detector.score_maps(image[None])
    assert detector.config.nfa.windows == (3,)
    assert torch.equal(default.anomaly, finer.anomaly), "the flow is untouched"
    assert not torch.equal(default.neg_log10_nfa, finer.neg_log10_nfa)
    with pytest.raises(ConfigError, match="nfa.windows has 5 entries"):
        detector.use_nfa(NFAConfig(test="block", windows=(3, 3, 3, 3, 3)))


def test_validation_images_are_held_out_of_training():
    train, val = split_indices(100, 0.15, seed=0)
    assert len(val) == 15 and len(train) == 85
    assert not set(train) & set(val)
    assert np.array_equal(split_indices(100, 0.15, seed=0)[1], val), "the split is seeded"
    assert len(split_indices(2, 0.15, seed=0)[1]) == 1, "at least one validation image"


def test_loss_is_a_mean_over_images_not_a_sum():
    latents = [torch.randn(1, 3, 4, 4)]
    log_det = torch.tensor([2.0])
    single = negative_log_likelihood(latents, log_det)
    doubled = negative_log_likelihood([torch.cat([latents[0]] * 2)], log_det.repeat(2))
    assert doubled.item() == pytest.approx(single.item())
    assert single.item() == pytest.approx(0.5 * latents[0].pow(2).sum().item() - 2.0)


def test_training_improves_the_validation_likelihood(trained):
    _, report = trained
    assert report.best_val_loss < report.initial_val_loss


def test_a_nan_loss_is_reported_not_trained_through():
    detector = UFlowDetector(SMALL)
    features = [torch.randn(4, *s) for s in detector.flow.feature_shapes]
    features[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        fit_flow(detector, features, [f.clone() for f in features], QUICK, TrainingReport("x", 4, 4))


def test_a_corrupt_training_image_is_named_or_skipped_and_counted(tiny_root, tmp_path):
    root = make_tiny_mvtec(tmp_path / "data", n_train=4, n_good=1, n_per_defect=1)
    bad = root / "tile_exp1" / "train" / "good" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(TrainingError, match="broken.png"):
        train_category(str(root), "tile_exp1", tmp_path / "m1", SMALL, QUICK)
    report = train_category(str(root), "tile_exp1", tmp_path / "m2", SMALL, TrainConfig(max_epochs=1, skip_corrupt=True))
    assert report.skipped_images == [str(bad)]
    manifest = json.loads((tmp_path / "m2" / MANIFEST_FILE).read_text())
    assert manifest["training"]["skipped_images"] == [str(bad)]


def test_a_category_without_training_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(data.DatasetLayoutError, match="train/good"):
        train_category(str(tmp_path), "empty", tmp_path / "m", SMALL, QUICK)
    with pytest.raises(data.DatasetLayoutError):
        train_category(str(tmp_path), "missing", tmp_path / "m", SMALL, QUICK)
