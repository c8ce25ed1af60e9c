"""Brushed metal (grayscale): an anisotropic machined surface with scratches, dents and oily stains."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from .primitives import Defect, Scene, bezier, blob, grid, lookup, noise1d, noise2d, ramp, size_factor, stroke


def render(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = grid(size)
    theta = np.deg2rad(rng.uniform(-4, 4))
    across = yy * np.cos(theta) - xx * np.sin(theta)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    scale = size / 256
    n = 3 * size
    grain = (
        5.0 * lookup(noise1d(rng, n, 0.7 * scale), across)
        + 3.5 * lookup(noise1d(rng, n, 3.0 * scale), across)
        + 3.0 * lookup(noise1d(rng, n, 14.0 * scale), across)
        + 3.0 * noise2d(rng, size, (0.8 * scale, size / 8))
    )
    base = rng.uniform(110, 150)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(5, 18) * ramp(size, angle)
    band_centre, band_width = rng.uniform(-0.2, 1.2) * size, rng.uniform(0.15, 0.4) * size
    band = rng.uniform(8, 28) * np.exp(-(((along - band_centre) / band_width) ** 2))
    pixels = base + gradient + band + grain * (1 + band / 60)
    return Scene(pixels[..., None].astype(np.float32))


def _scratch(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    length = size * (0.1 + 0.4 * size_factor(rng))
    direction = np.deg2rad(rng.uniform(25, 155)) * rng.choice([-1, 1])
    unit = np.array([np.cos(direction), np.sin(direction)])
    centre = rng.uniform(0.15, 0.85, size=2) * size
    p0, p2 = centre - unit * length / 2, centre + unit * length / 2
    p1 = centre + np.array([-unit[1], unit[0]]) * length * rng.uniform(-0.25, 0.25)
    points, t = bezier(p0, p1, p2)
    width = rng.uniform(0.9, 2.2) * (size / 256) * np.sqrt(np.sin(np.pi * np.clip(t, 0.03, 0.97)))
    alpha = stroke(size, points, width)
    amplitude = rng.uniform(22, 45) * (1 if rng.uniform() < 0.6 else -1)
    region = alpha > 0.1
    return scene.pixels + amplitude * alpha[..., None], region


def _dent(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    sigma = size * (0.012 + 0.025 * size_factor(rng))
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    yy, xx = grid(size)
    dx, dy = (xx - cx) / sigma, (yy - cy) / (sigma * rng.uniform(0.7, 1.3))
    height = np.exp(-(dx ** 2 + dy ** 2) / 2) * rng.choice([-1, 1])  # a dent or a raised bump
    light = rng.uniform(0, 2 * np.pi)
    slope = -(dx * np.cos(light) + dy * np.sin(light)) * height  # derivative of the height along the light
    amplitude = rng.uniform(14, 32)
    shading = amplitude / 0.607 * slope - 0.35 * amplitude * np.abs(height)
    region = dx ** 2 + dy ** 2 < 2.3 ** 2
    return scene.pixels + shading[..., None], region


def _stain(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    radius = size * (0.035 + 0.085 * size_factor(rng))
    cx, cy = rng.uniform(0.12, 0.88, size=2) * size
    coverage = blob(rng, size, cx, cy, radius, roughness=0.35, ramp=radius * 0.7)
    strength = rng.uniform(0.06, 0.14)
    region = coverage > 0.1
    # An oily film darkens the surface and flattens the grain's contrast a little.
    mean = ndimage.uniform_filter(scene.pixels[..., 0], size=9)[..., None]
    flattened = mean + (scene.pixels - mean) * (1 - 0.4 * coverage[..., None])
    return flattened * (1 - strength * coverage[..., None]), region


DEFECTS: Mapping[str, Defect] = {"scratch": _scratch, "dent": _dent, "stain": _stain}
