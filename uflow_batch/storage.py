"""Object storage through fsspec: URLs, listings, retries, atomic writes and the model store.

This is the only module that touches fsspec. Every other module names places
by URL and calls the functions here, each of which retries what a retry may
fix (:func:`with_retries`), quotes no credential in its errors and answers in
URLs, never in a filesystem's bare paths. Code that must hand a filesystem to
pyarrow takes it from :func:`filesystem`.

Any fsspec URL works (``s3://``, ``gs://``, ``file://`` or a plain path);
credentials come from the provider's standard chain (environment, profile,
instance role) and are never written to logs or errors: :func:`redact` scrubs
them from any message that leaves this module.

The model store keeps ``<models>/<category>/<version>/`` directories and a
``<models>/<category>/CURRENT`` pointer written *after* the version is
complete, so a scorer that follows the pointer never sees a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config import is_safe_name

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
T = TypeVar("T")

CURRENT_POINTER = "CURRENT"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")


def redact(text: str) -> str:
    """Remove credential values and signed-URL signatures from a message."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?i)(signature|x-amz-credential|x-amz-security-token|awsaccesskeyid)=[^&\s'\"]+", r"\1=***", text)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it, for handing to pyarrow.

    Listings are not cached: other processes write the same prefixes (models,
    partitions), and a cached listing would hide their objects for the life of
    the process (fsspec's listing cache never expires by default).
    """
    fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for ``path`` on ``fs`` that :func:`filesystem` maps back to it."""
    return fs.unstrip_protocol(path) if not isinstance(fs, LocalFileSystem) else path


def path_below(url: str, root: str) -> str:
    """``url``'s path under ``root`` (``bottle/a.png``); its whole path when it is not under ``root``.

    Compared as the filesystem's paths, so ``data/in``, ``/abs/data/in`` and
    ``file:///abs/data/in`` name the same root.
    """
    root_path = filesystem(root)[1].rstrip("/")
    path = filesystem(url)[1]
    return path[len(root_path) + 1:] if path.startswith(root_path + "/") else path


# --- the transient-error policy ---------------------------------------------------------------

class TransientStorageError(RuntimeError):
    """Storage failed in a way a retry may fix; Ray Data retries the task on it."""

    MARKER = "transient storage error"

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(redact(f"{self.MARKER}: {what}: {cause}"))


_ANSWERS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT = (ConnectionError, TimeoutError, OSError)


def _scrubbed(exc: Exception) -> Exception | None:
    """``exc`` rebuilt with credentials removed from its message, or None when it carries none.

    Errors of signed URLs quote the URL, signature included. The type is kept
    where it can be rebuilt from a message, so callers' ``except`` clauses match.
    """
    message = str(exc)
    clean = redact(message)
    if clean == message:
        return None
    try:
        copy = type(exc)(clean)
        if str(copy) == clean:
            return copy
    except Exception:  # noqa: BLE001 - a type that cannot be built from a message
        pass
    return OSError(f"{type(exc).__name__}: {clean}")


def with_retries(operation: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Run ``operation``, retrying transient storage errors with exponential backoff.

    FileNotFoundError and PermissionError are answers, not glitches: they are
    raised at once. An error that leaves quotes no credentials (see :func:`redact`).
    """
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if isinstance(exc, _ANSWERS) or not isinstance(exc, _TRANSIENT) or attempt == attempts:
                scrubbed = _scrubbed(exc)
                if scrubbed is None:
                    raise
                raise scrubbed from None
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s), retry %d/%d in %.1fs", redact(what), redact(str(exc)), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def transient(what: str, answers: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Inside a Ray task: any failure of the block becomes :class:`TransientStorageError`, which Ray retries.

    By the time an error gets here :func:`with_retries` has given up, yet a
    new attempt of the whole task may still succeed, and committing an error
    row for a glitch would be wrong for good. ``answers`` pass unchanged: the
    errors the caller turns into a row or a message itself (a missing image).
    """
    try:
        yield
    except answers:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever failed, a retry of the task is the remedy
        raise TransientStorageError(what, exc) from exc


# --- objects ---------------------------------------------------------------------------------

def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), f"read {url}")


