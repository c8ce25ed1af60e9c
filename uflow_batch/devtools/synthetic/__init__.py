"""Procedural inspection dataset: textured parts, synthetic defects, exact masks.

Real inspection datasets may not be redistributed, yet the demo and the tests
need data that exercises the whole product on a fresh machine. This package
renders it: a few categories that look like different inspection problems
(an anisotropic machined surface in grayscale, a periodic woven fabric and a
centred round part in RGB), each with realistic normal variation (texture
phase, illumination, pose, sensor noise) so a detector has to learn the
normal appearance instead of memorizing one image, and a few defect kinds of
moderate contrast and small-to-medium size.

Every ground-truth mask is *exact*: it is the set of pixels where the defective
image differs from the same scene rendered without the defect (same scene seed,
same sensor noise). A pixel of the defect footprint that rounding would leave
unchanged is nudged by one grey level, so mask and difference coincide.

Everything is seeded: the same configuration writes byte-identical files.
Output goes through :mod:`uflow_batch.storage`, so a root can be a local path
or any fsspec URL (``s3://...``).

Modules: :mod:`.primitives` (drawing vocabulary), :mod:`.metal`,
:mod:`.fabric`, :mod:`.washer` (one part type each), :mod:`.samples`
(registry, :func:`render_sample`), :mod:`.encoding` (PNG bytes),
:mod:`.dataset` (:func:`generate_dataset`), :mod:`.archive`
(:func:`write_scoring_archive`); ``python -m uflow_batch.devtools.synthetic``
runs it by hand.
"""

from .archive import (
    DECODE_ERROR,
    NO_MODEL,
    SCORED,
    UNKNOWN_CATEGORY,
    ArchiveFile,
    ArchiveSummary,
    write_scoring_archive,
)
from .dataset import DatasetSummary, SyntheticConfig, generate_dataset
from .encoding import decompression_bomb_png
from .samples import CATEGORIES, DEFECTS, GOOD, Sample, render_sample

__all__ = [
    "CATEGORIES",
    "DECODE_ERROR",
    "DEFECTS",
    "GOOD",
    "NO_MODEL",
    "SCORED",
    "UNKNOWN_CATEGORY",
    "ArchiveFile",
    "ArchiveSummary",
    "DatasetSummary",
    "Sample",
    "SyntheticConfig",
    "decompression_bomb_png",
    "generate_dataset",
    "render_sample",
    "write_scoring_archive",
]
