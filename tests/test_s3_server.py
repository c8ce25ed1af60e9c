"""The S3 test server: a real SeaweedFS that s3fs and pyarrow both talk to, and that cleans up after itself."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import s3fs

from uflow_batch.devtools.s3server import S3Server, S3ServerError


def fresh_s3fs() -> s3fs.S3FileSystem:
    """A client configured from the environment now (fsspec would hand back a cached one)."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def processes_using(data_dir: Path) -> list[int]:
    """Pids whose command line names ``data_dir`` as a SeaweedFS data directory."""
    needle = f"-dir={data_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in argv:
                pids.append(int(entry.name))
    return pids


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_object_written_with_s3fs_is_read_back_by_s3fs_and_pyarrow(s3_bucket_url: str) -> None:
    url = f"{s3_bucket_url}/dir/hello.bin"
    payload = os.urandom(100_000)
    fresh_s3fs().pipe_file(url, payload)

    assert fresh_s3fs().cat_file(url) == payload
    arrow_fs, path = pafs.FileSystem.from_uri(url)
    assert isinstance(arrow_fs, pafs.S3FileSystem)
    with arrow_fs.open_input_stream(path) as stream:
        assert stream.read() == payload
    listing = arrow_fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0]))
    assert [info.base_name for info in listing] == ["hello.bin"]


def test_the_server_refuses_requests_without_its_credentials(s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_s3fs().pipe_file(f"{s3_bucket_url}/private", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError):
        fresh_s3fs().cat_file(f"{s3_bucket_url}/private")


def test_restart_keeps_objects_port_and_credentials_and_ends_the_old_process(s3_server: S3Server, s3_bucket_url: str) -> None:
    fresh_s3fs().pipe_file(f"{s3_bucket_url}/survivor", b"still here")
    old_pid, old_env = s3_server.pid, s3_server.env
    assert old_pid is not None

    s3_server.restart()

    assert s3_server.env == old_env
    assert s3_server.pid != old_pid and not is_alive(old_pid)
    assert fresh_s3fs().cat_file(f"{s3_bucket_url}/survivor") == b"still here"


def test_apply_env_sets_the_client_variables_and_restores_the_previous_ones(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    with s3_server.apply_env():
        assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
        assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key
        assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
        assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"

    assert os.environ["AWS_ACCESS_KEY_ID"] == "someone-else"
    assert "AWS_ENDPOINT_URL" not in os.environ


def test_repr_never_shows_the_secret(s3_server: S3Server) -> None:
    assert s3_server.secret_key not in repr(s3_server)


def test_a_bucket_name_s3_would_reject_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bucket"):
        S3Server(tmp_path, bucket="No_Such")


def test_a_server_that_exits_while_starting_raises_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "weed"
    broken.write_text("#!/bin/sh\necho 'bind: address already in use' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("UFLOW_WEED_BINARY", str(broken))
    server = S3Server(tmp_path / "data", start_timeout=20)

    with pytest.raises(S3ServerError, match="status 3") as failure:
        server.start()

    assert "address already in use" in str(failure.value)
    assert not server.is_running()


def test_the_command_line_server_publishes_its_env_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir, env_file, pidfile = tmp_path / "s3", tmp_path / "s3.env", tmp_path / "s3.pid"
    command = [sys.executable, "-m", "uflow_batch.devtools.s3server", "--dir", str(data_dir),
               "--bucket", "demo-bucket", "--env-file", str(env_file), "--pidfile", str(pidfile)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the env file never appeared"
            time.sleep(0.1)
        assert int(pidfile.read_text()) == server.pid
        exports = dict(shlex.split(line)[1].split("=", 1) for line in env_file.read_text().splitlines())
        client = s3fs.S3FileSystem(key=exports["AWS_ACCESS_KEY_ID"], secret=exports["AWS_SECRET_ACCESS_KEY"],
                                   endpoint_url=exports["AWS_ENDPOINT_URL"], skip_instance_cache=True)
        client.pipe_file("demo-bucket/x", b"demo")
        assert client.cat_file("demo-bucket/x") == b"demo"
        assert processes_using(data_dir.resolve())

        server.send_signal(signal.SIGTERM)
        stdout, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert server.returncode == 0
    assert stdout == "".join(f"export {name}={shlex.quote(value)}\n" for name, value in exports.items())
    assert not env_file.exists() and not pidfile.exists()
    assert processes_using(data_dir.resolve()) == []
