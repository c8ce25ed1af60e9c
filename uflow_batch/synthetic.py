"""Procedural inspection dataset: textured parts, synthetic defects, exact masks.

Real inspection datasets may not be redistributed, yet the demo and the tests
need data that exercises the whole product on a fresh machine. This module
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
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from . import storage
from .config import ConfigError

log = logging.getLogger(__name__)

GOOD = "good"

# Seed streams: one entropy word per split keeps training, test and archive
# images independent even when they share the configuration seed.
_SPLIT_TRAIN, _SPLIT_TEST, _SPLIT_ARCHIVE = 1, 2, 3


# --- samples ---------------------------------------------------------------------------------

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


@dataclass
class _Scene:
    """A noise-free render (float, 0..255, (H, W, C)) plus what defects need to know about it."""

    pixels: np.ndarray
    info: dict = field(default_factory=dict)


_Renderer = Callable[[np.random.Generator, int], _Scene]
_Defect = Callable[[_Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Category:
    name: str
    mode: str  # PNG mode: "L" or "RGB"
    noise_sigma: float
    render: _Renderer
    defects: Mapping[str, _Defect]


# --- small helpers ---------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _noise1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    values = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma, mode="wrap")
    return values / (values.std() + 1e-12)


def _noise2d(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
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


def _lookup(profile: np.ndarray, coordinate: np.ndarray) -> np.ndarray:
    """Sample a 1D profile at fractional coordinates (offset so negative ones stay inside)."""
    return np.interp(coordinate + len(profile) / 3, np.arange(len(profile)), profile)


def _ramp(size: int, angle: float) -> np.ndarray:
    """A linear ramp from -1 to 1 across the image along ``angle``: an illumination gradient."""
    yy, xx = _grid(size)
    return ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / (size / 2)


def _polar(size: int, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    return np.hypot(dx, dy), np.arctan2(dy, dx)


def _blob(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float,
          roughness: float = 0.25, ramp: float = 1.0) -> np.ndarray:
    """Irregular disc coverage in [0, 1]: 1 inside, a linear ramp ``ramp`` pixels wide at the rim."""
    distance, angle = _polar(size, cx, cy)
    boundary = np.full_like(distance, radius)
    for k in range(2, 6):
        boundary += radius * roughness / k * rng.uniform(-1, 1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.clip((boundary - distance) / ramp + 0.5, 0.0, 1.0)


def _stroke(size: int, points: np.ndarray, width: float | np.ndarray) -> np.ndarray:
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


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points every ~0.25 px along a quadratic Bezier curve, and their parameter t."""
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
    t = np.linspace(0.0, 1.0, max(int(length * 4), 8))[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return points, t[:, 0]


def _quantize(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _apply_exactly(clean: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``clean`` with ``region`` replaced by ``target``, every region pixel changed by at least one level.

    This is what makes a mask exact: outside ``region`` nothing changes, and a
    region pixel that rounding would leave equal to ``clean`` is nudged one
    level in the defect's direction (or away from the clipped end).
    """
    out = clean.copy()
    out[region] = _quantize(target[region])
    same = region & np.all(out == clean, axis=-1)
    if same.any():
        base = clean[same].astype(np.int16)
        step = np.sign((target[same] - base).sum(axis=-1)).astype(np.int16)
        step[step == 0] = np.where(base[step == 0].mean(axis=-1) < 128, 1, -1)
        step[(step > 0) & np.all(base >= 255, axis=-1)] = -1
        step[(step < 0) & np.all(base <= 0, axis=-1)] = 1
        out[same] = np.clip(base + step[:, None], 0, 255).astype(np.uint8)
    return out


def _size_factor(rng: np.random.Generator) -> float:
    """Skewed towards small defects: half of them are in the smallest third of the range."""
    return float(rng.uniform() ** 1.6)


# --- brushed metal (grayscale) ---------------------------------------------------------------

def _render_metal(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _grid(size)
    theta = np.deg2rad(rng.uniform(-4, 4))
    across = yy * np.cos(theta) - xx * np.sin(theta)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    scale = size / 256
    n = 3 * size
    grain = (
        5.0 * _lookup(_noise1d(rng, n, 0.7 * scale), across)
        + 3.5 * _lookup(_noise1d(rng, n, 3.0 * scale), across)
        + 3.0 * _lookup(_noise1d(rng, n, 14.0 * scale), across)
        + 3.0 * _noise2d(rng, size, (0.8 * scale, size / 8))
    )
    base = rng.uniform(110, 150)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(5, 18) * _ramp(size, angle)
    band_centre, band_width = rng.uniform(-0.2, 1.2) * size, rng.uniform(0.15, 0.4) * size
    band = rng.uniform(8, 28) * np.exp(-(((along - band_centre) / band_width) ** 2))
    pixels = base + gradient + band + grain * (1 + band / 60)
    return _Scene(pixels[..., None].astype(np.float32))


def _metal_scratch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    length = size * (0.1 + 0.4 * _size_factor(rng))
    direction = np.deg2rad(rng.uniform(25, 155)) * rng.choice([-1, 1])
    unit = np.array([np.cos(direction), np.sin(direction)])
    centre = rng.uniform(0.15, 0.85, size=2) * size
    p0, p2 = centre - unit * length / 2, centre + unit * length / 2
    p1 = centre + np.array([-unit[1], unit[0]]) * length * rng.uniform(-0.25, 0.25)
    points, t = _bezier(p0, p1, p2)
    width = rng.uniform(0.9, 2.2) * (size / 256) * np.sqrt(np.sin(np.pi * np.clip(t, 0.03, 0.97)))
    alpha = _stroke(size, points, width)
    amplitude = rng.uniform(22, 45) * (1 if rng.uniform() < 0.6 else -1)
    region = alpha > 0.1
    return scene.pixels + amplitude * alpha[..., None], region


def _metal_dent(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    sigma = size * (0.012 + 0.025 * _size_factor(rng))
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    yy, xx = _grid(size)
    dx, dy = (xx - cx) / sigma, (yy - cy) / (sigma * rng.uniform(0.7, 1.3))
    height = np.exp(-(dx ** 2 + dy ** 2) / 2) * rng.choice([-1, 1])  # a dent or a raised bump
    light = rng.uniform(0, 2 * np.pi)
    slope = -(dx * np.cos(light) + dy * np.sin(light)) * height  # derivative of the height along the light
    amplitude = rng.uniform(14, 32)
    shading = amplitude / 0.607 * slope - 0.35 * amplitude * np.abs(height)
    region = dx ** 2 + dy ** 2 < 2.3 ** 2
    return scene.pixels + shading[..., None], region


def _metal_stain(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    radius = size * (0.035 + 0.085 * _size_factor(rng))
    cx, cy = rng.uniform(0.12, 0.88, size=2) * size
    coverage = _blob(rng, size, cx, cy, radius, roughness=0.35, ramp=radius * 0.7)
    strength = rng.uniform(0.06, 0.14)
    region = coverage > 0.1
    # An oily film darkens the surface and flattens the grain's contrast a little.
    mean = ndimage.uniform_filter(scene.pixels[..., 0], size=9)[..., None]
    flattened = mean + (scene.pixels - mean) * (1 - 0.4 * coverage[..., None])
    return flattened * (1 - strength * coverage[..., None]), region


# --- woven fabric (RGB) ----------------------------------------------------------------------

_FABRIC_COLOUR = np.array([70, 96, 142], dtype=np.float32)  # an indigo canvas


def _render_fabric(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _grid(size)
    scale = size / 256
    pitch = rng.uniform(7.4, 8.6) * scale
    theta = np.deg2rad(rng.uniform(-2.5, 2.5))
    xr = xx * np.cos(theta) + yy * np.sin(theta)
    yr = -xx * np.sin(theta) + yy * np.cos(theta)
    u = (xr + 0.7 * scale * _noise2d(rng, size, 6 * scale)) / pitch + rng.uniform(0, 2)
    v = (yr + 0.7 * scale * _noise2d(rng, size, 6 * scale)) / pitch + rng.uniform(0, 2)
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - iu, v - iv
    warp_on_top = (iu + iv) % 2 == 0
    warp_gain = 1 + 0.05 * rng.standard_normal(4096)
    weft_gain = 1 + 0.05 * rng.standard_normal(4096)
    warp = np.sin(np.pi * fu) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fv)) * warp_gain[iu % 4096]
    weft = np.sin(np.pi * fv) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fu)) * weft_gain[iv % 4096]
    fibres = np.where(warp_on_top, _noise2d(rng, size, (2.0 * scale, 0.5 * scale)),
                      _noise2d(rng, size, (0.5 * scale, 2.0 * scale)))
    value = np.where(warp_on_top, warp, weft) * (1 + 0.06 * fibres)
    colour = _FABRIC_COLOUR * rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
    weft_colour = colour * 1.12
    gap = colour * 0.28
    thread_colour = np.where(warp_on_top[..., None], colour, weft_colour)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.03, 0.09) * _ramp(size, angle)
    pixels = (gap + (thread_colour - gap) * value[..., None]) * light[..., None]
    info = {"u": u, "v": v, "fu": fu, "fv": fv, "iu": iu, "iv": iv, "light": light,
            "colour": colour, "weft_colour": weft_colour, "gap": gap, "pitch": pitch}
    return _Scene(pixels.astype(np.float32), info)


def _fabric_hole(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    radius = size * (0.012 + 0.035 * _size_factor(rng))
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    coverage = _blob(rng, size, cx, cy, radius, roughness=0.4, ramp=1.5)[..., None]
    backing = scene.info["gap"] * rng.uniform(0.45, 0.8) * scene.info["light"][..., None]
    region = coverage[..., 0] > 0.1
    return scene.pixels * (1 - coverage) + backing * coverage, region


def _fabric_thread(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A floating (un-woven, lying on top) or a missing thread over a segment of one warp or weft thread."""
    size = scene.pixels.shape[0]
    info = scene.info
    warp = rng.uniform() < 0.5
    index_field, frac, along = (info["iu"], info["fu"], info["v"]) if warp else (info["iv"], info["fv"], info["u"])
    row, col = (rng.uniform(0.1, 0.9, size=2) * size).astype(int)
    thread = index_field[row, col]
    span = (0.08 + 0.35 * _size_factor(rng)) * size / info["pitch"]
    start = along[row, col] - span / 2
    body = np.sin(np.pi * frac) ** 0.6
    region = (index_field == thread) & (along >= start) & (along <= start + span) & (body > 0.35)
    light = info["light"][..., None]
    if rng.uniform() < 0.5:
        colour = info["colour"] if warp else info["weft_colour"]
        value = body * rng.uniform(1.05, 1.2)
        target = (info["gap"] + (colour - info["gap"]) * value[..., None]) * light
    else:
        target = info["gap"] * rng.uniform(0.9, 1.3) * light
    return target, region


def _fabric_stain(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    radius = size * (0.035 + 0.085 * _size_factor(rng))
    cx, cy = rng.uniform(0.12, 0.88, size=2) * size
    coverage = _blob(rng, size, cx, cy, radius, roughness=0.35, ramp=radius * 0.7)
    tint = np.array([0.86, 0.8, 0.62], dtype=np.float32) ** rng.uniform(0.5, 1.1)
    region = coverage > 0.1
    return scene.pixels * (1 - coverage[..., None] * (1 - tint)), region


# --- washer on a conveyor (RGB) --------------------------------------------------------------

def _render_washer(rng: np.random.Generator, size: int) -> _Scene:
    scale = size / 256
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04, size=2) * size
    outer = size * 0.34 * rng.uniform(0.97, 1.03)
    inner = outer * rng.uniform(0.46, 0.52)
    distance, angle = _polar(size, cx, cy)
    coverage = np.clip(outer - distance + 0.5, 0, 1) * np.clip(distance - inner + 0.5, 0, 1)
    light = np.deg2rad(225 + rng.uniform(-25, 25))
    # A turned face reflects in a bow-tie pattern; bevels catch the light on the lit side.
    face = rng.uniform(150, 175) * (1 + 0.14 * np.cos(2 * (angle - light)) + 0.06 * np.cos(angle - light))
    grooves = 4.0 * _lookup(_noise1d(rng, 3 * size, 0.8 * scale), distance) + 3.0 * _lookup(
        _noise1d(rng, 3 * size, 5 * scale), distance)
    bevel = rng.uniform(2.0, 3.5) * scale
    outer_bevel = np.clip(1 - (outer - distance) / bevel, 0, 1)
    inner_bevel = np.clip(1 - (distance - inner) / bevel, 0, 1)
    material = face + grooves + 45 * np.cos(angle - light) * (outer_bevel - inner_bevel)
    tint = np.array([1.0, 1.0, 1.03], dtype=np.float32) * rng.uniform(0.98, 1.02, size=3)
    material = material[..., None] * tint

    belt = np.array([58, 62, 66], dtype=np.float32) * rng.uniform(0.9, 1.1)
    background = belt * (1 + 0.05 * _noise2d(rng, size, 1.0 * scale)[..., None]
                         + 0.04 * _noise2d(rng, size, 30 * scale)[..., None])
    offset = -np.array([np.cos(light), np.sin(light)]) * rng.uniform(2, 5) * scale
    shadow = ndimage.gaussian_filter(ndimage.shift(coverage, (offset[1], offset[0]), order=1), 3 * scale)
    shadowed = background * (1 - 0.45 * shadow[..., None])

    tilt = rng.uniform(0, 2 * np.pi)
    illumination = (1 + rng.uniform(0.02, 0.07) * _ramp(size, tilt))[..., None]
    pixels = (coverage[..., None] * material + (1 - coverage[..., None]) * shadowed) * illumination
    info = {"cx": cx, "cy": cy, "outer": outer, "inner": inner, "coverage": coverage,
            "material": material, "background": background, "illumination": illumination}
    return _Scene(pixels.astype(np.float32), info)


def _washer_crack(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    info = scene.info
    from_outer = rng.uniform() < 0.5
    start_angle = rng.uniform(0, 2 * np.pi)
    radius = info["outer"] - 1 if from_outer else info["inner"] + 1
    position = np.array([info["cx"] + radius * np.cos(start_angle), info["cy"] + radius * np.sin(start_angle)])
    heading = start_angle + (np.pi if from_outer else 0) + rng.uniform(-0.4, 0.4)
    length = (info["outer"] - info["inner"]) * (0.3 + 0.6 * _size_factor(rng))
    points = [position.copy()]
    travelled = 0.0
    while travelled < length:
        heading += rng.normal(0, 0.35)
        step = np.array([np.cos(heading), np.sin(heading)])
        for _ in range(12):  # 3 px between direction changes, sampled every 0.25 px
            position = position + 0.25 * step
            points.append(position.copy())
        travelled += 3
    points = np.array(points)
    t = np.linspace(0, 1, len(points))
    width = rng.uniform(0.9, 1.7) * (size / 256) * (1 - 0.6 * t)
    alpha = _stroke(size, points, width)
    region = (alpha > 0.1) & (info["coverage"] > 0.3)
    darkening = rng.uniform(0.45, 0.7)
    return scene.pixels * (1 - darkening * alpha[..., None]), region


def _washer_chip(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Missing material bitten out of the outer (or, less often, the inner) edge.

    The gap shows the belt as it is away from the part's shadow (no material
    above it casts one); the shadow outside the gap is left as it was, since
    the mask must cover only the pixels of the missing material.
    """
    size = scene.pixels.shape[0]
    info = scene.info
    radius = size * (0.015 + 0.04 * _size_factor(rng))
    edge = info["outer"] if rng.uniform() < 0.75 else info["inner"]
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = info["cx"] + edge * np.cos(angle), info["cy"] + edge * np.sin(angle)
    bite = _blob(rng, size, cx, cy, radius, roughness=0.35, ramp=1.0)
    coverage = info["coverage"] * (1 - bite)
    coverage = coverage[..., None]
    target = (coverage * info["material"] + (1 - coverage) * info["background"]) * info["illumination"]
    region = bite * info["coverage"] > 0.05
    return target, region


def _washer_rust(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    info = scene.info
    radius = size * (0.02 + 0.045 * _size_factor(rng))
    ring = info["inner"] + (info["outer"] - info["inner"]) * rng.uniform(0.3, 0.7)
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = info["cx"] + ring * np.cos(angle), info["cy"] + ring * np.sin(angle)
    coverage = _blob(rng, size, cx, cy, radius, roughness=0.45, ramp=radius * 0.5)
    patchy = coverage * (0.7 + 0.3 * np.clip(_noise2d(rng, size, 2.0 * size / 256), -1, 1))
    region = (coverage > 0.1) & (info["coverage"] > 0.5)
    rust = np.array([150, 88, 48], dtype=np.float32) * info["illumination"]
    amount = rng.uniform(0.2, 0.45) * patchy[..., None]
    return scene.pixels * (1 - amount) + rust * amount, region


# --- registry --------------------------------------------------------------------------------

_CATEGORIES: dict[str, _Category] = {
    spec.name: spec
    for spec in (
        _Category("brushed_metal", "L", 2.5, _render_metal,
                  {"scratch": _metal_scratch, "dent": _metal_dent, "stain": _metal_stain}),
        _Category("fabric", "RGB", 3.0, _render_fabric,
                  {"hole": _fabric_hole, "thread": _fabric_thread, "stain": _fabric_stain}),
        _Category("washer", "RGB", 2.0, _render_washer,
                  {"crack": _washer_crack, "chip": _washer_chip, "rust": _washer_rust}),
    )
}

CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)
DEFECTS: Mapping[str, tuple[str, ...]] = {name: tuple(spec.defects) for name, spec in _CATEGORIES.items()}


def _category(name: str) -> _Category:
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
    spec = _category(category)
    if defect != GOOD and defect not in spec.defects:
        raise ConfigError(f"category {category!r} has no defect {defect!r}; known: {list(spec.defects)}")
    scene_seed, noise_seed, defect_seed = np.random.SeedSequence(seed).spawn(3)
    scene = spec.render(np.random.default_rng(scene_seed), image_size)
    noise = np.random.default_rng(noise_seed).standard_normal(scene.pixels.shape, dtype=np.float32) * spec.noise_sigma
    clean = _quantize(scene.pixels + noise)
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
        image = _apply_exactly(clean, target + noise, region)
        mask = region
    squeeze = (lambda a: a[..., 0]) if spec.mode == "L" else (lambda a: a)
    return Sample(category, defect, squeeze(image), squeeze(clean), mask)


# --- encoding --------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _mask_png(mask: np.ndarray) -> bytes:
    return _png(mask.astype(np.uint8) * 255)


def _gray16_png(gray: np.ndarray) -> bytes:
    return _png(gray.astype(np.uint16) * 257)


def _palette_png(gray: np.ndarray) -> bytes:
    image = Image.fromarray(gray)
    image.putpalette([level for level in range(256) for _ in range(3)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _rgba_png(rgb: np.ndarray) -> bytes:
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
    return _png(np.concatenate([rgb, alpha], axis=2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=1)
def decompression_bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` zeros: ~100 KB on disk, ~900 MB once decoded by Pillow."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    parts = [compressor.compress(row * min(rows_per_chunk, side - start)) for start in range(0, side, rows_per_chunk)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


# --- dataset ---------------------------------------------------------------------------------

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
            _category(name)
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


def _normalize_root(root: str) -> str:
    """Plain local paths become absolute, so summary URLs match what storage listings return."""
    return root if "://" in root else os.path.abspath(root)


def _category_code(name: str) -> int:
    return zlib.crc32(name.encode())


def _stem(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(max(count - 1, 0))))}d}"


def generate_dataset(root: str, config: SyntheticConfig = SyntheticConfig()) -> DatasetSummary:
    """Write an MVTec-AD-layout dataset of ``config`` under ``root`` (local path or fsspec URL)."""
    root = _normalize_root(root)
    started = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    for category in config.categories:
        spec = _category(category)
        code = _category_code(category)
        splits: dict[str, int] = {}
        base = storage.join(root, category)
        for index in range(config.n_train):
            seed = (config.seed, code, _SPLIT_TRAIN, 0, index)
            sample = render_sample(category, seed=seed, image_size=config.image_size)
            storage.write_bytes_atomic(storage.join(base, "train", GOOD, f"{_stem(index, config.n_train)}.png"),
                                       _png(sample.image))
        splits[f"train/{GOOD}"] = config.n_train
        for defect_code, (defect, count) in enumerate(
            [(GOOD, config.n_test_good)] + [(d, config.n_test_per_defect) for d in spec.defects]
        ):
            for index in range(count):
                sample = render_sample(category, defect, seed=(config.seed, code, _SPLIT_TEST, defect_code, index),
                                       image_size=config.image_size)
                stem = _stem(index, count)
                storage.write_bytes_atomic(storage.join(base, "test", defect, f"{stem}.png"), _png(sample.image))
                if defect != GOOD:
                    storage.write_bytes_atomic(storage.join(base, "ground_truth", defect, f"{stem}_mask.png"),
                                               _mask_png(sample.mask))
            splits[f"test/{defect}"] = count
        counts[category] = splits
        log.info("synthetic %s: %s", category, splits)
    summary = DatasetSummary(root, counts, time.perf_counter() - started)
    log.info("wrote %d synthetic images to %s in %.1fs", summary.total_images, root, summary.seconds)
    return summary


# --- scoring archive -------------------------------------------------------------------------

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
    root: str
    files: tuple[ArchiveFile, ...]

    def expecting(self, outcome: str) -> tuple[ArchiveFile, ...]:
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
    root = _normalize_root(root)
    files: list[ArchiveFile] = []

    def write(category: str, name: str, data: bytes, kind: str, expected: str,
              defect: str | None = None, area: int = 0) -> None:
        url = storage.join(root, category, name)
        storage.write_bytes_atomic(url, data)
        files.append(ArchiveFile(url, category, kind, expected, defect, area))

    for category in config.categories:
        code = _category_code(category)
        chooser = np.random.default_rng((config.seed, code, _SPLIT_ARCHIVE, night, 0))
        defects = DEFECTS[category]
        for index in range(n_per_category):
            defect = str(chooser.choice(defects)) if chooser.uniform() < defect_rate else GOOD
            sample = render_sample(category, defect, seed=(config.seed, code, _SPLIT_ARCHIVE, night, 1, index),
                                   image_size=config.image_size)
            write(category, f"{category}_{night:03d}_{index:05d}.png", _png(sample.image), "image", SCORED,
                  defect, int(sample.mask.sum()))

    if include_bad_files:
        gray = next((c for c in config.categories if _CATEGORIES[c].mode == "L"), config.categories[0])
        rgb = next((c for c in config.categories if _CATEGORIES[c].mode == "RGB"), config.categories[0])

        def extra(category: str, index: int) -> np.ndarray:
            seed = (config.seed, _category_code(category), _SPLIT_ARCHIVE, night, 2, index)
            return render_sample(category, seed=seed, image_size=config.image_size).image

        gray_image, rgb_image = extra(gray, 0), extra(rgb, 1)
        as_gray = gray_image if gray_image.ndim == 2 else np.asarray(Image.fromarray(gray_image).convert("L"))
        as_rgb = rgb_image if rgb_image.ndim == 3 else np.repeat(rgb_image[..., None], 3, axis=2)
        first = config.categories[0]
        write(first, "empty.png", b"", "empty", DECODE_ERROR)
        truncated = _png(extra(first, 2))
        write(first, "truncated.png", truncated[: len(truncated) // 2], "truncated", DECODE_ERROR)
        write(first, "notes.jpg", b"camera 3: frame dropped, exposure retry\n", "not_an_image", DECODE_ERROR)
        write(first, "bomb_30000x30000.png", decompression_bomb_png(), "decompression_bomb", DECODE_ERROR)
        write(gray, "gray16.png", _gray16_png(as_gray), "gray16", SCORED, GOOD)
        write(gray, "palette.png", _palette_png(as_gray), "palette", SCORED, GOOD)
        write(rgb, "rgba.png", _rgba_png(as_rgb), "rgba", SCORED, GOOD)
        write(UNKNOWN_CATEGORY, "x.png", _png(extra(first, 3)), "unknown_category", NO_MODEL)

    summary = ArchiveSummary(root, tuple(files))
    log.info("wrote scoring archive %s: %d files, %d scorable, %d defective", root, len(files),
             len(summary.scorable), sum(bool(f.is_defective) for f in summary.scorable))
    return summary


# --- manual use ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic inspection dataset (MVTec AD layout).")
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
