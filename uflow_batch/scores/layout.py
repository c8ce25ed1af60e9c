"""Where the scores dataset's files lie and what they are called.

``<output>/category=<c>/run_date=<d>/part-<unit key>-<run id>-<digest>.parquet``,
with the run log beside it under ``<output>/_runs/run_date=<d>/``. Readers
(hive partitioning in pyarrow, DuckDB and Polars), retention and the exactly-once
commit all rely on these names, and a part file's name is how a re-run tells
which run and unit wrote it without opening it; so the names are built and
parsed here only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .. import storage

# Hive partition keys, outermost first; the values live in directory names, not inside the files.
# ``run_date`` stays last: retention deletes whole nights, and the run log is kept per night.
PARTITION_COLUMNS = ("category", "run_date")
# Beside the partitions, not data: the run log, <output>/_runs/run_date=<d>/ (pipelines/runlog.py).
RUNS_DIR = "_runs"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


def hive_values(names: Iterable[str], key: str) -> dict[str, str]:
    """``{value: directory name}`` for the hive directories named ``key=value`` among ``names``."""
    prefix = f"{key}="
    return {name[len(prefix):]: name for name in names if name.startswith(prefix)}


def partition_url(output: str, category: str, run_date: str) -> str:
    category_key, run_date_key = PARTITION_COLUMNS
    return storage.join(output, f"{category_key}={category}", f"{run_date_key}={run_date}")


def part_name(pkey: str, run_id: str, uris: Iterable[str], model_versions: Iterable[str | None]) -> str:
    """Content-derived name: the same rows of the same run always land in the same file."""
    digest = hashlib.sha1()
    for uri, version in sorted(zip(uris, model_versions), key=lambda pair: pair[0]):
        digest.update(f"{uri}\0{version or ''}\n".encode())
    return f"{PART_PREFIX}{pkey}-{run_id}-{digest.hexdigest()[:20]}{PART_SUFFIX}"


def run_of(part_url: str) -> str:
    """The run id in a part file's name (``part-<pkey>-<run>-<digest>.parquet``)."""
    stem = part_url.rsplit("/", 1)[-1].removeprefix(PART_PREFIX).removesuffix(PART_SUFFIX)
    return stem.split("-", 1)[1].rsplit("-", 1)[0]


def run_part_glob(run_date: str, run_id: str) -> str:
    """The glob, relative to the output, that matches exactly the part files one run wrote (kept in its run record)."""
    category_key, run_date_key = PARTITION_COLUMNS
    return f"{category_key}=*/{run_date_key}={run_date}/{PART_PREFIX}*-{run_id}-*{PART_SUFFIX}"


def unit_parts(output: str, run_date: str, pkey: str, categories: Iterable[str] | None) -> list[str]:
    """Part files a unit has committed for this run date.

    ``categories`` narrows the search to known partitions (a path unit has
    one category); None searches every category partition (a manifest unit).
    """
    if categories is None:
        return storage.glob(storage.join(partition_url(output, "*", run_date), f"{PART_PREFIX}{pkey}-*{PART_SUFFIX}"))
    found = []
    for category in categories:
        entries = storage.list_entries(partition_url(output, category, run_date), missing_ok=True)
        found += [e.url for e in entries if e.name.startswith(f"{PART_PREFIX}{pkey}-")]
    return sorted(found)
