"""Shared fixtures.

Object storage is a real S3-compatible server (SeaweedFS), one per test session:
starting one costs about two seconds, and tests keep apart by writing under a
fresh prefix each (``s3_bucket_url``), never by emptying the bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from uflow_batch.devtools.s3server import S3Server


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
