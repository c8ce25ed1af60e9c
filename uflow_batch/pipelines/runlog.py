"""The run log and the partition markers: what a dashboard reads to tell a night's state.

Part files alone cannot say whether a partition is complete: a night with
few rows looks the same as a night still running or one that died half way.
So each run leaves two kinds of small JSON objects beside the data, written
whole or not at all (:func:`uflow_batch.storage.write_bytes_atomic`):

- a **run record**, ``<output>/_runs/run_date=<d>/<started>-<run_id>.json``,
  written with status ``running`` when the run starts and replaced at its end
  by the final one: ``succeeded``, ``partial`` (it finished, but more of its
  rows are errors than ``max_error_fraction`` allows) or ``failed`` (it
  stopped on an exception; what it committed stays, a re-run completes it).
  A record left at ``running`` whose run is gone means a killed driver.
- a **completion marker** per partition, ``<output>/category=<c>/run_date=<d>/_SUCCESS.json``,
  written after the run's last part file there is committed (both passes
  done), so its presence means "every object this run listed for this
  partition has its row".

Names start with ``_`` so hive/Parquet readers skip them: pyarrow's dataset
discovery ignores ``_``- and ``.``-prefixed names, and the shipped DuckDB and
Polars globs (``**/*.parquet``) match no ``.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from .. import storage
from ..scores.layout import PART_PREFIX, PARTITION_COLUMNS, RUNS_DIR, partition_url, run_part_glob

log = logging.getLogger(__name__)

MARKER_NAME = "_SUCCESS.json"
RECORD_FORMAT = 1  # bumped when a key changes meaning; new keys may be added in any version
OK = "ok"  # the outcome of a row without an error (PartSink counts outcomes this way)

RUNNING, SUCCEEDED, PARTIAL, FAILED = "running", "succeeded", "partial", "failed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_url(output: str, run_date: str, run_id: str, started_at: datetime) -> str:
    """Where a run's record lies; the start time first, so a listing is in run order."""
    _, run_date_key = PARTITION_COLUMNS
    stamp = started_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return storage.join(output, RUNS_DIR, f"{run_date_key}={run_date}", f"{stamp}-{run_id}.json")


def marker_url(output: str, category: str, run_date: str) -> str:
    return storage.join(partition_url(output, category, run_date), MARKER_NAME)


def read_json(url: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(url))


def run_records(output: str, run_date: str) -> list[dict[str, Any]]:
    """The records of a run date's runs, oldest first (for dashboards, checks and tests)."""
    _, run_date_key = PARTITION_COLUMNS
    entries = storage.list_entries(storage.join(output, RUNS_DIR, f"{run_date_key}={run_date}"), missing_ok=True)
    return [read_json(e.url) for e in entries if e.is_file and e.name.endswith(".json")]


def run_dates(output: str) -> list[str]:
    """The run dates that have run records, oldest first."""
    _, run_date_key = PARTITION_COLUMNS
    prefix = f"{run_date_key}="
    entries = storage.list_entries(storage.join(output, RUNS_DIR), missing_ok=True)
    return sorted(e.name[len(prefix):] for e in entries if e.is_dir and e.name.startswith(prefix))


def error_counts(by_category: Mapping[str, Mapping[str, int]]) -> tuple[int, int]:
    """(rows, errored rows) over the outcome counts of each category."""
    rows = sum(sum(counts.values()) for counts in by_category.values())
    errors = sum(n for counts in by_category.values() for outcome, n in counts.items() if outcome != OK)
    return rows, errors


def error_fraction(by_category: Mapping[str, Mapping[str, int]]) -> float:
    """Errored rows / rows written; 0 when a run wrote none (nothing failed)."""
    rows, errors = error_counts(by_category)
    return errors / rows if rows else 0.0


class RunLog:
    """One run's record: :meth:`start` writes it as running, :meth:`finish` replaces it with the outcome."""

    def __init__(self, output: str, run_date: str, run_id: str, started_at: datetime, *,
                 inputs: Iterable[str], manifest: str | None, models: str, max_error_fraction: float | None) -> None:
        self.output, self.run_date, self.run_id = output, run_date, run_id
        self.url = record_url(output, run_date, run_id, started_at)
        self.base: dict[str, Any] = {
            "format": RECORD_FORMAT, "run_id": run_id, "run_date": run_date,
            "started_at": started_at.astimezone(timezone.utc).isoformat(timespec="seconds"),
            "inputs": list(inputs), "manifest": manifest, "models": storage.redact(models),
            "max_error_fraction": max_error_fraction,
            # The run's part files, by name: part-<unit>-<run id>-<digest>.parquet (layout.part_name).
            "part_glob": run_part_glob(run_date, run_id),
        }

    def start(self) -> None:
        self._write({**self.base, "status": RUNNING, "ended_at": None})

    def finish(self, status: str, *, by_category: Mapping[str, Mapping[str, int]], model_versions: Mapping[str, str | None],
               files: int, late: Mapping[str, int], markers: Iterable[str], reason: str | None = None) -> dict[str, Any]:
        """Replace the running record by the final one; returns it."""
        rows, errors = error_counts(by_category)
        kinds: Counter = Counter()
        for counts in by_category.values():
            kinds.update({outcome: n for outcome, n in counts.items() if outcome != OK})
        record = {
            **self.base, "status": status, "reason": reason, "ended_at": _now(),
            "rows": rows, "files": files, "errors": errors, "error_fraction": round(error_fraction(by_category), 6),
            "errors_by_kind": dict(sorted(kinds.items())),
            "counts": {category: dict(sorted(counts.items())) for category, counts in sorted(by_category.items())},
            "model_versions": dict(sorted(model_versions.items())),
            "late": dict(sorted(late.items())), "completed_partitions": sorted(markers),
        }
        self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        storage.write_bytes_atomic(self.url, (json.dumps(record, indent=2) + "\n").encode())
        log.info("run log %s: %s", storage.redact(self.url), record["status"])


def write_markers(output: str, run_date: str, run_id: str, by_category: Mapping[str, Mapping[str, int]],
                  model_versions: Mapping[str, str | None], files: Mapping[str, int], in_scope: Iterable[str]) -> list[str]:
    """Mark the partitions this finished run completed; returns their categories.

    A partition the run wrote rows to gets a marker with this run's counts. A
    partition in the run's scope that it had nothing left to write to keeps
    the marker it has; it gets one only when it has part files and none (the
    run that wrote them died before marking it), since this run listed it
    whole and found every object done.
    """
    marked = []
    for category in sorted(set(by_category) | set(in_scope)):
        counts = by_category.get(category) or {}
        if not counts:
            entries = storage.list_entries(partition_url(output, category, run_date), missing_ok=True)
            names = {e.name for e in entries}
            if MARKER_NAME in names or not any(n.startswith(PART_PREFIX) for n in names):
                continue
        rows, errors = error_counts({category: counts})
        marker = {
            "format": RECORD_FORMAT, "run_id": run_id, "category": category, "run_date": run_date, "completed_at": _now(),
            "rows": rows, "errors": errors, "counts": dict(sorted(counts.items())), "files": files.get(category, 0),
            "model_version": model_versions.get(category),
        }
        storage.write_bytes_atomic(marker_url(output, category, run_date), (json.dumps(marker, indent=2) + "\n").encode())
        marked.append(category)
    return marked