def read_parquet(url: str, columns: list[str]) -> pa.Table:
    """``columns`` of one Parquet file: only their column chunks are fetched, not the whole object."""
    import pyarrow.parquet as pq

    fs, path = filesystem(url)
    return with_retries(lambda: pq.read_table(path, columns=columns, filesystem=fs), f"read {url}")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Make ``url`` hold ``data`` entirely or not at all.

    An object-store PUT is already all-or-nothing; a local file is written
    beside its target and renamed over it.
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    with_retries(lambda: fs.pipe_file(path, data), f"write {url}")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.exists(path), f"stat {url}")


def remove(url: str) -> None:
    """Delete the object or the folder at ``url``, with everything below it."""
    fs, path = filesystem(url)
    with_retries(lambda: fs.rm(path, recursive=True), f"delete {url}")
    fs.invalidate_cache(path)


# --- listings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One thing a listing found, named by its URL, with what the store says of it.

    Each backend spells its metadata its own way (S3 ``LastModified`` and
    ``ETag``, GCS ``updated`` and ``md5Hash``, local ``mtime``); the
    properties read them all, so no caller needs to know which store it lists.
    """

    url: str
    info: dict[str, Any] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def is_dir(self) -> bool:
        return self.info["type"] == "directory"

    @property
    def is_file(self) -> bool:
        return self.info["type"] == "file"

    @property
    def size(self) -> int:
        return int(self.info.get("size") or 0)

    @property
    def etag(self) -> str | None:
        value = self.info.get("ETag") or self.info.get("etag") or self.info.get("md5Hash")
        return str(value).strip('"') if value else None

    @property
    def mtime(self) -> datetime | None:
        value = self.info.get("LastModified") or self.info.get("mtime") or self.info.get("updated")
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        return None


def list_entries(url: str, *, missing_ok: bool = False) -> list[Entry]:
    """What lies directly in the folder ``url`` (objects and folders), in name order.

    A folder that is not there raises FileNotFoundError; an object raises
    NotADirectoryError, where fsspec would list it as itself. With
    ``missing_ok`` both list as empty: for folders that may not exist yet.
    """
    fs, path = filesystem(url)
    try:
        infos = with_retries(lambda: fs.ls(path, detail=True), f"list {url}")
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    if len(infos) == 1 and infos[0]["type"] == "file" and infos[0]["name"].rstrip("/") == path.rstrip("/"):
        if missing_ok:
            return []
        raise NotADirectoryError(redact(f"{url} is an object, not a folder"))
    return [Entry(_full_url(fs, info["name"].rstrip("/")), info) for info in sorted(infos, key=lambda i: i["name"])]


def list_dirs(url: str) -> list[str]:
    """Names of the immediate sub-directories of ``url`` (sorted)."""
    fs, path = filesystem(url)
    entries = with_retries(lambda: fs.ls(path, detail=True), f"list {url}")
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def glob(pattern: str) -> list[str]:
    """URLs of the objects and folders matching ``pattern`` (a URL with ``*`` in it), sorted."""
    fs, path = filesystem(pattern)
    return sorted(_full_url(fs, p) for p in with_retries(lambda: fs.glob(path), f"glob {pattern}"))


def find(url: str) -> list[str]:
    """URLs of every object below ``url``, at any depth, sorted; none when nothing is there.

    Folders are left out, also where a store keeps listing a prefix as one
    after its last object is gone (SeaweedFS does).
    """
    fs, path = filesystem(url)
    found = with_retries(lambda: fs.find(path, detail=True), f"list {url}")
    return sorted(_full_url(fs, name) for name, info in found.items() if info.get("type") == "file")


# --- model store -----------------------------------------------------------------------------

def new_version() -> str:
    """Sortable, unique version names: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class ModelPointerError(ValueError):
    """A category's CURRENT pointer is not a pointer to one of the store's versions."""


class ModelIntegrityError(ValueError):
    """A model file's bytes are not the ones its version was published with."""


