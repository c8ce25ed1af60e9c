"""How the night's verdicts compare with what a generated archive truly holds.

The demo knows the truth of its archive (``devtools.synthetic --truth-out``), so it
can say plainly how many defective parts the verdict caught and how many
good ones it flagged, the two numbers a QA lead asks first.

    python -m uflow_batch.devtools.verdict_check --truth URL --scores URL
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence

from .. import storage
from ..scores.dataset import open_dataset, read_current


def verdict_counts(truth: dict[str, str], scores_url: str) -> dict[str, Counter]:
    """Per category: defective and good images, and how many of each were flagged."""
    # One thread: a small table, and no pyarrow worker left calling into fsspec when the process exits.
    table = read_current(open_dataset(scores_url), ["image_uri", "category", "is_anomalous", "error"], use_threads=False)
    counts: dict[str, Counter] = {}
    for row in table.to_pylist():
        defect = truth.get(row["image_uri"])
        if defect is None or row["error"] is not None:
            continue
        kind = "good" if defect == "good" else "defective"
        tally = counts.setdefault(row["category"], Counter())
        tally[kind] += 1
        tally[f"{kind}_flagged"] += bool(row["is_anomalous"])
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", required=True, help="the archive's truth file written by synthetic --truth-out")
    parser.add_argument("--scores", required=True, help="the scores dataset root")
    args = parser.parse_args(argv)
    counts = verdict_counts(json.loads(storage.read_bytes(args.truth)), args.scores)
    total = sum(counts.values(), Counter())
    for category, tally in sorted(counts.items()) + [("all", total)]:
        print(f"{category:14s} defective flagged {tally['defective_flagged']:3d} of {tally['defective']:3d}   "
              f"good flagged {tally['good_flagged']:3d} of {tally['good']:3d}")


if __name__ == "__main__":
    main()
