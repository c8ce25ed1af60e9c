"""The command line as a user runs it: outputs, files and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared_data import make_tiny_mvtec
from uflow_batch.devtools.synthetic import write_scoring_archive
from uflow_batch.pipelines.commit import write_part

from conftest import TINY_SYNTHETIC


def uflow(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uflow_batch.cli", *args], capture_output=True, text=True, timeout=900, **kwargs)


def test_train_then_evaluate_prints_the_metrics_table_and_writes_json(tmp_path):
    data = make_tiny_mvtec(tmp_path / "data", n_train=8, n_good=2, n_per_defect=1)
    model = tmp_path / "model"
    trained = uflow("train", "--data", str(data), "--category", "tile_exp1", "--out", str(model),
                    "--input-size", "64,64", "--epochs", "2", "--batch-size", "4")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "tile_exp1: 2 epochs" in trained.stdout and (model / "manifest.json").is_file()

    report = tmp_path / "metrics.json"
    evaluated = uflow("evaluate", "--data", str(data), "--model", str(model), "--json-out", str(report))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    header = evaluated.stdout.splitlines()[0]
    for column in ("img AUROC", "px AUROC", "AUPRO", "false alarms", "recall", "oracle recall",
                   "IoU NFA", "IoU oracle", "IoU fair", "mIoU NFA", "mIoU oracle", "mIoU fair"):
        assert column in header
    (row,) = json.loads(report.read_text())
    assert row["category"] == "tile_exp1" and row["n_images"] == 4 and 0.0 <= row["pixel_auroc"] <= 1.0
    assert row["nfa_test"] == "scan" and row["false_alarm_rate"] == 0.01
    assert row["calibration_curve"]["epsilon"] == [0.01, 0.1, 1.0, 10.0, 100.0]

    figure = tmp_path / "calibration.png"
    paper = uflow("evaluate", "--data", str(data), "--model", str(model), "--nfa-test", "block", "--nfa-windows", "3",
                  "--json-out", str(report), "--figure-out", str(figure))
    assert paper.returncode == 0, paper.stderr[-2000:]
    (paper_row,) = json.loads(report.read_text())
    assert paper_row["nfa_test"] == "block"
    assert paper_row["pixel_auroc"] == row["pixel_auroc"], "only the NFA changes, not the anomaly map"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    calibrated = uflow("calibrate", "--model", str(model), "--data", str(data))
    assert calibrated.returncode == 0, calibrated.stderr[-2000:]
    assert "calibrated on 1 held-out normal images" in calibrated.stdout, "8 training images hold out 1"


def test_bad_configuration_exits_2_and_failed_work_exits_1(tmp_path):
    bad = uflow("train", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "m"), "--nfa-p", "3")
    assert bad.returncode == 2 and "nfa.p must be in (0, 1)" in bad.stderr
    missing = uflow("train", "--data", str(tmp_path / "nowhere"), "--category", "x", "--out", str(tmp_path / "m"))
    assert missing.returncode == 1 and "train/good" in missing.stderr
    assert "Traceback" not in missing.stderr
    usage = uflow("score", "--models", "x")
    assert usage.returncode == 2
    attempts = uflow("train-all", "--data", str(tmp_path), "--models", str(tmp_path / "m"), "--max-attempts", "0")
    assert attempts.returncode == 2 and "attempts per category must be an integer >= 1" in attempts.stderr


def test_what_the_operator_asked_for_that_does_not_exist_exits_2(tmp_path):
    spec = uflow("run-job", str(tmp_path / "nightly.yaml"))
    assert spec.returncode == 2 and "nightly.yaml does not exist" in spec.stderr
    query = uflow("query", "defect_rate", "--scores", str(tmp_path))
    assert query.returncode == 2 and "defect_rate_per_night" in query.stderr, "the known names are listed"
    scored = uflow("score", "--input", str(tmp_path / "archive"), "--models", str(tmp_path), "--output", str(tmp_path / "out"),
                   "--dry-run")
    assert scored.returncode == 2 and "archive does not exist" in scored.stderr


def job_spec(tmp_path: Path, archive_root: str, models: str, output: str) -> Path:
    spec = {
        "name": "test-nightly", "schedule": "0 2 * * *", "inputs": [archive_root.rstrip("/") + "/{run_date}/"],
        "models": models, "output": output, "retention_days": 30, "ray_address": "local",
        "resources": {"batch_size": 4, "gpus_per_actor": 0, "cpus_per_actor": 1, "actors": 1, "decode_cpus": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_run_job_dry_run_then_run_then_rerun(model_store, tmp_path):
    run_date = "2026-11-22"
    archive = write_scoring_archive(str(tmp_path / "archive" / run_date), TINY_SYNTHETIC, n_per_category=3)
    output = tmp_path / "scores"
    old = write_part(str(output), "fabric", "2020-01-01", "old", "run0", _empty_rows())
    spec = job_spec(tmp_path, str(tmp_path / "archive"), model_store, str(output))

    dry = uflow("run-job", str(spec), "--run-date", run_date, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "to score" in dry.stdout and "would delete" in dry.stdout
    assert not (output / "category=fabric" / f"run_date={run_date}").exists() and Path(old).exists(), "a dry run changes nothing"

    run = uflow("run-job", str(spec), "--run-date", run_date)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{len(archive.files)} rows" in run.stdout
    assert not Path(old).exists(), "retention removed the expired partition after a successful run"

    again = uflow("run-job", str(spec), "--run-date", run_date)
    assert again.returncode == 0 and "0 rows in 0 part files" in again.stdout


@pytest.mark.slow
def test_a_night_with_more_errors_than_its_threshold_exits_3_with_one_line_and_below_it_exits_0(model_store, tmp_path):
    run_date = "2026-11-22"
    archive = write_scoring_archive(str(tmp_path / "archive" / run_date), TINY_SYNTHETIC, n_per_category=1)
    errors = sum(f.expected != "scored" for f in archive.files)
    fraction = errors / len(archive.files)
    assert 0.2 < fraction < 0.8, "the corrupt files are a good part of this archive"

    below = uflow("score", "--input", archive.root, "--models", model_store, "--output", str(tmp_path / "below"),
                  "--run-date", run_date, "--batch-size", "4", "--max-error-fraction", f"{fraction + 0.1:.2f}")
    assert below.returncode == 0, below.stderr[-3000:]
    assert f"succeeded: {errors} errors in {len(archive.files)} rows" in below.stdout and "error:" not in below.stderr

    output = tmp_path / "above"
    old = write_part(str(output), "fabric", "2020-01-01", "old", "run0", _empty_rows())
    spec = job_spec(tmp_path, str(tmp_path / "archive"), model_store, str(output))
    spec.write_text(spec.read_text() + "max_error_fraction: 0.1\n")
    above = uflow("run-job", str(spec), "--run-date", run_date)
    assert above.returncode == 3, above.stderr[-3000:]
    (line,) = [line for line in above.stderr.splitlines() if line.startswith("error:")]
    assert f"{errors} of {len(archive.files)} rows are errors" in line and "above max_error_fraction 0.1" in line
    (record,) = [json.loads(p.read_text()) for p in (output / "_runs").glob("run_date=*/*.json")]
    assert record["status"] == "partial" and record["errors"] == errors
    assert Path(old).exists(), "no retention after a night that did not succeed"
    assert "partial" in uflow("runs", "--scores", str(output)).stdout


def test_runs_lists_the_run_log_with_a_run_still_running(tmp_path):
    from datetime import datetime, timezone

    from uflow_batch.pipelines import runlog

    output = str(tmp_path / "scores")
    assert "no run records" in uflow("runs", "--scores", output).stdout
    for run_id, run_date in (("finished01", "2026-11-21"), ("running02", "2026-11-22")):
        log = runlog.RunLog(output, run_date, run_id, datetime.now(timezone.utc), inputs=["a"], manifest=None,
                            models="m", max_error_fraction=0.1)
        log.start()
        if run_id == "finished01":
            log.finish(runlog.PARTIAL, by_category={"fabric": {"ok": 3, "decode_error": 1}}, model_versions={}, files=1,
                       late={}, markers=[], reason="1 of 4 rows are errors")
    listed = uflow("runs", "--scores", output)
    assert listed.returncode == 0, listed.stderr[-2000:]
    header, _, first, second = listed.stdout.splitlines()
    assert header.split()[:3] == ["run", "date", "run"]
    assert first.split()[:3] == ["2026-11-21", "finished01", "partial"] and "0.250" in first
    assert second.split()[:3] == ["2026-11-22", "running02", "running"]
    only = uflow("runs", "--scores", output, "--run-date", "2026-11-22")
    assert len(only.stdout.splitlines()) == 3 and "running02" in only.stdout


def _empty_rows():
    import pyarrow as pa

    from uflow_batch.pipelines.blocks import ROUTED_SCHEMA

    row = {name: None for name in ROUTED_SCHEMA.names} | {
        "schema_version": 1, "image_uri": "old.png", "category": "fabric", "run_date": "2020-01-01", "pkey": "old",
        "error": "no_model", "error_message": "old"}
    return pa.Table.from_pylist([row], schema=ROUTED_SCHEMA)


@pytest.mark.slow
def test_an_image_stamped_in_the_future_is_scored_and_counted_in_the_summary(model_store, tmp_path):
    """A clock-skewed image is neither skipped silently nor left for a run that never lists its folder again."""
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=1, include_bad_files=False)
    skewed = Path(archive.files[0].url)
    tomorrow = time.time() + 86400
    os.utime(skewed, (tomorrow, tomorrow))
    args = ["score", "--input", archive.root, "--models", model_store, "--output", str(tmp_path / "out"),
            "--run-date", "2026-11-22", "--batch-size", "4", "--actors", "1"]
    dry = uflow(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    header, _, *lines = dry.stdout.splitlines()
    assert "late (second pass)" in header
    assert [line.split()[-1] for line in lines if line.startswith(archive.files[0].category)] == ["1"]

    run = uflow(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{len(archive.files)} rows" in run.stdout
    assert "note: 1 images modified after the run started" in run.stdout and str(skewed) in run.stdout
    again = uflow(*args)
    assert again.returncode == 0 and "0 rows in 0 part files" in again.stdout and "note:" not in again.stdout


def test_a_job_spec_with_a_mistake_is_refused_before_anything_runs(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nschedule: '0 2 * * *'\ninputs: [a]\nmodels: b\noutput: c\nresourcez: {}\n")
    result = uflow("run-job", str(spec))
    assert result.returncode == 2 and "resourcez" in result.stderr


@pytest.mark.slow
def test_a_resource_request_the_cluster_can_never_satisfy_exits_2_instead_of_waiting(tmp_path):
    (tmp_path / "archive" / "fabric").mkdir(parents=True)
    (tmp_path / "archive" / "fabric" / "a.png").write_bytes(b"not looked at")
    result = uflow("score", "--input", str(tmp_path / "archive"), "--models", str(tmp_path / "models"),
                   "--output", str(tmp_path / "out"), "--cpus-per-actor", "512")
    assert result.returncode == 2 and "no node of the Ray cluster has that much" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing was written"


@pytest.mark.slow
def test_a_model_store_without_any_model_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "archive" / "fabric").mkdir(parents=True)
    (tmp_path / "archive" / "fabric" / "a.png").write_bytes(b"not looked at")
    result = uflow("score", "--input", str(tmp_path / "archive"), "--models", str(tmp_path / "modles"),
                   "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "holds no model; is --models right?" in result.stderr
    assert not (tmp_path / "out").exists()


# Records the RAY_* environment at the moment the CLI first imports Ray (Ray reads some settings only then).
_RAY_IMPORT_PROBE = """
import importlib.abc, json, os, runpy, sys

