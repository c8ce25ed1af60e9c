"""Killing our own Ray workers, and only ours, for the fault tests.

A local Ray instance is started by the test process, so its workers are
descendants of it; matching on the command line alone could kill another
session's workers on a shared machine.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    parents = {pid: _parent_of(pid) for pid in pids}
    found, frontier = [], {root}
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in found]
        found += children
        frontier = set(children)
    return found


def kill_own_workers(title: str) -> int:
    """SIGKILL every descendant of this process whose command line contains ``title``; returns how many."""
    victims = [pid for pid in descendants(os.getpid()) if title in _cmdline(pid)]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return len(victims)


def stop_processes_mentioning(text: str, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL, every process whose command line contains ``text`` (e.g. a Ray temp dir)."""
    import time

    victims = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and text in _cmdline(int(p.name))]
    victims = [pid for pid in victims if pid != os.getpid()]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in victims):
        time.sleep(0.2)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)
