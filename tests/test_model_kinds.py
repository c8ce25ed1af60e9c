"""Every flow kind is a model of the same product: trained, saved, scored and judged like U-Flow."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from uflow_batch import analysts, data, report, storage
from uflow_batch.checkpoint import load_detector, read_manifest, save_detector
from uflow_batch.config import MODEL_KINDS, BackboneConfig, ConfigError, DetectorConfig, ScoringResources, TrainConfig, parse_category_kinds
from uflow_batch.devtools.synthetic import SyntheticConfig, generate_dataset, write_scoring_archive
from uflow_batch.evaluate import score_test_split
from uflow_batch.model.calibration import false_alarms
from uflow_batch.model.registry import FLOWS
from uflow_batch.pipelines.score import ScoreRequest, run_scoring
from uflow_batch.pipelines.train_all import train_all
from uflow_batch.storage import ModelStore
from uflow_batch.train import train_category

from conftest import TINY_TRAINING
from shared_data import make_tiny_mvtec

SMALL = DetectorConfig(backbone=BackboneConfig(input_size=(64, 64)))
QUICK = TrainConfig(max_epochs=4, batch_size=8, patience=5, warmup_epochs=1)


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    """Real normal tiles: 40 to train on (6 held out), 25 fresh good test images, a few defective ones."""
    return make_tiny_mvtec(tmp_path_factory.mktemp("mtd"), n_train=40, n_good=25, n_per_defect=1)


@pytest.fixture(scope="module")
def trained(normals, tmp_path_factory):
    models = {}
    for kind in MODEL_KINDS:
        out = tmp_path_factory.mktemp(kind)
        train_category(str(normals), "tile_exp1", out, replace(SMALL, kind=kind), QUICK)
        models[kind] = out
    return models


def test_the_registry_builds_every_kind_the_configuration_accepts():
    assert set(FLOWS) == set(MODEL_KINDS)
    with pytest.raises(ConfigError, match="kind must be one of"):
        DetectorConfig(kind="padim")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_manifest_names_its_kind_and_the_checkpoint_round_trips(kind, trained, normals, tmp_path):
    assert read_manifest(trained[kind]).config.kind == kind
    detector = load_detector(trained[kind])
    save_detector(detector, tmp_path / "again")
    again = load_detector(tmp_path / "again")
    image = data.resize_to_model(data.decode_image(next((normals / "tile_exp1/test/good").glob("*.png")).read_bytes()), (64, 64))
    first, second = detector.score_maps(image[None]), again.score_maps(image[None])
    assert torch.equal(first.anomaly, second.anomaly) and torch.equal(first.significance, second.significance)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_each_kinds_verdict_keeps_its_promise_on_good_images_it_never_saw(kind, trained, normals):
    detector = load_detector(trained[kind])
    scored, _ = score_test_split(detector, data.test_images(str(normals), "tile_exp1"), batch_size=8)
    good = [s.nfa_maps for s in scored if s.nfa_maps is not None]
    assert len(good) == 25
    measured = false_alarms(good, (1.0, 10.0))
    for epsilon, detections in zip(measured.epsilons, measured.detections_per_image):
        assert detections <= epsilon, f"{kind}: {detections} false detections per good image at epsilon {epsilon}"


def test_differnet_gives_the_verdict_but_never_a_mask(trained, normals):
    detector = load_detector(trained["differnet"])
    detector.use_nfa(replace(detector.config.nfa, false_alarm_rate=0.999))  # flag almost everything
    scored, _ = score_test_split(detector, data.test_images(str(normals), "tile_exp1"), batch_size=8)
    assert any(s.flagged for s in scored)
    assert not any(s.nfa_mask.any() for s in scored)


def test_category_kinds_are_parsed_and_checked():
    assert parse_category_kinds("washer=fastflow, fabric=cflow") == {"washer": "fastflow", "fabric": "cflow"}
    assert parse_category_kinds(None) == {}
    with pytest.raises(ConfigError, match="must be one of"):
        parse_category_kinds("washer=fastflw")
    with pytest.raises(ConfigError, match="CATEGORY=KIND"):
        parse_category_kinds("fastflow")


@pytest.mark.slow
def test_one_night_trains_and_scores_a_different_kind_per_category_on_s3(ray_local, s3_bucket_url, tmp_path):
    """train-all with a kind per category, the nightly scoring, the shipped queries and the report."""
    config = SyntheticConfig(categories=("brushed_metal", "fabric", "washer"), image_size=96, n_train=6,
                             n_test_good=2, n_test_per_defect=1, seed=5)
    root = tmp_path / "data"
    generate_dataset(str(root), config)
    training = storage.join(s3_bucket_url, "data")
    fs, path = storage.filesystem(training)
    fs.put(str(root), path, recursive=True)
    models = storage.join(s3_bucket_url, "models")
    kinds = {"brushed_metal": "fastflow", "fabric": "cflow", "washer": "differnet"}
    outcomes = train_all(training, models, list(config.categories), SMALL, TINY_TRAINING, kinds=kinds)
    assert {o.category: o.status for o in outcomes} == dict.fromkeys(config.categories, "ok")
    store = ModelStore(models)
    assert {c: read_manifest(store.fetch(c)[0]).config.kind for c in config.categories} == kinds

    archive = write_scoring_archive(storage.join(s3_bucket_url, "archive"), config, n_per_category=3)
    output = storage.join(s3_bucket_url, "scores")
    request = ScoreRequest(inputs=(archive.root,), models=models, output=output, run_date="2026-12-02",
                           resources=ScoringResources(batch_size=4))
    summary = run_scoring(request)
    assert summary.rows_written == len(archive.files)
    for name in analysts.query_names():
        analysts.run_query(name, output)  # every shipped query reads the rows of every kind
    night = {r["category"]: (r["n_images"], r["n_scored"]) for r in analysts.run_query("defect_rate_per_night", output).to_pylist()}
    expected = Counter(f.category for f in archive.files), Counter(f.category for f in archive.files if f.expected == "scored")
    assert night == {c: (expected[0][c], expected[1][c]) for c in expected[0]}
    assert all(night[c][1] >= 3 for c in config.categories), "every kind scored its category's images"
    summary = report.build_report(output, str(tmp_path / "report.html"), top_n=6)
    assert summary.n_images == len(archive.files)