class RayImportProbe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" and not os.path.exists(probe_out):
            with open(probe_out, "w") as out:
                json.dump({k: v for k, v in os.environ.items() if k.startswith("RAY_")}, out)
        return None

probe_out = sys.argv.pop(1)
sys.meta_path.insert(0, RayImportProbe())
runpy.run_module("uflow_batch.cli", run_name="__main__")
"""


def ray_env_at_import(tmp_path: Path, *args: str) -> dict[str, str]:
    """The RAY_* variables Ray finds when ``uflow-batch ARGS`` imports it."""
    out = tmp_path / f"ray-env-{len(list(tmp_path.glob('ray-env-*')))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", _RAY_IMPORT_PROBE, str(out), *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def test_a_local_ray_instance_the_cli_starts_is_kept_on_loopback_and_a_remote_cluster_is_left_alone(tmp_path):
    """Token auth is off for local instances, so Ray must be in its loopback-only mode when the CLI loads it."""
    (tmp_path / "archive" / "fabric").mkdir(parents=True)
    (tmp_path / "archive" / "fabric" / "a.png").write_bytes(b"not looked at")
    score = ["score", "--input", str(tmp_path / "archive"), "--models", str(tmp_path / "models"),
             "--output", str(tmp_path / "out"), "--dry-run"]
    local = ray_env_at_import(tmp_path, *score)
    assert local.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "node address 127.0.0.1, every server on loopback"
    assert local.get("RAY_AUTH_MODE") == "disabled" and local.get("RAY_USAGE_STATS_ENABLED") == "0"
    remote = ray_env_at_import(tmp_path, *score, "--address", "10.0.0.7:6379")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in remote, "a driver joining a cluster must advertise a reachable address"


def test_the_version_is_printed_and_matches_the_package():
    from uflow_batch import __version__

    done = uflow("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"uflow-batch {__version__}"


def test_a_versioned_training_recipe_sets_the_options_and_the_command_line_still_wins(tmp_path):
    data = make_tiny_mvtec(tmp_path / "data", n_train=8, n_good=2, n_per_defect=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "fastflow", "input_size": [64, 64], "max_epochs": 3, "batch_size": 4}))
    model = tmp_path / "model"
    trained = uflow("train", "--config", str(recipe), "--data", str(data), "--category", "tile_exp1", "--out", str(model),
                    "--epochs", "1")
    assert trained.returncode == 0, trained.stderr[-2000:]
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["config"]["kind"] == "fastflow" and manifest["config"]["backbone"]["input_size"] == [64, 64]
    assert manifest["training"]["epochs"] == 1, "--epochs on the command line overrides the recipe's max_epochs"
    recipe.write_text("epochz: 3\n")
    typo = uflow("train", "--config", str(recipe), "--data", str(data), "--category", "tile_exp1", "--out", str(model))
    assert typo.returncode == 2 and "did you mean 'max_epochs'" in typo.stderr
