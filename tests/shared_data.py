"""Where the real defect images live, and small datasets cut from them for tests.

The real data stays outside the project (its license forbids redistribution):
tests point at ``../shared/data/mtd`` (or ``$UFLOW_SHARED_DATA``) and build
tiny MVTec-layout datasets in temporary directories at run time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MTD = Path(os.environ.get("UFLOW_SHARED_DATA", REPO.parent / "shared" / "data")) / "mtd"


def require_mtd() -> Path:
    if not (MTD / "tile_exp1" / "train" / "good").is_dir():
        pytest.skip(f"real defect data not found at {MTD} (set UFLOW_SHARED_DATA)")
    return MTD


def make_tiny_mvtec(
    destination: Path,
    categories: tuple[str, ...] = ("tile_exp1",),
    n_train: int = 12,
    n_good: int = 3,
    n_per_defect: int = 2,
) -> Path:
    """Copy the first few images of each split (and their masks) into ``destination``."""
    source = require_mtd()
    for category in categories:
        src, dst = source / category, destination / category
        for split, count in [("train/good", n_train), ("test/good", n_good)]:
            _copy_first(src / split, dst / split, count)
        for defect_dir in sorted((src / "test").iterdir()):
            if defect_dir.name == "good":
                continue
            for image in _copy_first(defect_dir, dst / "test" / defect_dir.name, n_per_defect):
                mask = src / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
                (dst / "ground_truth" / defect_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, dst / "ground_truth" / defect_dir.name / mask.name)
    return destination


def _copy_first(src: Path, dst: Path, count: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    chosen = sorted(src.glob("*.png"))[:count]
    for image in chosen:
        shutil.copy(image, dst / image.name)
    return chosen
