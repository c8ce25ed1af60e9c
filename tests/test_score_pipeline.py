"""Scoring archives with Ray Data: one row per object, resumable, exactly once under faults.

These tests run a real local Ray instance (inside the loopback-only network
namespace that ``make test`` provides) and, where object storage is
involved, the real S3 server of the session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from uflow_batch import analysts, storage
from uflow_batch.config import ScoringResources
from uflow_batch.devtools.synthetic import DECODE_ERROR, NO_MODEL, SCORED, write_scoring_archive
from uflow_batch.pipelines import runlog
from uflow_batch.pipelines.score import ScoreRequest, run_scoring
from uflow_batch.scores.dataset import open_dataset
from uflow_batch.storage import ModelStore

from conftest import TINY_SYNTHETIC
from processes import kill_own_workers

RUN_DATE = "2026-11-22"
pytestmark = pytest.mark.slow


def output_rows(output: str) -> list[dict]:
    if not storage.exists(output):
        return []
    return open_dataset(output).to_table(columns=["image_uri", "model_version", "category", "run_date", "error"]).to_pylist()


def assert_exactly_once(output: str, expected_uris: set[str]) -> list[dict]:
    rows = output_rows(output)
    counts = Counter((r["image_uri"], r["model_version"]) for r in rows)
    duplicated = {key: n for key, n in counts.items() if n > 1}
    assert not duplicated, f"duplicated rows: {duplicated}"
    assert {r["image_uri"] for r in rows} == expected_uris, "rows lost or invented"
    return rows


def request(archive_root: str, models: str, output: str, **kwargs) -> ScoreRequest:
    return ScoreRequest(inputs=(archive_root,), models=models, output=output, run_date=RUN_DATE,
                        resources=ScoringResources(batch_size=4), rows_per_file=8, **kwargs)


def test_an_archive_gets_one_row_per_object_and_a_rerun_writes_nothing(ray_local, model_store, tmp_path):
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=6, defect_rate=0.5)
    output = str(tmp_path / "scores")
    summary = run_scoring(request(archive.root, model_store, output))
    rows = assert_exactly_once(output, {f.url for f in archive.files})
    assert summary.rows_written == len(archive.files)

    outcome = {r["image_uri"]: r["error"] for r in rows}
    for file in archive.files:
        expected = {SCORED: None, DECODE_ERROR: "decode_error", NO_MODEL: "no_model"}[file.expected]
        assert outcome[file.url] == expected, file
    assert {r["run_date"] for r in rows} == {RUN_DATE}
    assert {r["category"] for r in rows} == {"brushed_metal", "fabric", "unknown_part"}

    again = run_scoring(request(archive.root, model_store, output))
    assert again.rows_written == 0
    assert_exactly_once(output, {f.url for f in archive.files})


def test_a_run_leaves_one_run_record_and_marks_the_partitions_it_completed(ray_local, model_store, tmp_path):
    """The run log says what ran, how it ended and what it counted; a re-run that scores nothing says so too."""
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=1)
    output = str(tmp_path / "scores")
    summary = run_scoring(request(archive.root, model_store, output))
    expected = Counter()
    for file in archive.files:
        expected[(file.category, {SCORED: "ok", DECODE_ERROR: "decode_error", NO_MODEL: "no_model"}[file.expected])] += 1
    counts = {c: {o: n for (cat, o), n in expected.items() if cat == c} for c, _ in expected}
    errors = sum(n for (_, outcome), n in expected.items() if outcome != "ok")

    (record,) = runlog.run_records(output, RUN_DATE)
    assert record["run_id"] == summary.run_id and record["status"] == runlog.SUCCEEDED and record["reason"] is None
    assert record["counts"] == counts and record["rows"] == len(archive.files) == summary.rows_written
    assert record["errors"] == errors and record["error_fraction"] == pytest.approx(errors / len(archive.files))
    assert record["errors_by_kind"] == {"decode_error": 4, "no_model": 1}
    assert record["model_versions"] == summary.model_versions and record["inputs"] == [archive.root]
    assert record["started_at"] <= record["ended_at"]
    parts = sorted(str(p) for p in Path(output).glob(record["part_glob"]))
    assert parts and parts == sorted(str(p) for p in Path(output).glob("category=*/run_date=*/part-*.parquet"))

    assert record["completed_partitions"] == sorted(counts)
    for category, outcomes in counts.items():
        marker = runlog.read_json(runlog.marker_url(output, category, RUN_DATE))
        assert marker["run_id"] == summary.run_id and marker["counts"] == outcomes
        assert marker["rows"] == sum(outcomes.values()) and marker["model_version"] == summary.model_versions.get(category)
    assert_exactly_once(output, {f.url for f in archive.files})  # pyarrow's dataset reads no record and no marker

    again = run_scoring(request(archive.root, model_store, output))
    first, second = runlog.run_records(output, RUN_DATE)
    assert first == record, "a record is final once its run ended"
    assert second["run_id"] == again.run_id != summary.run_id
    assert (second["status"], second["rows"], second["errors"], second["counts"]) == (runlog.SUCCEEDED, 0, 0, {})
    marker = runlog.read_json(runlog.marker_url(output, "fabric", RUN_DATE))
    assert marker["run_id"] == summary.run_id, "a run with nothing left to write keeps the marker of the run that did"


def test_a_run_that_fails_says_so_in_its_record_and_marks_nothing(ray_local, model_store, tmp_path, monkeypatch):
    from uflow_batch.pipelines import score

    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=1, include_bad_files=False)
    output = str(tmp_path / "scores")

    def storage_gone(*args, **kwargs):
        raise RuntimeError("storage gone mid-run")

    monkeypatch.setattr(score, "_score_passes", storage_gone)
    with pytest.raises(RuntimeError, match="storage gone"):
        run_scoring(request(archive.root, model_store, output))
    (record,) = runlog.run_records(output, RUN_DATE)
    assert record["status"] == runlog.FAILED and "RuntimeError: storage gone mid-run" in record["reason"]
    assert record["ended_at"] and record["completed_partitions"] == []
    assert not list(Path(output).glob(f"category=*/run_date=*/{runlog.MARKER_NAME}"))


def test_an_empty_night_still_leaves_its_run_record(tmp_path):
    (tmp_path / "archive").mkdir()
    output = str(tmp_path / "scores")
    summary = run_scoring(request(str(tmp_path / "archive"), str(tmp_path / "models"), output))
    (record,) = runlog.run_records(output, RUN_DATE)
    assert (record["run_id"], record["status"], record["rows"], record["counts"]) == (summary.run_id, "succeeded", 0, {})


def test_new_objects_and_a_new_model_version_are_scored_on_the_next_run(ray_local, model_store, tmp_path):
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=2, include_bad_files=False)
    output = str(tmp_path / "scores")
    run_scoring(request(archive.root, model_store, output))
    late = Path(archive.root) / "fabric" / "late.png"
    late.write_bytes(Path(archive.files[-1].url).read_bytes())
    assert run_scoring(request(archive.root, model_store, output)).rows_written == 1

    store = ModelStore(model_store)
    directory, _ = store.fetch("fabric")
    new_version = store.publish(directory, "fabric")
    try:
        summary = run_scoring(request(archive.root, model_store, output))
        assert summary.rows_written == 3 and summary.model_versions["fabric"] == new_version
    finally:
        store.publish(directory, "fabric")  # later tests see one current version again, whatever it is


def test_object_storage_in_and_out(ray_local, model_store, s3_bucket_url):
    archive = write_scoring_archive(storage.join(s3_bucket_url, "archive"), TINY_SYNTHETIC, n_per_category=3)
    models = storage.join(s3_bucket_url, "models")
    for category in TINY_SYNTHETIC.categories:
        ModelStore(models).publish(ModelStore(model_store).fetch(category)[0], category)
    output = storage.join(s3_bucket_url, "scores")
    summary = run_scoring(request(archive.root, models, output))
    assert summary.rows_written == len(archive.files)
    assert_exactly_once(output, {f.url for f in archive.files})
    assert run_scoring(request(archive.root, models, output)).rows_written == 0


def test_a_rerun_after_a_run_without_a_categorys_model_scores_every_image_once(ray_local, model_store, s3_bucket_url):
    """no_model rows of a run against an incomplete store neither block nor double the corrected re-run's rows."""
    if analysts.extension_directory() is None:
        pytest.skip("duckdb-ext-httpfs is not installed (pip install 'uflow-batch[analysts]')")
    archive = write_scoring_archive(storage.join(s3_bucket_url, "archive"), TINY_SYNTHETIC, n_per_category=3,
                                    include_bad_files=False)
    models, output = storage.join(s3_bucket_url, "models"), storage.join(s3_bucket_url, "scores")
    present, missing = TINY_SYNTHETIC.categories
    ModelStore(models).publish(ModelStore(model_store).fetch(present)[0], present)
    incomplete = run_scoring(request(archive.root, models, output))
    assert incomplete.by_category == {present: Counter(ok=3), missing: Counter(no_model=3)}

    ModelStore(models).publish(ModelStore(model_store).fetch(missing)[0], missing)
    corrected = run_scoring(request(archive.root, models, output))
    assert corrected.by_category == {missing: Counter(ok=3)}, "the images without a model are scored, the others not again"
    assert {r["image_uri"] for r in output_rows(output) if r["error"] is None} == {f.url for f in archive.files}

    with analysts.duckdb_connect() as connection:
        per_night = analysts.run_query("defect_rate_per_night", output, connection=connection).to_pylist()
    assert {r["category"]: (r["n_images"], r["n_scored"], r["n_errors"]) for r in per_night} == {
        category: (3, 3, 0) for category in TINY_SYNTHETIC.categories}, "one row per image per night"
    assert run_scoring(request(archive.root, models, output)).rows_written == 0


