"""Storage behaves the same on a local directory and on a real S3 server, and never leaks credentials."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
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


def test_a_listing_names_objects_and_folders_by_url_in_name_order(root_url: str) -> None:
    for name in ("b.bin", "a/x.bin", "c/deeper/y.bin"):
        storage.write_bytes_atomic(storage.join(root_url, name), b"1")

    entries = storage.list_entries(root_url)

    assert [e.url for e in entries] == [storage.join(root_url, n) for n in ("a", "b.bin", "c")]
    assert [(e.name, e.is_dir, e.is_file) for e in entries] == [
        ("a", True, False), ("b.bin", False, True), ("c", True, False)]
    assert storage.read_bytes(entries[1].url) == b"1", "a listed URL reads back"


def test_an_object_entry_says_its_size_and_when_it_was_modified(root_url: str) -> None:
    before = datetime.now(timezone.utc) - timedelta(minutes=1)
    storage.write_bytes_atomic(storage.join(root_url, "f.bin"), b"12345")
    (entry,) = storage.list_entries(root_url)
    assert entry.size == 5
    assert before < entry.mtime < datetime.now(timezone.utc) + timedelta(minutes=1)


def test_an_object_on_s3_has_an_etag(s3_bucket_url: str) -> None:
    storage.write_bytes_atomic(storage.join(s3_bucket_url, "f.bin"), b"12345")
    (entry,) = storage.list_entries(s3_bucket_url)
    assert entry.etag and '"' not in entry.etag


def test_listing_a_missing_folder_is_file_not_found_unless_missing_is_ok(root_url: str) -> None:
    with pytest.raises(FileNotFoundError):
        storage.list_entries(storage.join(root_url, "nowhere"))
    assert storage.list_entries(storage.join(root_url, "nowhere"), missing_ok=True) == []


def test_listing_an_object_is_not_a_directory_unless_missing_is_ok(root_url: str) -> None:
    url = storage.join(root_url, "f.bin")
    storage.write_bytes_atomic(url, b"1")
    with pytest.raises(NotADirectoryError, match="f.bin"):
        storage.list_entries(url)
    assert storage.list_entries(url, missing_ok=True) == []


def test_glob_returns_the_urls_of_the_matching_objects_in_every_folder(root_url: str) -> None:
    for name in ("x=1/part-a.parquet", "x=2/part-b.parquet", "x=2/other.parquet", "y=1/part-c.parquet"):
        storage.write_bytes_atomic(storage.join(root_url, name), name.encode())

    found = storage.glob(storage.join(root_url, "x=*", "part-*.parquet"))

    assert found == [storage.join(root_url, n) for n in ("x=1/part-a.parquet", "x=2/part-b.parquet")]
    assert [storage.read_bytes(url) for url in found] == [b"x=1/part-a.parquet", b"x=2/part-b.parquet"]


def test_find_returns_every_object_below_a_folder_at_any_depth(root_url: str) -> None:
    for name in ("keep/top.bin", "keep/a/b/deep.bin", "elsewhere/no.bin"):
        storage.write_bytes_atomic(storage.join(root_url, name), b"1")
    assert storage.find(storage.join(root_url, "keep")) == [
        storage.join(root_url, "keep", n) for n in ("a/b/deep.bin", "top.bin")]
    assert storage.find(storage.join(root_url, "nowhere")) == []


def test_remove_deletes_a_folder_with_everything_below_it_and_nothing_else(root_url: str) -> None:
    for name in ("gone/a.bin", "gone/deeper/b.bin", "kept/c.bin"):
        storage.write_bytes_atomic(storage.join(root_url, name), b"1")

    storage.remove(storage.join(root_url, "gone"))

    assert storage.find(storage.join(root_url, "gone")) == []
    assert not storage.exists(storage.join(root_url, "gone", "a.bin"))
    assert storage.find(root_url) == [storage.join(root_url, "kept", "c.bin")]


def test_read_parquet_reads_only_the_columns_asked_for(root_url: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image_uri": ["a", "b"], "model_version": ["v1", "v2"], "mask_png": [b"m", b"n"]}), buffer)
    url = storage.join(root_url, "part.parquet")
    storage.write_bytes_atomic(url, buffer.getvalue())

    table = storage.read_parquet(url, columns=["image_uri", "model_version"])

    assert table.to_pydict() == {"image_uri": ["a", "b"], "model_version": ["v1", "v2"]}


def test_path_below_compares_paths_not_their_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    image = str(tmp_path / "data" / "in" / "bottle" / "a.png")
    assert storage.path_below(image, "data/in") == "bottle/a.png"
    assert storage.path_below(image, f"file://{tmp_path}/data/in/") == "bottle/a.png"
    assert storage.path_below("s3://bucket/in/bottle/a.png", "s3://bucket/in") == "bottle/a.png"
    assert storage.path_below("s3://bucket/elsewhere/a.png", "s3://bucket/in") == "bucket/elsewhere/a.png"


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


class Glitches:
    """Makes a method of the local filesystem fail its next calls, as a storage glitch would.

    Backoff delays are recorded in ``sleeps`` rather than slept.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch, self.sleeps = monkeypatch, []
        monkeypatch.setattr(storage.time, "sleep", self.sleeps.append)

    def arm(self, url: str, method: str, failures: int, error: Exception) -> None:
        fs, _ = storage.filesystem(url)
        original, left = getattr(fs, method), [failures]

        def glitchy(*args: Any, **kwargs: Any) -> Any:
            if left[0]:
                left[0] -= 1
                raise error
            return original(*args, **kwargs)
        self.monkeypatch.setattr(fs, method, glitchy)


