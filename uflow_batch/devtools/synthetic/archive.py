"""A "nightly archive" of fresh images to score, with the bad files a robust scorer must survive.

Each file comes with its truth (:class:`ArchiveFile`): the outcome a correct
scorer must reach and, for scorable images, the defect and its true area, so
tests and the demo can check a scoring run against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ... import storage
from ...config import ConfigError
from .dataset import SPLIT_ARCHIVE, SyntheticConfig, category_code, normalize_root
from .encoding import decompression_bomb_png, gray16_png, palette_png, png, rgba_png
from .samples import DEFECTS, GOOD, category_spec, render_sample

log = logging.getLogger(__name__)

SCORED, DECODE_ERROR, NO_MODEL = "scored", "decode_error", "no_model"
UNKNOWN_CATEGORY = "unknown_part"


@dataclass(frozen=True)
class ArchiveFile:
    """One file of a scoring archive and what a correct scorer must make of it.

    ``expected`` is ``"scored"``, ``"decode_error"`` (the bytes are not an
    image the product may decode) or ``"no_model"`` (a valid image under a
    category that has no trained model). ``defect`` is ``"good"`` or the
    defect kind for files expected to be scored, None otherwise;
    ``defect_area_px`` is the true defect area at the file's resolution.
    """

    url: str
    category: str
    kind: str
    expected: str
    defect: str | None
    defect_area_px: int = 0

    @property
    def is_defective(self) -> bool | None:
        return None if self.defect is None else self.defect != GOOD


@dataclass(frozen=True)
class ArchiveSummary:
    """Every file written to an archive, with what a correct scorer must make of each."""

    root: str
    files: tuple[ArchiveFile, ...]

    def expecting(self, outcome: str) -> tuple[ArchiveFile, ...]:
        """The files a correct scorer ends with ``outcome`` (``"scored"``, ``"decode_error"``, ``"no_model"``)."""
        return tuple(f for f in self.files if f.expected == outcome)

    @property
    def scorable(self) -> tuple[ArchiveFile, ...]:
        return self.expecting(SCORED)

    def by_url(self) -> dict[str, ArchiveFile]:
        return {f.url: f for f in self.files}


def write_scoring_archive(root: str, config: SyntheticConfig = SyntheticConfig(), n_per_category: int = 20,
                          defect_rate: float = 0.25, include_bad_files: bool = True, night: int = 0) -> ArchiveSummary:
    """Write a "nightly archive" ``<root>/<category>/<name>.png`` of fresh images to score.

    Images are drawn from seeds disjoint from the training and test sets
    (``night`` picks another archive from the same configuration). With
    ``include_bad_files`` the archive also holds files a robust scorer must
    survive: undecodable ones, valid but unusual encodings (16-bit, palette,
    RGBA: they must decode to the same pixels as an ordinary PNG) and an image
    under a category with no model.
    """
    if n_per_category < 0:
        raise ConfigError(f"n_per_category must be >= 0, got {n_per_category}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ConfigError(f"defect_rate must be in [0, 1], got {defect_rate}")
    root = normalize_root(root)
    files: list[ArchiveFile] = []

    def write(category: str, name: str, data: bytes, kind: str, expected: str,
              defect: str | None = None, area: int = 0) -> None:
        url = storage.join(root, category, name)
        storage.write_bytes_atomic(url, data)
        files.append(ArchiveFile(url, category, kind, expected, defect, area))

    for category in config.categories:
        code = category_code(category)
        chooser = np.random.default_rng((config.seed, code, SPLIT_ARCHIVE, night, 0))
        defects = DEFECTS[category]
        for index in range(n_per_category):
            defect = str(chooser.choice(defects)) if chooser.uniform() < defect_rate else GOOD
            sample = render_sample(category, defect, seed=(config.seed, code, SPLIT_ARCHIVE, night, 1, index),
                                   image_size=config.image_size)
            write(category, f"{category}_{night:03d}_{index:05d}.png", png(sample.image), "image", SCORED,
                  defect, int(sample.mask.sum()))

    if include_bad_files:
        gray = next((c for c in config.categories if category_spec(c).mode == "L"), config.categories[0])
        rgb = next((c for c in config.categories if category_spec(c).mode == "RGB"), config.categories[0])

        def extra(category: str, index: int) -> np.ndarray:
            seed = (config.seed, category_code(category), SPLIT_ARCHIVE, night, 2, index)
            return render_sample(category, seed=seed, image_size=config.image_size).image

        gray_image, rgb_image = extra(gray, 0), extra(rgb, 1)
        as_gray = gray_image if gray_image.ndim == 2 else np.asarray(Image.fromarray(gray_image).convert("L"))
        as_rgb = rgb_image if rgb_image.ndim == 3 else np.repeat(rgb_image[..., None], 3, axis=2)
        first = config.categories[0]
        write(first, "empty.png", b"", "empty", DECODE_ERROR)
        truncated = png(extra(first, 2))
        write(first, "truncated.png", truncated[: len(truncated) // 2], "truncated", DECODE_ERROR)
        write(first, "notes.jpg", b"camera 3: frame dropped, exposure retry\n", "not_an_image", DECODE_ERROR)
        write(first, "bomb_30000x30000.png", decompression_bomb_png(), "decompression_bomb", DECODE_ERROR)
        write(gray, "gray16.png", gray16_png(as_gray), "gray16", SCORED, GOOD)
        write(gray, "palette.png", palette_png(as_gray), "palette", SCORED, GOOD)
        write(rgb, "rgba.png", rgba_png(as_rgb), "rgba", SCORED, GOOD)
        write(UNKNOWN_CATEGORY, "x.png", png(extra(first, 3)), "unknown_category", NO_MODEL)

    summary = ArchiveSummary(root, tuple(files))
    log.info("wrote scoring archive %s: %d files, %d scorable, %d defective", root, len(files),
             len(summary.scorable), sum(bool(f.is_defective) for f in summary.scorable))
    return summary