def test_an_image_modified_after_the_run_started_gets_its_row_in_the_same_run(ray_local, model_store, s3_bucket_url):
    """Clock skew: the storage stamps an object later than the driver's start; the run still scores it, once."""
    archive = write_scoring_archive(storage.join(s3_bucket_url, "archive"), TINY_SYNTHETIC, n_per_category=2,
                                    include_bad_files=False)
    models, output = storage.join(s3_bucket_url, "models"), storage.join(s3_bucket_url, "scores")
    for category in TINY_SYNTHETIC.categories:
        ModelStore(models).publish(ModelStore(model_store).fetch(category)[0], category)
    driver_clock = datetime.now(timezone.utc)  # the driver's clock, behind the storage's by the sleep below
    time.sleep(1.5)  # S3 stamps whole seconds
    late = storage.join(archive.root, "fabric", "stamped-in-the-future.png")
    storage.write_bytes_atomic(late, storage.read_bytes(archive.files[-1].url))

    summary = run_scoring(request(archive.root, models, output), started_at=driver_clock)
    assert summary.late == Counter(fabric=1) and summary.late_examples == [late]
    rows = assert_exactly_once(output, {f.url for f in archive.files} | {late})
    assert next(r for r in rows if r["image_uri"] == late)["error"] is None, "scored, not an error row"
    again = run_scoring(request(archive.root, models, output), started_at=driver_clock)
    assert again.rows_written == 0 and not again.late, "a re-run neither scores it again nor calls it late"


