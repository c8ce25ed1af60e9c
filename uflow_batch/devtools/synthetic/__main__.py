"""``python -m uflow_batch.devtools.synthetic``: write the dataset, and a scoring archive with its truth, by hand.

The demo (``scripts/demo.sh``) calls it to fill its bucket; ``--truth-out``
is what :mod:`uflow_batch.devtools.verdict_check` checks the night's verdicts against.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from ... import storage
from .archive import write_scoring_archive
from .dataset import SyntheticConfig, generate_dataset
from .samples import CATEGORIES


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and write the dataset, and optionally an archive and its truth file."""
    parser = argparse.ArgumentParser(prog="python -m uflow_batch.devtools.synthetic",
                                     description="Write the synthetic inspection dataset (MVTec AD layout).")
    parser.add_argument("--out", required=True, help="dataset root (local path or fsspec URL)")
    parser.add_argument("--archive", help="also write a scoring archive here")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-test-per-defect", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archive-size", type=int, default=20, help="images per category in the archive")
    parser.add_argument("--defect-rate", type=float, default=0.25)
    parser.add_argument("--truth-out", help="with --archive: write what each archive image truly is here (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SyntheticConfig(tuple(args.categories), args.image_size, args.n_train, args.n_test_good,
                             args.n_test_per_defect, args.seed)
    generate_dataset(args.out, config)
    if args.archive:
        summary = write_scoring_archive(args.archive, config, args.archive_size, args.defect_rate)
        if args.truth_out:
            truth = {f.url: f.defect for f in summary.scorable}
            storage.write_bytes_atomic(args.truth_out, json.dumps(truth, indent=1, sort_keys=True).encode())


if __name__ == "__main__":
    main()
