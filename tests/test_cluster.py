"""A real two-node Ray cluster (``ray start`` head + worker) runs train-all and score.

Both nodes live on this machine, inside the test run's loopback-only network
namespace; the commands under test connect with ``--address`` exactly as they
would to a production cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from uflow_batch.checkpoint import read_manifest
from uflow_batch.devtools.synthetic import write_scoring_archive
from uflow_batch.scores.dataset import open_dataset
from uflow_batch.storage import ModelStore

from conftest import TINY_SYNTHETIC
from processes import stop_processes_mentioning

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU) and one worker node (1 CPU): two tasks need both nodes."""
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    common = ["--num-cpus=1", "--object-store-memory=150000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", *common], env=env, check=True, capture_output=True)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                       env=env, check=True, capture_output=True)
        yield f"127.0.0.1:{port}", env
    finally:
        # Not `ray stop`: it would stop every Ray instance on the machine, not just this cluster.
        stop_processes_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def uflow(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uflow_batch.cli", *args], env=env, capture_output=True, text=True, timeout=900)


def test_train_all_trains_categories_on_both_nodes_and_reports_failures(cluster, synthetic_root, tmp_path):
    address, env = cluster
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "broken" / "train" / "good").mkdir(parents=True)
    (data / "broken" / "train" / "good" / "a.png").write_bytes(b"not an image")
    (data / "broken" / "train" / "good" / "b.png").write_bytes(b"")
    models = tmp_path / "models"
    result = uflow(env, "train-all", "--data", str(data), "--models", str(models), "--address", address,
                   "--input-size", "64,64", "--epochs", "2", "--batch-size", "4", "--category-kinds", "fabric=fastflow")
    assert result.returncode == 1, "a failed category makes the command fail"
    table = [line.split() for line in result.stdout.splitlines() if line.split() and line.split()[0] in ("broken", *TINY_SYNTHETIC.categories)]
    status = {row[0]: row[1] for row in table}
    assert status == {"broken": "failed", "brushed_metal": "ok", "fabric": "ok"}, result.stdout
    nodes = {row[-1] for row in table if row[1] == "ok"}
    assert len(nodes) == 2, f"categories trained concurrently on both nodes: {result.stdout}"
    assert "broken failed" in result.stderr and "train/good/a.png" in result.stderr
    store = ModelStore(str(models))
    assert sorted(store.categories()) == ["brushed_metal", "fabric"]
    kinds = {c: read_manifest(store.fetch(c)[0]).config.kind for c in store.categories()}
    assert kinds == {"brushed_metal": "uflow", "fabric": "fastflow"}, "one night, a kind per product line"


def test_score_streams_an_archive_through_the_cluster(cluster, model_store, tmp_path):
    address, env = cluster
    archive = write_scoring_archive(str(tmp_path / "archive"), TINY_SYNTHETIC, n_per_category=8)
    output = tmp_path / "scores"
    args = ["score", "--input", archive.root, "--models", model_store, "--output", str(output),
            "--run-date", "2026-11-22", "--address", address, "--batch-size", "4"]
    result = uflow(env, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = open_dataset(str(output)).to_table(columns=["image_uri"]).column("image_uri").to_pylist()
    assert Counter(rows) == Counter(f.url for f in archive.files)
    assert f"{len(archive.files)} rows" in result.stdout
    again = uflow(env, *args)
    assert again.returncode == 0 and "0 rows in 0 part files" in again.stdout
