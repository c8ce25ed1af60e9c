"""Retention of the scores dataset: which nights are past keeping, and deleting them.

A night is the unit of retention: its partitions in every category go, and its
run log with them, since those records describe the deleted rows. What the
walk touches is decided by the layout's names alone, so nothing else under the
output (checkpoints, notes, a folder that is not a date) is ever deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date, timedelta

from .. import storage
from ..config import ConfigError, is_int, require, validate_run_date
from .layout import PARTITION_COLUMNS, RUNS_DIR, hive_values

log = logging.getLogger(__name__)


def expired_run_dates(existing: list[str], today: date, retention_days: int | None) -> list[str]:
    """The run dates among ``existing`` that are more than ``retention_days`` days before ``today``.

    A partition exactly ``retention_days`` old is kept. Values that are not
    valid ``YYYY-MM-DD`` dates are never returned: retention deletes only what
    it understands. ``retention_days=None`` keeps everything.
    """
    if retention_days is None:
        return []
    require(is_int(retention_days) and retention_days >= 1,
             f"retention_days must be an integer >= 1 or None, got {retention_days!r}")
    cutoff = today - timedelta(days=retention_days)
    expired = set()
    for value in existing:
        try:
            day = date.fromisoformat(validate_run_date(value))
        except ConfigError:
            log.warning("retention: ignoring partition run_date=%s (not a YYYY-MM-DD date)", value)
            continue
        if day < cutoff:
            expired.add(value)
    return sorted(expired)


def _partition_dirs(url: str, names: list[str], keys: Sequence[str]) -> list[str]:
    """The directories ``<url>/<key>=*/...`` one level per key, ``names`` being ``url``'s own subdirectories."""
    matched = [storage.join(url, name) for name in sorted(hive_values(names, keys[0]).values())]
    if len(keys) == 1:
        return matched
    return [found for parent in matched for found in _partition_dirs(parent, storage.list_dirs(parent), keys[1:])]


def apply_retention(output_url: str, today: date, retention_days: int | None, *, dry_run: bool = False) -> list[str]:
    """Delete ``<output>/category=*/run_date=<expired>/`` partitions; return their URLs.

    Call it only after a successful run, so a failing night never shrinks the
    history. Only directories named ``category=...`` and ``run_date=<date>``
    are touched, and the run log of those dates (``_runs/run_date=<expired>/``,
    whose records describe the deleted rows); anything else under the output
    (checkpoints, notes) stays. Partitions that hold no objects are skipped.
    With ``dry_run`` nothing is deleted and the would-be deletions are returned.
    """
    if retention_days is None or not storage.exists(output_url):
        return []
    *outer_keys, run_date_key = PARTITION_COLUMNS
    deleted: list[str] = []
    top = storage.list_dirs(output_url)
    parents = _partition_dirs(output_url, top, outer_keys) + ([storage.join(output_url, RUNS_DIR)] if RUNS_DIR in top else [])
    for parent_url in parents:
        run_dirs = hive_values(storage.list_dirs(parent_url), run_date_key)
        for run_date in expired_run_dates(list(run_dirs), today, retention_days):
            url = storage.join(parent_url, run_dirs[run_date])
            # Some S3-compatible stores (SeaweedFS) keep listing a prefix as a
            # folder after its last object is gone: such an empty partition has
            # nothing to delete and is not reported again every night.
            if not storage.find(url):
                continue
            if not dry_run:
                storage.remove(url)
            log.info("retention: %s %s", "would delete" if dry_run else "deleted", url)
            deleted.append(url)
    return deleted