CHECKSUMS_FILE = "CHECKSUMS.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def private_cache_dir() -> Path:
    """This user's model cache: ~/.cache/uflow-batch/models (or under $XDG_CACHE_HOME), mode 0700.

    A cache in a shared, predictable place would let anyone plant a model
    there; one that another user can write is refused rather than trusted.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uflow-batch" / "models"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = base.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise PermissionError(f"model cache {base} is writable by others or not this user's; refusing to trust it")
    return base


def _holds_what_it_was_published_with(directory: Path) -> bool:
    """Every file of a cached version matches the checksums it was downloaded with (none recorded: not trusted)."""
    index = directory / CHECKSUMS_FILE
    if not index.is_file():
        return False
    checksums = json.loads(index.read_text())
    return all((directory / name).is_file() and _sha256((directory / name).read_bytes()) == digest
               for name, digest in checksums.items())


class ModelStore:
    """Versioned model directories per category under one URL."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def version_url(self, category: str, version: str) -> str:
        return join(self.url, category, version)

    def publish(self, local_dir: str | Path, category: str, version: str | None = None) -> str:
        """Upload a saved model, then move the category's pointer to it."""
        version = version or new_version()
        target = self.version_url(category, version)
        checksums = {}
        for file in sorted(Path(local_dir).iterdir()):
            if file.is_file() and file.name != CHECKSUMS_FILE:
                data = file.read_bytes()
                write_bytes_atomic(join(target, file.name), data)
                checksums[file.name] = _sha256(data)
        # Written after the files and before the pointer: a reader checks what it downloads against it.
        write_bytes_atomic(join(target, CHECKSUMS_FILE), json.dumps(checksums, indent=1, sort_keys=True).encode())
        pointer = {"version": version, "published_at": datetime.now(timezone.utc).isoformat()}
        write_bytes_atomic(join(self.url, category, CURRENT_POINTER), json.dumps(pointer).encode())
        log.info("published %s/%s", category, version)
        return version

    def categories(self) -> list[str]:
        if not exists(self.url):
            return []
        return [c for c in list_dirs(self.url) if exists(join(self.url, c, CURRENT_POINTER))]

    def current_version(self, category: str) -> str | None:
        """The version the category's pointer names; None without a pointer.

        A pointer that cannot be read as one (truncated, hand-edited, naming a
        path outside the store) raises :class:`ModelPointerError` naming its
        URL: that category cannot be scored, the others can.
        """
        url = join(self.url, category, CURRENT_POINTER)
        try:
            raw = read_bytes(url)
        except FileNotFoundError:
            return None
        try:
            version = json.loads(raw)["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelPointerError(f"{redact(url)} is not a model pointer ({type(exc).__name__}: {exc})") from None
        if not is_safe_name(version):  # one folder of the store, never a path
            raise ModelPointerError(f"{redact(url)} names version {version!r}, not a version folder of the store")
        return version

    def fetch(self, category: str, version: str | None = None, cache_dir: str | Path | None = None) -> tuple[Path, str]:
        """A local directory holding the model (downloaded once per version)."""
        version = version or self.current_version(category)
        if version is None:
            raise FileNotFoundError(f"no model for category {category!r} in {self.url}")
        source = self.version_url(category, version)
        if is_local(source):
            return Path(filesystem(source)[1]), version
        cache = Path(cache_dir or private_cache_dir()) / category / version
        if (cache / ".complete").exists() and _holds_what_it_was_published_with(cache):
            return cache, version
        staging = cache.with_name(f".{version}.{uuid.uuid4().hex[:6]}")
        staging.mkdir(parents=True)
        files = {entry.name: read_bytes(entry.url) for entry in list_entries(source) if entry.is_file}
        checksums = json.loads(files[CHECKSUMS_FILE]) if CHECKSUMS_FILE in files else None
        for name, data in files.items():
            if checksums is not None and name != CHECKSUMS_FILE and checksums.get(name) != _sha256(data):
                shutil.rmtree(staging, ignore_errors=True)
                raise ModelIntegrityError(f"{redact(join(source, name))} is not the file published as {category}/{version}")
            (staging / name).write_bytes(data)
        (staging / ".complete").touch()
        if cache.exists():  # a copy that no longer checks out: replaced, never trusted
            shutil.rmtree(cache, ignore_errors=True)
        try:
            staging.rename(cache)
        except OSError:  # another process finished the same download first
            shutil.rmtree(staging, ignore_errors=True)
        return cache, version
