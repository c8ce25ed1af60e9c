"""Put a local MVTec-layout dataset into object storage, with a nightly archive made of its test split.

The demo uses it to run on real data (``scripts/demo.sh --data ../shared/data/mtd``):
the training layout is copied as is, and every test image (good and defective)
becomes an object of ``<archive>/<category>/<defect>__<name>``, the way a
camera station would drop its images for the night.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import storage
from ..data import discover_categories, is_image_name

log = logging.getLogger(__name__)


def upload_dataset(data: Path, dataset_url: str, archive_url: str) -> tuple[int, int]:
    """Upload ``data`` to ``dataset_url`` and its test images to ``archive_url``; returns the counts."""
    uploaded = archived = 0
    for category in discover_categories(str(data)):
        for path in sorted((data / category).rglob("*")):
            if path.is_file():
                relative = path.relative_to(data).as_posix()
                storage.write_bytes_atomic(storage.join(dataset_url, relative), path.read_bytes())
                uploaded += 1
        for image in sorted((data / category / "test").glob("*/*")):
            if image.is_file() and is_image_name(image.name):
                name = f"{image.parent.name}__{image.name}"
                storage.write_bytes_atomic(storage.join(archive_url, category, name), image.read_bytes())
                archived += 1
    return uploaded, archived


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="local dataset root (MVTec AD layout)")
    parser.add_argument("--dataset-url", required=True, help="where the training layout goes")
    parser.add_argument("--archive-url", required=True, help="where the night's images go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uploaded, archived = upload_dataset(args.data, args.dataset_url, args.archive_url)
    log.info("staged %d dataset files to %s and %d test images to %s", uploaded, args.dataset_url, archived, args.archive_url)


if __name__ == "__main__":
    main()
