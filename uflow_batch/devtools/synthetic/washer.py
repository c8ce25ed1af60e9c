"""A washer on a conveyor belt (RGB): a centred round part with cracks, chipped edges and rust."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from .primitives import Defect, Scene, blob, lookup, noise1d, noise2d, polar, ramp, size_factor, stroke


def render(rng: np.random.Generator, size: int) -> Scene:
    scale = size / 256
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04, size=2) * size
    outer = size * 0.34 * rng.uniform(0.97, 1.03)
    inner = outer * rng.uniform(0.46, 0.52)
    distance, angle = polar(size, cx, cy)
    coverage = np.clip(outer - distance + 0.5, 0, 1) * np.clip(distance - inner + 0.5, 0, 1)
    light = np.deg2rad(225 + rng.uniform(-25, 25))
    # A turned face reflects in a bow-tie pattern; bevels catch the light on the lit side.
    face = rng.uniform(150, 175) * (1 + 0.14 * np.cos(2 * (angle - light)) + 0.06 * np.cos(angle - light))
    grooves = 4.0 * lookup(noise1d(rng, 3 * size, 0.8 * scale), distance) + 3.0 * lookup(
        noise1d(rng, 3 * size, 5 * scale), distance)
    bevel = rng.uniform(2.0, 3.5) * scale
    outer_bevel = np.clip(1 - (outer - distance) / bevel, 0, 1)
    inner_bevel = np.clip(1 - (distance - inner) / bevel, 0, 1)
    material = face + grooves + 45 * np.cos(angle - light) * (outer_bevel - inner_bevel)
    tint = np.array([1.0, 1.0, 1.03], dtype=np.float32) * rng.uniform(0.98, 1.02, size=3)
    material = material[..., None] * tint

    belt = np.array([58, 62, 66], dtype=np.float32) * rng.uniform(0.9, 1.1)
    background = belt * (1 + 0.05 * noise2d(rng, size, 1.0 * scale)[..., None]
                         + 0.04 * noise2d(rng, size, 30 * scale)[..., None])
    offset = -np.array([np.cos(light), np.sin(light)]) * rng.uniform(2, 5) * scale
    shadow = ndimage.gaussian_filter(ndimage.shift(coverage, (offset[1], offset[0]), order=1), 3 * scale)
    shadowed = background * (1 - 0.45 * shadow[..., None])

    tilt = rng.uniform(0, 2 * np.pi)
    illumination = (1 + rng.uniform(0.02, 0.07) * ramp(size, tilt))[..., None]
    pixels = (coverage[..., None] * material + (1 - coverage[..., None]) * shadowed) * illumination
    info = {"cx": cx, "cy": cy, "outer": outer, "inner": inner, "coverage": coverage,
            "material": material, "background": background, "illumination": illumination}
    return Scene(pixels.astype(np.float32), info)


def _crack(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    info = scene.info
    from_outer = rng.uniform() < 0.5
    start_angle = rng.uniform(0, 2 * np.pi)
    radius = info["outer"] - 1 if from_outer else info["inner"] + 1
    position = np.array([info["cx"] + radius * np.cos(start_angle), info["cy"] + radius * np.sin(start_angle)])
    heading = start_angle + (np.pi if from_outer else 0) + rng.uniform(-0.4, 0.4)
    length = (info["outer"] - info["inner"]) * (0.3 + 0.6 * size_factor(rng))
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
    alpha = stroke(size, points, width)
    region = (alpha > 0.1) & (info["coverage"] > 0.3)
    darkening = rng.uniform(0.45, 0.7)
    return scene.pixels * (1 - darkening * alpha[..., None]), region


def _chip(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Missing material bitten out of the outer (or, less often, the inner) edge.

    The gap shows the belt as it is away from the part's shadow (no material
    above it casts one); the shadow outside the gap is left as it was, since
    the mask must cover only the pixels of the missing material.
    """
    size = scene.pixels.shape[0]
    info = scene.info
    radius = size * (0.015 + 0.04 * size_factor(rng))
    edge = info["outer"] if rng.uniform() < 0.75 else info["inner"]
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = info["cx"] + edge * np.cos(angle), info["cy"] + edge * np.sin(angle)
    bite = blob(rng, size, cx, cy, radius, roughness=0.35, ramp=1.0)
    coverage = info["coverage"] * (1 - bite)
    coverage = coverage[..., None]
    target = (coverage * info["material"] + (1 - coverage) * info["background"]) * info["illumination"]
    region = bite * info["coverage"] > 0.05
    return target, region


def _rust(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    info = scene.info
    radius = size * (0.02 + 0.045 * size_factor(rng))
    ring = info["inner"] + (info["outer"] - info["inner"]) * rng.uniform(0.3, 0.7)
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = info["cx"] + ring * np.cos(angle), info["cy"] + ring * np.sin(angle)
    coverage = blob(rng, size, cx, cy, radius, roughness=0.45, ramp=radius * 0.5)
    patchy = coverage * (0.7 + 0.3 * np.clip(noise2d(rng, size, 2.0 * size / 256), -1, 1))
    region = (coverage > 0.1) & (info["coverage"] > 0.5)
    rust = np.array([150, 88, 48], dtype=np.float32) * info["illumination"]
    amount = rng.uniform(0.2, 0.45) * patchy[..., None]
    return scene.pixels * (1 - amount) + rust * amount, region


DEFECTS: Mapping[str, Defect] = {"crack": _crack, "chip": _chip, "rust": _rust}
