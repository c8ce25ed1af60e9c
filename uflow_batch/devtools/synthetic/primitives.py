"""Drawing primitives the renderers share: smooth noise, ramps, blobs, strokes and exact defect application.

Kept apart from the renderers so each part type reads as a recipe over the
same small vocabulary, and so the one subtle rule, that a defect changes every
pixel of its mask and no other (:func:`apply_exactly`), lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


@dataclass
class Scene:
    """A noise-free render (float, 0..255, (H, W, C)) plus what defects need to know about it."""

    pixels: np.ndarray
    info: dict = field(default_factory=dict)


# A renderer draws one noise-free scene of a given side; a defect returns the target
# pixels (float, like the scene) and the boolean region of the image they replace.
Renderer = Callable[[np.random.Generator, int], Scene]
Defect = Callable[[Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column coordinates (read-only, cached: every renderer and defect asks for them)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def noise1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Smooth unit-variance periodic 1D noise: a profile that grain and grooves are drawn along."""
    values = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma, mode="wrap")
    return values / (values.std() + 1e-12)


def noise2d(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Smooth unit-variance noise. Broad noise is made on a coarse grid and upsampled: a
    full-resolution Gaussian of large sigma would dominate the rendering time."""
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (2,))
    steps = np.maximum(1, (sigmas / 3).astype(int))
    coarse_shape = tuple(int(-(-size // s)) for s in steps)
    values = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), tuple(sigmas / steps),
                                     mode="wrap")
    if (steps > 1).any():
        values = ndimage.zoom(values, tuple(steps), order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    return values / (values.std() + 1e-12)


def lookup(profile: np.ndarray, coordinate: np.ndarray) -> np.ndarray:
    """Sample a 1D profile at fractional coordinates (offset so negative ones stay inside)."""
    return np.interp(coordinate + len(profile) / 3, np.arange(len(profile)), profile)


def ramp(size: int, angle: float) -> np.ndarray:
    """A linear ramp from -1 to 1 across the image along ``angle``: an illumination gradient."""
    yy, xx = grid(size)
    return ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / (size / 2)


def polar(size: int, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance and angle of every pixel from (``cx``, ``cy``)."""
    yy, xx = grid(size)
    dx, dy = xx - cx, yy - cy
    return np.hypot(dx, dy), np.arctan2(dy, dx)


def blob(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float,
          roughness: float = 0.25, ramp: float = 1.0) -> np.ndarray:
    """Irregular disc coverage in [0, 1]: 1 inside, a linear ramp ``ramp`` pixels wide at the rim."""
    distance, angle = polar(size, cx, cy)
    boundary = np.full_like(distance, radius)
    for k in range(2, 6):
        boundary += radius * roughness / k * rng.uniform(-1, 1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.clip((boundary - distance) / ramp + 0.5, 0.0, 1.0)


def stroke(size: int, points: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a polyline of densely sampled ``points`` (x, y) with per-point width."""
    widths = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(points),))
    pad = float(widths.max()) + 2
    x0, y0 = np.floor(points.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(points.max(axis=0) + pad).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size - 1), min(y1, size - 1)
    coverage = np.zeros((size, size), dtype=np.float32)
    if x1 < x0 or y1 < y0:
        return coverage
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    query = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    distance, nearest = cKDTree(points).query(query)
    alpha = np.clip(widths[nearest] / 2 + 0.5 - distance, 0.0, 1.0)
    coverage[y0:y1 + 1, x0:x1 + 1] = alpha.reshape(ys.shape)
    return coverage


def bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points every ~0.25 px along a quadratic Bezier curve, and their parameter t."""
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
    t = np.linspace(0.0, 1.0, max(int(length * 4), 8))[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return points, t[:, 0]


def quantize(pixels: np.ndarray) -> np.ndarray:
    """Float pixels to uint8, rounded and clipped as a camera would store them."""
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def apply_exactly(clean: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``clean`` with ``region`` replaced by ``target``, every region pixel changed by at least one level.

    This is what makes a mask exact: outside ``region`` nothing changes, and a
    region pixel that rounding would leave equal to ``clean`` is nudged one
    level in the defect's direction (or away from the clipped end).
    """
    out = clean.copy()
    out[region] = quantize(target[region])
    same = region & np.all(out == clean, axis=-1)
    if same.any():
        base = clean[same].astype(np.int16)
        step = np.sign((target[same] - base).sum(axis=-1)).astype(np.int16)
        step[step == 0] = np.where(base[step == 0].mean(axis=-1) < 128, 1, -1)
        step[(step > 0) & np.all(base >= 255, axis=-1)] = -1
        step[(step < 0) & np.all(base <= 0, axis=-1)] = 1
        out[same] = np.clip(base + step[:, None], 0, 255).astype(np.uint8)
    return out


def size_factor(rng: np.random.Generator) -> float:
    """Skewed towards small defects: half of them are in the smallest third of the range."""
    return float(rng.uniform() ** 1.6)
