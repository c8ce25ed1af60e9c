"""Shared fixtures.

Object storage is a real S3-compatible server (SeaweedFS), one per test session:
starting one costs about two seconds, and tests keep apart by writing under a
fresh prefix each (``s3_bucket_url``), never by emptying the bucket.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from uflow_batch.config import BackboneConfig, DetectorConfig, TrainConfig
from uflow_batch.devtools.s3server import S3Server
from uflow_batch.devtools.synthetic import SyntheticConfig, generate_dataset
from uflow_batch.pipelines.cluster import ray_session
from uflow_batch.storage import ModelStore
from uflow_batch.train import train_category


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's S3 server (stopped at the end of the session, its process group included)."""
    with S3Server(tmp_path_factory.mktemp("s3server")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The server, with its AWS_* variables set in ``os.environ`` for this test only, so plain
    ``s3://`` URLs reach it from s3fs, pyarrow and Ray Data alike."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    yield s3_server


@pytest.fixture
def s3_bucket_url(s3_env: S3Server) -> str:
    """``s3://<bucket>/<unique prefix>``: a place of this test's own on the server (env applied)."""
    return s3_env.url(f"t-{uuid.uuid4().hex[:12]}")


# --- trained models for the pipeline tests ----------------------------------------------------

# Small enough to train in seconds on two cores, big enough to be a real model.
TINY_DETECTOR = DetectorConfig(backbone=BackboneConfig(input_size=(64, 64)))
TINY_TRAINING = TrainConfig(max_epochs=2, batch_size=4, warmup_epochs=0, patience=2)
TINY_SYNTHETIC = SyntheticConfig(categories=("brushed_metal", "fabric"), image_size=96, n_train=6,
                                 n_test_good=2, n_test_per_defect=1, seed=3)

for _name, _value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="module")
def ray_local(s3_server: S3Server) -> Iterator[None]:
    """A local Ray instance (per test module) whose workers reach the session's S3 server."""
    with s3_server.apply_env(), ray_session(num_cpus=4, object_store_memory=300 * 2**20):
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated dataset in MVTec layout (two categories)."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_dataset(str(root), TINY_SYNTHETIC)
    return root


@pytest.fixture(scope="session")
def model_store(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local model store holding a real (tiny) trained model per synthetic category."""
    store_url = str(tmp_path_factory.mktemp("models"))
    store = ModelStore(store_url)
    for category in TINY_SYNTHETIC.categories:
        scratch = tmp_path_factory.mktemp(f"train-{category}")
        train_category(str(synthetic_root), category, scratch, TINY_DETECTOR, TINY_TRAINING)
        store.publish(scratch, category)
    return store_url