def first_part_written(output: str, timeout: float = 300.0) -> None:
    fs, path = storage.filesystem(output)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fs.exists(path) and fs.glob(f"{path}/**/part-*.parquet"):
            return
        time.sleep(0.2)
    raise AssertionError("no part file appeared")


def test_a_killed_inference_worker_loses_and_duplicates_nothing(ray_local, model_store, tmp_path):
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=40, include_bad_files=False)
    output = str(tmp_path / "scores")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_scoring(request(archive.root, model_store, output))))
    runner.start()
    first_part_written(output)
    assert runner.is_alive(), "the fault must hit a run in progress"
    killed = kill_own_workers("ray::MapWorker") > 0
    runner.join(timeout=600)
    assert killed, "an inference actor was running"
    assert "summary" in result, "Ray restarts the actor and retries its tasks"
    assert_exactly_once(output, {f.url for f in archive.files})


def test_a_killed_driver_resumes_without_duplicates(model_store, tmp_path):
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=40, include_bad_files=False)
    output = str(tmp_path / "scores")
    command = [sys.executable, "-m", "uflow_batch.cli", "score", "--input", archive.root, "--models", model_store,
               "--output", output, "--run-date", RUN_DATE, "--batch-size", "4", "--rows-per-file", "8"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first_part_written(output)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    partial = output_rows(output)
    assert 0 < len(partial) < len(archive.files), "killed mid-run"

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_exactly_once(output, {f.url for f in archive.files})


def test_a_storage_restart_mid_run_loses_and_duplicates_nothing(ray_local, model_store, s3_server, s3_bucket_url):
    archive = write_scoring_archive(storage.join(s3_bucket_url, "archive"), TINY_SYNTHETIC, n_per_category=30,
                                    include_bad_files=False)
    models = storage.join(s3_bucket_url, "models")
    for category in TINY_SYNTHETIC.categories:
        ModelStore(models).publish(ModelStore(model_store).fetch(category)[0], category)
    output = storage.join(s3_bucket_url, "scores")
    outcome: dict = {}

    def score() -> None:
        try:
            outcome["summary"] = run_scoring(request(archive.root, models, output))
        except Exception as exc:  # noqa: BLE001 - a run may fail while storage is down; the re-run must repair it
            outcome["error"] = exc

    runner = threading.Thread(target=score)
    runner.start()
    first_part_written(output)
    assert runner.is_alive(), "the fault must hit a run in progress"
    s3_server.restart()  # from the main thread: the server's lifetime is tied to the thread that started it
    runner.join(timeout=600)
    if "summary" in outcome:  # the run rode out the restart: it must be complete on its own
        assert_exactly_once(output, {f.url for f in archive.files})
    run_scoring(request(archive.root, models, output))
    assert_exactly_once(output, {f.url for f in archive.files})
