"""Object storage through fsspec: URLs, retries, atomic writes and the model store.

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
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config import is_safe_name

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
    """The fsspec filesystem for ``url`` and the path inside it.

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


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for ``path`` on ``fs`` that :func:`filesystem` maps back to it."""
    return fs.unstrip_protocol(path) if not isinstance(fs, LocalFileSystem) else path


class TransientStorageError(RuntimeError):
    """Storage failed in a way a retry may fix; Ray Data retries the task on it."""

    MARKER = "transient storage error"

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(f"{self.MARKER}: {what}: {redact(str(cause))}")



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
            answer = isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
            if answer or not isinstance(exc, _TRANSIENT) or attempt == attempts:
                scrubbed = _scrubbed(exc)
                if scrubbed is None:
                    raise
                raise scrubbed from None
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s), retry %d/%d in %.1fs", redact(what), redact(str(exc)), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), f"read {url}")


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


def list_dirs(url: str) -> list[str]:
    """Names of the immediate sub-directories of ``url`` (sorted)."""
    fs, path = filesystem(url)
    entries = with_retries(lambda: fs.ls(path, detail=True), f"list {url}")
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


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
        fs, path = filesystem(source)
        files = {
            info["name"].rsplit("/", 1)[-1]: read_bytes(full_url(fs, info["name"]))
            for info in with_retries(lambda: fs.ls(path, detail=True), f"list {source}") if info["type"] == "file"
        }
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
