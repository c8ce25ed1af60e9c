"""The category registry and :func:`render_sample`: one seeded image of a part type, with its exact mask.

Each part type (:mod:`.metal`, :mod:`.fabric`, :mod:`.washer`) contributes a
noise-free renderer and its defects; this module adds what every category
shares (sensor noise, quantization, exact defect application) and the table
that names them, so a new part type is one module and one row here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...config import ConfigError
from . import fabric, metal, washer
from .primitives import Defect, Renderer, apply_exactly, quantize

GOOD = "good"


@dataclass(frozen=True, eq=False)
class Sample:
    """One rendered image with its ground truth.

    ``clean`` is the same scene (same seed, same sensor noise) without the
    defect, which is what makes ``mask`` checkable: it is exactly the set of
    pixels where ``image`` and ``clean`` differ. Images are uint8, (H, W) for
    grayscale categories and (H, W, 3) for RGB ones; ``mask`` is bool (H, W).
    """

    category: str
    defect: str
    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray

    @property
    def is_defective(self) -> bool:
        return self.defect != GOOD


@dataclass(frozen=True)
class Category:
    """A part type: how to render it, its sensor noise, and the defects it can carry."""

    name: str
    mode: str  # PNG mode: "L" or "RGB"
    noise_sigma: float
    render: Renderer
    defects: Mapping[str, Defect]


# --- registry --------------------------------------------------------------------------------

_CATEGORIES: dict[str, Category] = {
    spec.name: spec
    for spec in (
        Category("brushed_metal", "L", 2.5, metal.render, metal.DEFECTS),
        Category("fabric", "RGB", 3.0, fabric.render, fabric.DEFECTS),
        Category("washer", "RGB", 2.0, washer.render, washer.DEFECTS),
    )
}

CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)
DEFECTS: Mapping[str, tuple[str, ...]] = {name: tuple(spec.defects) for name, spec in _CATEGORIES.items()}


def category_spec(name: str) -> Category:
    """The registered part type ``name``; an unknown name is a configuration error that lists the known ones."""
    try:
        return _CATEGORIES[name]
    except KeyError:
        raise ConfigError(f"unknown synthetic category {name!r}; known: {list(CATEGORIES)}") from None


def render_sample(category: str, defect: str = GOOD, *, seed: int | Sequence[int] = 0,
                  image_size: int = 256) -> Sample:
    """Render one image of ``category`` with ``defect`` (or ``"good"``).

    The scene, the sensor noise and the defect draw from independent streams
    of ``seed``, so the same seed with and without a defect gives the same
    clean image: ``render_sample(c, d, seed=s).clean`` equals
    ``render_sample(c, seed=s).image``.
    """
    spec = category_spec(category)
    if defect != GOOD and defect not in spec.defects:
        raise ConfigError(f"category {category!r} has no defect {defect!r}; known: {list(spec.defects)}")
    scene_seed, noise_seed, defect_seed = np.random.SeedSequence(seed).spawn(3)
    scene = spec.render(np.random.default_rng(scene_seed), image_size)
    noise = np.random.default_rng(noise_seed).standard_normal(scene.pixels.shape, dtype=np.float32) * spec.noise_sigma
    clean = quantize(scene.pixels + noise)
    mask = np.zeros(clean.shape[:2], dtype=bool)
    image = clean
    if defect != GOOD:
        defect_rng = np.random.default_rng(defect_seed)
        for _ in range(20):  # a placement can fall outside the part (e.g. a crack off the edge): draw again
            target, region = spec.defects[defect](scene, defect_rng)
            if region.sum() >= 4:
                break
        else:
            raise RuntimeError(f"could not place a {defect} on {category} (seed {seed})")
        image = apply_exactly(clean, target + noise, region)
        mask = region
    squeeze = (lambda a: a[..., 0]) if spec.mode == "L" else (lambda a: a)
    return Sample(category, defect, squeeze(image), squeeze(clean), mask)
