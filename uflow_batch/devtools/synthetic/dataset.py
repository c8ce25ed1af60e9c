"""The MVTec-AD-layout dataset: :class:`SyntheticConfig` says what to render, :func:`generate_dataset` writes it.

Output goes through :mod:`uflow_batch.storage`, so a root can be a local path
or any fsspec URL (``s3://...``); the same configuration writes byte-identical files.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from ... import storage
from ...config import ConfigError
from .encoding import mask_png, png
from .samples import CATEGORIES, GOOD, category_spec, render_sample

log = logging.getLogger(__name__)

# Seed streams: one entropy word per split keeps training, test and archive
# images independent even when they share the configuration seed.
SPLIT_TRAIN, SPLIT_TEST, SPLIT_ARCHIVE = 1, 2, 3


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Defaults make a dataset a 2-core CPU trains on in minutes."""

    categories: tuple[str, ...] = CATEGORIES
    image_size: int = 256
    n_train: int = 60
    n_test_good: int = 10
    n_test_per_defect: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        categories = (self.categories,) if isinstance(self.categories, str) else tuple(self.categories)
        object.__setattr__(self, "categories", categories)
        if not categories or len(set(categories)) != len(categories):
            raise ConfigError(f"synthetic.categories must be non-empty and unique, got {categories}")
        for name in categories:
            category_spec(name)
        if not 32 <= self.image_size <= 2048:
            raise ConfigError(f"synthetic.image_size must be in [32, 2048], got {self.image_size}")
        if self.n_train < 1:
            raise ConfigError(f"synthetic.n_train must be >= 1, got {self.n_train}")
        if self.n_test_good < 0 or self.n_test_per_defect < 0:
            raise ConfigError("synthetic.n_test_good and n_test_per_defect must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"synthetic.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class DatasetSummary:
    """Image counts per category and split (``"train/good"``, ``"test/good"``, ``"test/<defect>"``)."""

    root: str
    counts: Mapping[str, Mapping[str, int]]
    seconds: float

    @property
    def total_images(self) -> int:
        return sum(n for splits in self.counts.values() for n in splits.values())


def normalize_root(root: str) -> str:
    """Plain local paths become absolute, so summary URLs match what storage listings return."""
    return root if "://" in root else os.path.abspath(root)


def category_code(name: str) -> int:
    """A stable number per category for its seeds (crc32: the same in every process, unlike ``hash``)."""
    return zlib.crc32(name.encode())


def _stem(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(max(count - 1, 0))))}d}"


def generate_dataset(root: str, config: SyntheticConfig = SyntheticConfig()) -> DatasetSummary:
    """Write an MVTec-AD-layout dataset of ``config`` under ``root`` (local path or fsspec URL)."""
    root = normalize_root(root)
    started = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    for category in config.categories:
        spec = category_spec(category)
        code = category_code(category)
        splits: dict[str, int] = {}
        base = storage.join(root, category)
        for index in range(config.n_train):
            seed = (config.seed, code, SPLIT_TRAIN, 0, index)
            sample = render_sample(category, seed=seed, image_size=config.image_size)
            storage.write_bytes_atomic(storage.join(base, "train", GOOD, f"{_stem(index, config.n_train)}.png"),
                                       png(sample.image))
        splits[f"train/{GOOD}"] = config.n_train
        for defect_code, (defect, count) in enumerate(
            [(GOOD, config.n_test_good)] + [(d, config.n_test_per_defect) for d in spec.defects]
        ):
            for index in range(count):
                sample = render_sample(category, defect, seed=(config.seed, code, SPLIT_TEST, defect_code, index),
                                       image_size=config.image_size)
                stem = _stem(index, count)
                storage.write_bytes_atomic(storage.join(base, "test", defect, f"{stem}.png"), png(sample.image))
                if defect != GOOD:
                    storage.write_bytes_atomic(storage.join(base, "ground_truth", defect, f"{stem}_mask.png"),
                                               mask_png(sample.mask))
            splits[f"test/{defect}"] = count
        counts[category] = splits
        log.info("synthetic %s: %s", category, splits)
    summary = DatasetSummary(root, counts, time.perf_counter() - started)
    log.info("wrote %d synthetic images to %s in %.1fs", summary.total_images, root, summary.seconds)
    return summary
