"""The model manifest: a typed record that round-trips through JSON and names what is wrong with a bad one."""

import json

import pytest

from uflow_batch.config import DetectorConfig, TrainConfig
from uflow_batch.manifest import ModelFormatError, ModelManifest, Normalization, TrainingReport
from uflow_batch.model.calibration import BackgroundFit, Calibration, FalseAlarms

MANIFEST = ModelManifest(
    package_version="1.2.3",
    config=DetectorConfig(),
    backbone_sha256="ab" * 32,
    feature_shapes=((40, 64, 64), (112, 32, 32)),
    latent_shapes=((20, 64, 64), (56, 32, 32)),
    normalization=Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    calibration=Calibration(fits={"0/1": BackgroundFit(1.1, 19.0, tail_start=40.0)}, log10_factor=0.3, n_images=3,
                            false_alarms=FalseAlarms(3, (0.1, 1.0), (0.0, 0.33), (0.0, 0.33))),
    category="fabric",
    train_config=TrainConfig(max_epochs=3),
    training=TrainingReport("fabric", 17, 3, ["bad.png"], epochs=3, initial_val_loss=9.5, best_epoch=2, best_val_loss=7.25,
                            best_val_nll_per_dim=0.9, final_train_loss=7.0, fair_threshold=0.75, val_image_scores=[0.5, 0.625, 0.75],
                            data_fingerprint="cd" * 32),
)


def as_json(**changes) -> str:
    """The manifest's JSON with top-level keys replaced (None: removed)."""
    data = json.loads(MANIFEST.to_json())
    for key, value in changes.items():
        data.pop(key) if value is None else data.__setitem__(key, value)
    return json.dumps(data)


def test_a_manifest_round_trips_through_json():
    assert ModelManifest.from_json(MANIFEST.to_json(), "m.json") == MANIFEST
    assert MANIFEST.input_size == (256, 256) and MANIFEST.fair_threshold == 0.75


def test_the_fair_threshold_is_written_once_at_the_top_level():
    data = json.loads(MANIFEST.to_json())
    assert data["fair_threshold"] == 0.75 and "fair_threshold" not in data["training"]


def test_an_old_manifest_with_two_fair_threshold_copies_and_fewer_statistics_loads():
    data = json.loads(MANIFEST.to_json())
    data["training"]["fair_threshold"] = 0.75
    del data["training"]["initial_val_loss"]  # a statistic the first release did not record
    del data["normalization"]
    loaded = ModelManifest.from_json(json.dumps(data), "old.json")
    assert loaded.fair_threshold == 0.75 and loaded.training.best_val_loss == 7.25
    assert loaded.normalization is None


def test_a_model_saved_outside_training_has_no_record_and_no_fair_threshold():
    bare = ModelManifest.from_json(as_json(category=None, train_config=None, training=None, fair_threshold=None), "m.json")
    assert bare.category is None and bare.training is None
    assert bare.fair_threshold != bare.fair_threshold, "NaN: no threshold to compare with"


def test_a_non_finite_statistic_is_null_in_json_and_nan_when_read():
    data = json.loads(as_json(fair_threshold=None))
    data["training"]["best_val_loss"] = None
    loaded = ModelManifest.from_json(json.dumps(data), "m.json")
    assert loaded.training.best_val_loss != loaded.training.best_val_loss
    assert loaded.fair_threshold != loaded.fair_threshold


@pytest.mark.parametrize("text, field", [
    (as_json(backbone_sha256=None), "'backbone_sha256' is missing"),
    (as_json(backbone_sha256=12), "'backbone_sha256' must be of type str, got int 12"),
    (as_json(latent_shapes=[[20, "64", 64]]), "'latent_shapes\\[0\\]\\[1\\]' must be of type int, got str '64'"),
    (as_json(training={"category": "fabric", "n_train": 17}), "'training.n_val' is missing"),
    (as_json(training={"category": "fabric", "n_train": 17, "n_val": True}), "'training.n_val' must be of type int"),
    (as_json(fair_threshold="high"), "'training.fair_threshold' must be a number"),
    (as_json(config=[64, 64]), "'config' must be an object, got list"),
    (as_json(config={"backbone": {"input_size": [64, 60]}}), "'config' is invalid: backbone.input_size must be multiples of 32"),
    (as_json(train_config={"max_epoch": 3}), "'train_config' is invalid: .*'max_epoch' \\(did you mean 'max_epochs'\\?\\)"),
    (as_json(calibration={"log10_factor": 0.3}), "'calibration' is invalid"),
])
def test_a_missing_or_mistyped_field_is_a_model_format_error_naming_the_file_and_the_field(text, field):
    with pytest.raises(ModelFormatError, match=f"^models/fabric/manifest.json: manifest field {field}") as error:
        ModelManifest.from_json(text, "models/fabric/manifest.json")
    assert "\n" not in str(error.value), "one line"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a JSON manifest"),
    ("[1, 2]", "manifest format 'list', this version reads 1"),
    (as_json(format=2), "manifest format 2, this version reads 1"),
])
def test_a_foreign_file_or_another_format_is_refused(text, message):
    with pytest.raises(ModelFormatError, match=message):
        ModelManifest.from_json(text, "m.json")