def basenames(urls: list[str]) -> list[str]:
    return [url.rsplit("/", 1)[-1] for url in urls]


# operation: (the fsspec method it calls, the operation on a folder holding f.bin and sub/g.bin, its answer)
OPERATIONS: dict[str, tuple[str, Callable[[str], Any], Any]] = {
    "list_entries": ("ls", lambda root: [e.name for e in storage.list_entries(root)], ["f.bin", "sub"]),
    "list_dirs": ("ls", storage.list_dirs, ["sub"]),
    "glob": ("glob", lambda root: basenames(storage.glob(storage.join(root, "*", "*.bin"))), ["g.bin"]),
    "find": ("find", lambda root: basenames(storage.find(root)), ["f.bin", "g.bin"]),
    "exists": ("exists", lambda root: storage.exists(storage.join(root, "f.bin")), True),
    "read_bytes": ("cat_file", lambda root: storage.read_bytes(storage.join(root, "f.bin")), b"payload"),
    "remove": ("rm", lambda root: storage.remove(storage.join(root, "sub")), None),
}


@pytest.fixture
def folder(tmp_path: Path) -> str:
    root = str(tmp_path / "root")
    storage.write_bytes_atomic(storage.join(root, "f.bin"), b"payload")
    storage.write_bytes_atomic(storage.join(root, "sub", "g.bin"), b"payload")
    return root


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_operation_retries_a_glitch_then_answers_as_if_none_happened(
    folder: str, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    method, run, answer = OPERATIONS[operation]
    glitches = Glitches(monkeypatch)
    glitches.arm(folder, method, 2, ConnectionResetError("connection reset by peer"))

    assert run(folder) == answer
    assert glitches.sleeps == [0.5, 1.0], "two retries, with backoff"


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_an_operation_that_keeps_failing_gives_up_without_quoting_a_credential(
    folder: str, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-0123456789")
    method, run, _ = OPERATIONS[operation]
    glitches = Glitches(monkeypatch)
    glitches.arm(folder, method, 100, TimeoutError("timed out sending secret-0123456789"))

    with pytest.raises(TimeoutError) as failure:
        run(folder)

    assert "secret-0123456789" not in str(failure.value)
    assert len(glitches.sleeps) == 4, "five attempts, then the error"


def test_a_failure_inside_a_transient_block_becomes_a_retryable_error_quoting_no_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-0123456789")
    cause = OSError("denied: secret-0123456789")
    with pytest.raises(storage.TransientStorageError) as raised:
        with storage.transient("read https://h/b/k?X-Amz-Signature=0123abcd"):
            raise cause
    message = str(raised.value)
    assert message.startswith(storage.TransientStorageError.MARKER), "Ray retries tasks failing with the marker"
    assert "https://h/b/k" in message and "0123abcd" not in message and "secret-0123456789" not in message
    assert raised.value.__cause__ is cause


def test_the_answers_a_caller_handles_pass_a_transient_block_unchanged() -> None:
    with pytest.raises(FileNotFoundError, match="s3://b/missing.png"):
        with storage.transient("read s3://b/missing.png", answers=(FileNotFoundError, IsADirectoryError)):
            raise FileNotFoundError("s3://b/missing.png")



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
