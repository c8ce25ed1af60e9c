"""train-all: one Ray task per category, bounded retries, failures reported, not fatal."""

from __future__ import annotations

import threading
import time

import pytest

from uflow_batch.config import TrainConfig
from uflow_batch.pipelines import train_all as train_all_module
from uflow_batch.config import TaskResources
from uflow_batch.pipelines.train_all import train_all, train_and_publish
from uflow_batch.storage import ModelStore
from uflow_batch.train import TrainingDiverged

from conftest import TINY_DETECTOR, TINY_TRAINING
from processes import kill_own_workers

pytestmark = pytest.mark.slow


def test_a_diverging_category_is_retried_with_half_the_learning_rate(synthetic_root, tmp_path, monkeypatch):
    rates = []
    real = train_all_module.train_category

    def diverges_once(data_url, category, out_dir, detector_config, train_config, on_epoch=None):
        rates.append(train_config.learning_rate)
        if len(rates) == 1:
            raise TrainingDiverged(f"{category}: training loss became nan at epoch 1, step 1")
        return real(data_url, category, out_dir, detector_config, train_config, on_epoch=on_epoch)

    monkeypatch.setattr(train_all_module, "train_category", diverges_once)
    outcome = train_and_publish(str(synthetic_root), "fabric", str(tmp_path / "models"), TINY_DETECTOR,
                                TrainConfig(max_epochs=1, learning_rate=1e-3), max_attempts=3, num_cpus=1)
    assert outcome.status == "ok" and outcome.attempts == 2
    assert rates == [1e-3, 5e-4]
    assert ModelStore(str(tmp_path / "models")).current_version("fabric") == outcome.model_version


def test_a_category_that_keeps_diverging_is_reported_after_the_last_attempt(synthetic_root, tmp_path):
    outcome = train_and_publish(str(synthetic_root), "fabric", str(tmp_path / "models"), TINY_DETECTOR,
                                TrainConfig(max_epochs=2, batch_size=4, learning_rate=1e8), max_attempts=2, num_cpus=1)
    assert outcome.status == "failed" and outcome.attempts == 2
    assert "loss became" in outcome.error
    assert ModelStore(str(tmp_path / "models")).current_version("fabric") is None, "nothing half-trained is published"


def test_bad_data_fails_at_once_without_retries(tmp_path):
    (tmp_path / "data" / "part" / "train" / "good").mkdir(parents=True)
    (tmp_path / "data" / "part" / "train" / "good" / "a.png").write_bytes(b"not a png")
    (tmp_path / "data" / "part" / "train" / "good" / "b.png").write_bytes(b"")
    outcome = train_and_publish(str(tmp_path / "data"), "part", str(tmp_path / "models"), TINY_DETECTOR,
                                TINY_TRAINING, max_attempts=3, num_cpus=1)
    assert outcome.status == "failed" and outcome.attempts == 1
    assert "a.png" in outcome.error


def test_a_training_worker_killed_mid_task_is_retried_by_ray(ray_local, synthetic_root, tmp_path):
    models = str(tmp_path / "models")
    result: dict = {}
    slow = TrainConfig(max_epochs=5, batch_size=2, warmup_epochs=0, patience=5)
    runner = threading.Thread(target=lambda: result.update(outcomes=train_all(
        str(synthetic_root), models, ["fabric"], TINY_DETECTOR, slow, TaskResources(num_cpus=1, max_attempts=2))))
    runner.start()
    killed = False
    deadline = time.monotonic() + 300
    while not killed and runner.is_alive() and time.monotonic() < deadline:
        killed = kill_own_workers("ray::train_and_publish") > 0
        time.sleep(0.2)
    runner.join(timeout=900)
    assert killed, "the training task was running"
    (outcome,) = result["outcomes"]
    assert outcome.status == "ok", outcome.error
    assert ModelStore(models).current_version("fabric") == outcome.model_version


def test_unknown_categories_are_reported_and_the_others_train_showing_their_epochs(ray_local, synthetic_root, tmp_path):
    models = str(tmp_path / "models")
    snapshots = []
    outcomes = train_all(str(synthetic_root), models, ["fabric", "nonexistent"], TINY_DETECTOR, TINY_TRAINING,
                         TaskResources(num_cpus=1), on_progress=snapshots.append, progress_interval=0.1)
    status = {o.category: o.status for o in outcomes}
    assert status == {"fabric": "ok", "nonexistent": "failed"}
    assert [o.category for o in outcomes] == ["fabric", "nonexistent"], "the summary keeps the requested order"
    assert ModelStore(models).categories() == ["fabric"]
    epochs = [s["fabric"] for s in snapshots if "fabric" in s]
    assert epochs, "progress is reported while the category trains"
    assert all(1 <= p.epoch <= p.max_epochs == TINY_TRAINING.max_epochs for p in epochs)
    assert [p.epoch for p in epochs] == sorted(p.epoch for p in epochs), "epochs only move forward"
