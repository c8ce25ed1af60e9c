"""Storage behaves the same on a local directory and on a real S3 server, and never leaks credentials."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import s3fs

from uflow_batch import storage
from uflow_batch.devtools.s3server import S3Server
from uflow_batch.storage import ModelStore


@pytest.fixture(params=["local", "s3"])
def root_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty place to write: a local directory, or a fresh prefix on the session's S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket_url")


def other_client() -> s3fs.S3FileSystem:
    """A second, independent S3 client: what another process (a Ray worker, another job) would be."""
    return s3fs.S3FileSystem(skip_instance_cache=True)


def saved_model(directory: Path, tag: str, names: tuple[str, ...] = ("config.json", "weights.bin")) -> Path:
    directory.mkdir(parents=True)
    for name in names:
        (directory / name).write_bytes(f"{tag}:{name}".encode() * 200)
    return directory


# --- bytes, listings, urls ----------------------------------------------------------------------

def test_written_bytes_read_back_identically(root_url: str) -> None:
    url = storage.join(root_url, "a", "b.bin")
    storage.write_bytes_atomic(url, b"\x00payload\xff" * 1000)
    assert storage.read_bytes(url) == b"\x00payload\xff" * 1000


def test_a_second_write_replaces_the_whole_content(root_url: str) -> None:
    url = storage.join(root_url, "pointer")
    storage.write_bytes_atomic(url, b"a much longer first version")
    storage.write_bytes_atomic(url, b"short")
    assert storage.read_bytes(url) == b"short"


def test_a_local_atomic_write_leaves_only_the_target_behind(tmp_path: Path) -> None:
    storage.write_bytes_atomic(str(tmp_path / "out" / "file.json"), b"{}")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["file.json"]


def test_exists_tells_a_written_object_from_a_missing_one(root_url: str) -> None:
    storage.write_bytes_atomic(storage.join(root_url, "here"), b"1")
    assert storage.exists(storage.join(root_url, "here"))
    assert not storage.exists(storage.join(root_url, "not-here"))


def test_reading_a_missing_object_raises_file_not_found(root_url: str) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root_url, "missing.bin"))


def test_list_dirs_names_the_immediate_subdirectories_in_order(root_url: str) -> None:
    for name in ("beta/x.bin", "alpha/deeper/y.bin", "file.bin"):
        storage.write_bytes_atomic(storage.join(root_url, name), b"1")
    assert storage.list_dirs(root_url) == ["alpha", "beta"]


def test_join_makes_one_slash_between_parts() -> None:
    assert storage.join("s3://bucket/prefix/", "/models/", "cat") == "s3://bucket/prefix/models/cat"
    assert storage.join("/data", "a/", "b") == "/data/a/b"


def test_listings_see_objects_written_by_another_client_meanwhile(s3_bucket_url: str) -> None:
    storage.write_bytes_atomic(storage.join(s3_bucket_url, "first", "f.bin"), b"1")
    assert storage.list_dirs(s3_bucket_url) == ["first"]
    assert not storage.exists(storage.join(s3_bucket_url, "second", "g.bin"))

    other_client().pipe_file(storage.join(s3_bucket_url, "second", "g.bin"), b"2")

    assert storage.list_dirs(s3_bucket_url) == ["first", "second"]
    assert storage.exists(storage.join(s3_bucket_url, "second", "g.bin"))


# --- model store -----------------------------------------------------------------------------

def test_a_published_model_is_current_and_fetched_file_for_file(root_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(root_url, "models"))
    version = store.publish(saved_model(tmp_path / "model", "v1"), "bottle")

    assert store.current_version("bottle") == version
    assert store.categories() == ["bottle"]
    local, fetched_version = store.fetch("bottle", cache_dir=tmp_path / "cache")
    assert fetched_version == version
    assert {p.name: p.read_bytes() for p in local.iterdir() if not p.name.startswith(".") and p.name != storage.CHECKSUMS_FILE} == {
        p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()
    }


def test_an_empty_store_has_no_categories_and_no_current_version(root_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(root_url, "models"))
    assert store.categories() == []
    assert store.current_version("bottle") is None
    with pytest.raises(FileNotFoundError, match="bottle"):
        store.fetch("bottle", cache_dir=tmp_path / "cache")


def test_publishing_again_moves_current_and_fetch_follows_it(root_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(root_url, "models"))
    store.publish(saved_model(tmp_path / "m1", "one"), "bottle", version="v1")
    store.fetch("bottle", cache_dir=tmp_path / "cache")

    store.publish(saved_model(tmp_path / "m2", "two"), "bottle", version="v2")

    local, version = store.fetch("bottle", cache_dir=tmp_path / "cache")
    assert version == "v2" and store.current_version("bottle") == "v2"
    assert (local / "weights.bin").read_bytes() == (tmp_path / "m2" / "weights.bin").read_bytes()


def test_categories_list_only_categories_with_a_current_pointer(root_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(root_url, "models"))
    store.publish(saved_model(tmp_path / "m", "x"), "bottle")
    storage.write_bytes_atomic(storage.join(store.url, "half-uploaded", "v1", "weights.bin"), b"w")
    assert store.categories() == ["bottle"]


def test_a_category_published_by_another_process_becomes_visible(s3_bucket_url: str, tmp_path: Path) -> None:
    reader = ModelStore(storage.join(s3_bucket_url, "models"))
    ModelStore(reader.url).publish(saved_model(tmp_path / "m1", "a"), "bottle")
    assert reader.categories() == ["bottle"]

    other = other_client()  # another process: its writes do not pass through this process's clients
    other.pipe_file(storage.join(reader.url, "screw", "v1", "weights.bin"), b"w")
    other.pipe_file(storage.join(reader.url, "screw", "CURRENT"), b'{"version": "v1"}')

    assert reader.categories() == ["bottle", "screw"]
    assert reader.current_version("screw") == "v1"


def test_a_reader_following_current_always_finds_a_complete_version(s3_bucket_url: str, tmp_path: Path) -> None:
    names = ("a.bin", "b.bin", "c.bin", "d.bin")
    store = ModelStore(storage.join(s3_bucket_url, "models"))
    store.publish(saved_model(tmp_path / "m0", "0", names), "bottle", version="v0")
    published = threading.Event()
    failures: list[BaseException] = []

    def publish_more() -> None:
        try:
            for i in range(1, 5):
                store.publish(saved_model(tmp_path / f"m{i}", str(i), names), "bottle", version=f"v{i}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)
        finally:
            published.set()

    publisher = threading.Thread(target=publish_more)
    publisher.start()
    seen = []
    try:
        while True:
            finished = published.is_set()
            version = store.current_version("bottle")
            seen.append(version)
            for name in names:  # every file of the version CURRENT names is already there, whole
                data = storage.read_bytes(storage.join(store.version_url("bottle", version), name))
                assert data == f"{version[1:]}:{name}".encode() * 200
            if finished:
                break
    finally:
        publisher.join()
    assert not failures
    assert seen[-1] == "v4"


def test_a_failed_publish_leaves_current_on_the_previous_version(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path / "models"))
    store.publish(saved_model(tmp_path / "m1", "one"), "bottle", version="v1")
    (tmp_path / "models" / "bottle" / "v2" / "weights.bin").mkdir(parents=True)  # makes the 2nd file's upload fail

    with pytest.raises(OSError):
        store.publish(saved_model(tmp_path / "m2", "two"), "bottle", version="v2")

    assert store.current_version("bottle") == "v1"
    local, _ = store.fetch("bottle")
    assert (local / "weights.bin").read_bytes() == (tmp_path / "m1" / "weights.bin").read_bytes()


def test_fetch_downloads_a_remote_version_once_and_serves_it_from_the_cache(s3_bucket_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(s3_bucket_url, "models"))
    version = store.publish(saved_model(tmp_path / "model", "v"), "bottle")
    cache = tmp_path / "cache"
    first, _ = store.fetch("bottle", cache_dir=cache)

    other_client().rm(storage.join(store.version_url("bottle", version)), recursive=True)  # remote copy gone

    again, again_version = store.fetch("bottle", cache_dir=cache)
    assert (again, again_version) == (first, version)
    assert (again / "weights.bin").read_bytes() == (tmp_path / "model" / "weights.bin").read_bytes()
    assert [p.name for p in (cache / "bottle").iterdir()] == [version]  # no staging leftovers


def test_fetch_of_a_local_store_uses_the_store_directory_itself(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path / "models"))
    version = store.publish(saved_model(tmp_path / "model", "v"), "bottle")
    local, _ = store.fetch("bottle", cache_dir=tmp_path / "cache")
    assert local == tmp_path / "models" / "bottle" / version
    assert not (tmp_path / "cache").exists()


# --- retries ---------------------------------------------------------------------------------

class FlakyOperation:
    """Fails with ``error`` the first ``failures`` calls, then returns "done"."""

    def __init__(self, error: Exception, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_with_retries_retries_a_transient_error_then_succeeds() -> None:
    operation = FlakyOperation(ConnectionResetError("connection reset by peer"), failures=2)
    assert storage.with_retries(operation, "read x", base_delay=0.01) == "done"
    assert operation.calls == 3


def test_with_retries_gives_up_after_the_last_attempt() -> None:
    operation = FlakyOperation(TimeoutError("timed out"), failures=10)
    with pytest.raises(TimeoutError):
        storage.with_retries(operation, "read x", attempts=3, base_delay=0.01)
    assert operation.calls == 3


@pytest.mark.parametrize("answer", [FileNotFoundError("s3://b/missing"), PermissionError("Forbidden")])
def test_with_retries_raises_not_found_and_forbidden_at_once(answer: Exception) -> None:
    operation = FlakyOperation(answer, failures=10)
    with pytest.raises(type(answer)):
        storage.with_retries(operation, "read x", base_delay=0.01)
    assert operation.calls == 1


# --- credentials never leak ------------------------------------------------------------------

def test_redact_removes_the_configured_credentials_from_a_message(s3_env: S3Server) -> None:
    message = f"failed with key {s3_env.access_key} and secret {s3_env.secret_key}"
    cleaned = storage.redact(message)
    assert s3_env.secret_key not in cleaned and s3_env.access_key not in cleaned


def test_redact_masks_the_signature_of_signed_urls() -> None:
    v2 = "http://h/b/k?AWSAccessKeyId=AKIDEXAMPLE&Signature=abc%2Bdef&Expires=1"
    v4 = "https://h/b/k?X-Amz-Credential=AKIDEXAMPLE%2F2026&X-Amz-Signature=0123abcd&X-Amz-Security-Token=tok"
    for url in (v2, v4):
        cleaned = storage.redact(f"GET '{url}' failed")
        for secret in ("AKIDEXAMPLE", "abc%2Bdef", "0123abcd", "tok"):
            assert secret not in cleaned


def test_a_failed_read_names_the_object_but_no_credentials(s3_env: S3Server, s3_bucket_url: str) -> None:
    with pytest.raises(FileNotFoundError) as failure:
        storage.read_bytes(storage.join(s3_bucket_url, "missing.bin"))
    assert "missing.bin" in str(failure.value)
    assert s3_env.secret_key not in str(failure.value)
    assert s3_env.access_key not in str(failure.value)


def test_a_read_with_a_wrong_secret_is_forbidden_without_quoting_either_secret(
    s3_env: S3Server, s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.join(s3_bucket_url, "object")
    storage.write_bytes_atomic(url, b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    s3fs.S3FileSystem.clear_instance_cache()  # clients are cached per process; make one read the new env
    try:
        with pytest.raises(PermissionError) as failure:
            storage.read_bytes(url)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "wrong-secret-0123456789" not in str(failure.value)
    assert s3_env.secret_key not in str(failure.value)


def test_a_failed_read_of_a_signed_url_hides_the_signature(s3_env: S3Server, s3_bucket_url: str) -> None:
    signed = other_client().url(storage.join(s3_bucket_url, "missing.bin"), expires=60)
    signature = signed.split("Signature=", 1)[1].split("&", 1)[0]

    with pytest.raises(FileNotFoundError) as failure:
        storage.read_bytes(signed)

    assert "missing.bin" in str(failure.value)
    assert signature not in str(failure.value)
    assert s3_env.access_key not in str(failure.value)


@pytest.mark.parametrize("pointer, reason", [
    (b"{not json", "not a model pointer"),
    (b'{"published_at": "2026-12-01"}', "not a model pointer"),
    (b'{"version": "../../elsewhere/models/x"}', "not a version folder"),
    (b'{"version": 7}', "not a version folder"),
])
def test_a_corrupt_current_pointer_is_an_error_that_names_its_file(root_url: str, pointer: bytes, reason: str) -> None:
    store = ModelStore(storage.join(root_url, "models"))
    storage.write_bytes_atomic(storage.join(store.url, "bottle", storage.CURRENT_POINTER), pointer)
    with pytest.raises(storage.ModelPointerError, match=reason) as raised:
        store.current_version("bottle")
    assert storage.CURRENT_POINTER in str(raised.value) and "bottle" in str(raised.value)


def test_a_cached_model_whose_files_changed_is_downloaded_again(s3_bucket_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(s3_bucket_url, "models"))
    store.publish(saved_model(tmp_path / "model", "v"), "bottle")
    cache = tmp_path / "cache"
    local, _ = store.fetch("bottle", cache_dir=cache)
    (local / "weights.bin").write_bytes(b"planted")  # what a planted or damaged cache holds
    again, _ = store.fetch("bottle", cache_dir=cache)
    assert (again / "weights.bin").read_bytes() == (tmp_path / "model" / "weights.bin").read_bytes()


def test_a_download_that_is_not_what_was_published_is_refused(s3_bucket_url: str, tmp_path: Path) -> None:
    store = ModelStore(storage.join(s3_bucket_url, "models"))
    version = store.publish(saved_model(tmp_path / "model", "v"), "bottle")
    other_client().pipe_file(storage.join(store.version_url("bottle", version), "weights.bin"), b"swapped")
    with pytest.raises(storage.ModelIntegrityError, match="weights.bin is not the file published"):
        store.fetch("bottle", cache_dir=tmp_path / "cache")


def test_the_default_model_cache_is_private_to_the_user(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = storage.private_cache_dir()
    assert cache.is_relative_to(tmp_path / "xdg") and cache.stat().st_mode & 0o077 == 0
    cache.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        storage.private_cache_dir()
