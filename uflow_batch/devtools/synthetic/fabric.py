"""Woven fabric (RGB): a periodic plain weave with holes, floating or missing threads and stains."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .primitives import Defect, Scene, blob, grid, noise2d, ramp, size_factor


_COLOUR = np.array([70, 96, 142], dtype=np.float32)  # an indigo canvas


def render(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = grid(size)
    scale = size / 256
    pitch = rng.uniform(7.4, 8.6) * scale
    theta = np.deg2rad(rng.uniform(-2.5, 2.5))
    xr = xx * np.cos(theta) + yy * np.sin(theta)
    yr = -xx * np.sin(theta) + yy * np.cos(theta)
    u = (xr + 0.7 * scale * noise2d(rng, size, 6 * scale)) / pitch + rng.uniform(0, 2)
    v = (yr + 0.7 * scale * noise2d(rng, size, 6 * scale)) / pitch + rng.uniform(0, 2)
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - iu, v - iv
    warp_on_top = (iu + iv) % 2 == 0
    warp_gain = 1 + 0.05 * rng.standard_normal(4096)
    weft_gain = 1 + 0.05 * rng.standard_normal(4096)
    warp = np.sin(np.pi * fu) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fv)) * warp_gain[iu % 4096]
    weft = np.sin(np.pi * fv) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fu)) * weft_gain[iv % 4096]
    fibres = np.where(warp_on_top, noise2d(rng, size, (2.0 * scale, 0.5 * scale)),
                      noise2d(rng, size, (0.5 * scale, 2.0 * scale)))
    value = np.where(warp_on_top, warp, weft) * (1 + 0.06 * fibres)
    colour = _COLOUR * rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
    weft_colour = colour * 1.12
    gap = colour * 0.28
    thread_colour = np.where(warp_on_top[..., None], colour, weft_colour)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.03, 0.09) * ramp(size, angle)
    pixels = (gap + (thread_colour - gap) * value[..., None]) * light[..., None]
    info = {"u": u, "v": v, "fu": fu, "fv": fv, "iu": iu, "iv": iv, "light": light,
            "colour": colour, "weft_colour": weft_colour, "gap": gap, "pitch": pitch}
    return Scene(pixels.astype(np.float32), info)


def _hole(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    radius = size * (0.012 + 0.035 * size_factor(rng))
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    coverage = blob(rng, size, cx, cy, radius, roughness=0.4, ramp=1.5)[..., None]
    backing = scene.info["gap"] * rng.uniform(0.45, 0.8) * scene.info["light"][..., None]
    region = coverage[..., 0] > 0.1
    return scene.pixels * (1 - coverage) + backing * coverage, region


def _thread(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A floating (un-woven, lying on top) or a missing thread over a segment of one warp or weft thread."""
    size = scene.pixels.shape[0]
    info = scene.info
    warp = rng.uniform() < 0.5
    index_field, frac, along = (info["iu"], info["fu"], info["v"]) if warp else (info["iv"], info["fv"], info["u"])
    row, col = (rng.uniform(0.1, 0.9, size=2) * size).astype(int)
    thread = index_field[row, col]
    span = (0.08 + 0.35 * size_factor(rng)) * size / info["pitch"]
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


def _stain(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.pixels.shape[0]
    radius = size * (0.035 + 0.085 * size_factor(rng))
    cx, cy = rng.uniform(0.12, 0.88, size=2) * size
    coverage = blob(rng, size, cx, cy, radius, roughness=0.35, ramp=radius * 0.7)
    tint = np.array([0.86, 0.8, 0.62], dtype=np.float32) ** rng.uniform(0.5, 1.1)
    region = coverage > 0.1
    return scene.pixels * (1 - coverage[..., None] * (1 - tint)), region


DEFECTS: Mapping[str, Defect] = {"hole": _hole, "thread": _thread, "stain": _stain}
