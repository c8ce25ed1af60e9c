"""The background model of the scan test, fitted on held-out normal images, and its measured promise.

A test calibrated on N(0, I) noise is only as good as the flow's fit: on
normal images it did not train on, a flow's latents are over-dispersed and
neighbouring cells are correlated, and the theoretical chi-square tail then
floods good parts with detections. So, per (scale, window), the block sums S
of the held-out normal split of train/good (the split training already
carves out; never test images, never defective ones) are fitted with a
scaled chi-square s * chi2(k):

- k and s match two *upper* quantiles of S, the higher one with at least
  ``MIN_TAIL`` samples beyond it and the lower one halfway there in log tail
  probability, so the fit describes the tail the test lives in rather than
  the bulk; k is never above the theoretical w^2 C (a lighter tail than the
  independent-Gaussian one is not trusted).
- Where there are enough samples (the fine grids), the top 1 % is modelled
  by a generalized Pareto tail fitted to its own exceedances (peaks over
  threshold): real normal images' extremes fall off more slowly than any
  chi-square, and a test extrapolated from the bulk's shape flags good parts
  far more often than it promises.
- Then the whole test is run on the same held-out images. Real normal
  images have atypical spots that no two-parameter fit foresees, so the
  NFA is multiplied by the smallest factor (``log10_factor``) after which,
  on the n held-out images, (a) at the smallest epsilon below 1 of
  ``CORRECTION_EPSILONS`` that n images can measure (epsilon * n >= 1:
  0.1 for 15 images, 0.01 for 100; none under 10 images) at most
  epsilon * n of them are flagged, and (b) at every larger one up to 100
  the mean number of detections per image stays at or below epsilon,
  counted over the images that (a) does not tolerate. Real train/good folders hold the odd part that looks
  defective (MTD's do); (a) tolerates it at the rate it claims, instead of
  letting one such image, with its many spots, make the test blind. A
  detection is one connected region of the NFA map below epsilon, as an
  analyst sees it: the overlapping windows that fire on one spot are one. The image
  verdict (epsilon = 0.01 by default) is, with 15 held-out images, one
  decade beyond what they can measure and relies on the fitted tail;
  evaluation on test/good checks it.
- Last, the image level. The fits are per cell, pooled over the held-out
  images, so they cannot see that normal images differ from one another as
  wholes (lighting, texture, a station's drift): after the correction, an
  image's significance (-log10 of its smallest NFA) still spreads far wider
  over normal images than a calibrated one would, whose law is
  P(significance > t) = 10^-t. So the upper half of the typical held-out
  images' significances is fitted with an exponential tail (peaks over
  their median; the shape that -log of a p-value has under any null, its
  scale free but never lighter than the calibrated one), and an image's
  smallest NFA is raised to that tail's probability where the tail is the
  more cautious of the two (``ImageTail``). The verdict at a rate below
  what the held-out images can measure (0.01 with 15) then extrapolates the
  spread of whole normal images, not only that of their cells.

What was measured after the correction is recorded (``FalseAlarms``) and
travels in the model manifest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage, stats

from .anomaly import NFAMaps

if TYPE_CHECKING:  # the test imports this module for its background model
    from .scan_nfa import ScanNFA

# 8-connectivity, as the regions of a mask.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)

MIN_TAIL = 20
MIN_SAMPLES = 200
TAIL_MASS = 0.01
MIN_EXCEEDANCES = 100
MIN_IMAGE_EXCEEDANCES = 3
CORRECTION_EPSILONS = (0.01, 0.1, 1.0, 10.0, 100.0)
REPORT_EPSILONS = (0.01, 0.1, 1.0, 10.0, 100.0)


_LN10 = math.log(10.0)
_UNDERFLOW = 1e-280


@functools.lru_cache(maxsize=1024)
def _chi2_isf(tail: float, dof: float) -> float:
    """The chi2(dof) value with upper tail probability ``tail`` (scipy, float64)."""
    return float(stats.chi2.isf(tail, dof))


def log10_chi2_sf(x: torch.Tensor, dof: float) -> torch.Tensor:
    """log10 P(chi2(dof) >= x) elementwise, float64, finite for any x >= 0."""
    x = x.to(torch.float64)
    a = torch.full_like(x, dof / 2.0)
    y = (x / 2.0).clamp_min(0.0)
    q = torch.special.gammaincc(a, y)
    # Gamma(a, y) ~ y^(a-1) e^-y (1 + (a-1)/y + ...) for y >> a, the only place it underflows.
    safe_y = y.clamp_min(1e-300)
    asymptotic = ((a - 1.0) * torch.log(safe_y) - y - torch.lgamma(a) + torch.log1p((a - 1.0) / safe_y)) / _LN10
    return torch.where(q < _UNDERFLOW, asymptotic, torch.log10(q.clamp_min(_UNDERFLOW)))


@dataclass(frozen=True)
class BackgroundFit:
    """The law of one (scale, window) family's statistic S under the background model.

    The bulk is S / scale ~ chi2(dof). Above ``tail_start`` (where a share
    ``tail_mass`` of the held-out samples lies), when there were enough of
    them, a generalized Pareto tail with shape ``tail_shape`` >= 0 and scale
    ``tail_scale`` takes over: the peaks-over-threshold model of extreme
    value theory, which extrapolates a tail from its own exceedances instead
    of from the shape of the bulk. ``log10_factor`` multiplies this family's
    NFA: its share of the correction (see :func:`family_corrections`).
    """

    scale: float
    dof: float
    log10_factor: float = 0.0
    tail_start: float | None = None
    tail_mass: float = 1.0
    tail_shape: float = 0.0
    tail_scale: float = 1.0

    def log10_sf(self, sums: torch.Tensor) -> torch.Tensor:
        """log10 P(S >= sums) under this fit, times the family's factor, float64."""
        bulk = log10_chi2_sf(sums / self.scale, self.dof)
        if self.tail_start is None:
            return bulk + self.log10_factor
        log10_mass = math.log10(self.tail_mass)
        excess = (sums.to(torch.float64) - self.tail_start).clamp_min(0.0)
        if self.tail_shape > 1e-9:
            tail = log10_mass - torch.log1p(self.tail_shape * excess / self.tail_scale) / (self.tail_shape * _LN10)
        else:
            tail = log10_mass - excess / (self.tail_scale * _LN10)
        return torch.where(sums > self.tail_start, tail, bulk.clamp_min(log10_mass)) + self.log10_factor

    def statistic_at(self, log10_p: float) -> float:
        """The S at which log10 P (before the family's factor) falls to ``log10_p``."""
        if self.tail_start is None or log10_p >= math.log10(self.tail_mass):
            return self.scale * _chi2_isf(10.0**log10_p, self.dof)
        ratio = 10.0 ** (log10_p - math.log10(self.tail_mass))  # P(S >= s | S > tail_start)
        if self.tail_shape > 1e-9:
            return self.tail_start + self.tail_scale / self.tail_shape * (ratio ** (-self.tail_shape) - 1.0)
        return self.tail_start - self.tail_scale * math.log(ratio)


@dataclass(frozen=True)
class ImageTail:
    """P(significance > t) = ``mass`` * exp(-(t - ``start``) / ``scale``) over normal images (significance in log10 units).

    ``start`` is the typical held-out images' median significance and
    ``mass`` their share above it; ``scale`` is at least 1 / ln 10, the
    calibrated law's, so the tail never makes the test bolder.
    """

    start: float
    mass: float
    scale: float

    def log10_p(self, min_log10_nfa: torch.Tensor) -> torch.Tensor:
        """log10 of the tail's probability of an image at least this significant, elementwise."""
        return math.log10(self.mass) - (-min_log10_nfa - self.start) / (self.scale * _LN10)


def fit_image_tail(significances: Sequence[float]) -> ImageTail | None:
    """The exponential tail of the typical held-out images' significances above their median, if it can be fitted.

    The exponential is the law of -log of a p-value under the null, so only
    its scale and start are fitted: with 15 held-out images, a free shape
    would be a guess. Fewer than ``MIN_IMAGE_EXCEEDANCES`` images above the
    median (the rest at the NFA ceiling, say) give no tail.
    """
    values = np.asarray(significances, dtype=np.float64)
    start = float(np.median(values)) if values.size else 0.0
    excess = values[values > start] - start
    if excess.size < MIN_IMAGE_EXCEEDANCES:
        return None
    return ImageTail(start, excess.size / values.size, max(float(excess.mean()), 1.0 / _LN10))


@dataclass(frozen=True)
class FalseAlarms:
    """What the test does on held-out normal images: the a-contrario promise, measured."""

    n_images: int
    epsilons: tuple[float, ...]
    detections_per_image: tuple[float, ...]
    images_flagged: tuple[float, ...]


# Version 2: the scan test combines the scales at each cell (version 1 took the minimum over
# per-scale tests); a correction factor measured for one does not hold for the other.
CALIBRATION_VERSION = 2


@dataclass(frozen=True)
class Calibration:
    """Background fits per (scale, window), the NFA correction factor, and what was measured."""

    fits: dict[str, BackgroundFit]
    log10_factor: float = 0.0
    n_images: int = 0  # held-out images fitted on; 0 for the theoretical N(0, I) model
    false_alarms: FalseAlarms | None = None
    version: int = CALIBRATION_VERSION
    image_tail: ImageTail | None = None  # None: the image's smallest NFA is its verdict as it is

    def fit(self, scale: int, window: int) -> BackgroundFit:
        return self.fits[_key(scale, window)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        alarms = data.get("false_alarms")
        return cls(
            fits={key: BackgroundFit(**fit) for key, fit in data["fits"].items()},
            log10_factor=float(data.get("log10_factor", 0.0)),
            n_images=int(data.get("n_images", 0)),
            false_alarms=None if alarms is None else FalseAlarms(**{k: tuple(v) if isinstance(v, list) else v for k, v in alarms.items()}),
            version=int(data.get("version", 1)),
            image_tail=None if data.get("image_tail") is None else ImageTail(**data["image_tail"]),
        )


def _key(scale: int, window: int) -> str:
    return f"{scale}/{window}"


def theoretical_calibration(latent_shapes: Sequence[Sequence[int]], windows: Sequence[int]) -> Calibration:
    """Latents exactly N(0, I) and independent: S ~ chi2(w^2 C)."""
    return Calibration(fits={
        _key(scale, window): BackgroundFit(1.0, _theoretical_dof(latent_shapes, scale, window))
        for scale in range(len(latent_shapes)) for window in windows
    })


def fit_tail(samples: np.ndarray, dof: float) -> BackgroundFit:
    """The scaled chi-square bulk, and a generalized Pareto tail where the samples allow one.

    The tail starts at the top ``TAIL_MASS`` of the samples (at least
    ``MIN_EXCEEDANCES`` of them beyond it) and is fitted by maximum
    likelihood; a bounded tail (negative shape) is not trusted and becomes
    the exponential one.
    """
    samples = np.asarray(samples, dtype=np.float64).ravel()
    bulk = fit_scaled_chi2(samples, dof)
    if samples.size * TAIL_MASS < MIN_EXCEEDANCES:
        return bulk
    start = float(np.quantile(samples, 1.0 - TAIL_MASS))
    excess = samples[samples > start] - start
    if excess.size < MIN_EXCEEDANCES or not np.any(excess > 0):
        return bulk
    shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
    if shape < 0:
        shape, scale = 0.0, float(excess.mean())
    return replace(bulk, tail_start=start, tail_mass=excess.size / samples.size, tail_shape=float(shape), tail_scale=float(scale))


def fit_scaled_chi2(samples: np.ndarray, dof: float) -> BackgroundFit:
    """Scaled chi-square through two upper quantiles of ``samples`` (see the module docstring)."""
    samples = np.asarray(samples, dtype=np.float64).ravel()
    if samples.size < MIN_SAMPLES:
        return _moments_fit(samples, dof)
    tail_hi = max(MIN_TAIL / samples.size, 1e-4)
    tail_lo = math.sqrt(tail_hi)
    q_lo, q_hi = np.quantile(samples, [1.0 - tail_lo, 1.0 - tail_hi])
    if q_lo <= 0:
        return _moments_fit(samples, dof)

    def ratio(k: float) -> float:
        return float(stats.chi2.isf(tail_hi, k) / stats.chi2.isf(tail_lo, k))

    target = q_hi / q_lo
    k = dof
    if target > ratio(dof):  # heavier tail than theory: fewer degrees of freedom (ratio falls with k)
        low, high = math.log(1e-2), math.log(dof)
        for _ in range(60):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if ratio(math.exp(mid)) > target else (low, mid)
        k = math.exp(0.5 * (low + high))
    return BackgroundFit(float(q_lo / stats.chi2.isf(tail_lo, k)), float(k))


def detections(log10_nfa: np.ndarray, min_log10_nfa: float, epsilon: float) -> int:
    """Distinct detections in one image at ``epsilon``: connected regions of its NFA map below it.

    Overlapping tests that fire on one spot are one detection, as an analyst
    sees them (one region of the mask). A test that fires with no cell of
    the map below epsilon (a block whose cells each look ordinary) still
    counts once, since it flags the image.
    """
    level = math.log10(epsilon)
    _, count = ndimage.label(log10_nfa < level, structure=_CONNECTIVITY)
    return max(count, int(min_log10_nfa < level))


def _moments_fit(samples: np.ndarray, dof: float) -> BackgroundFit:
    """Too few samples for a tail (a coarse grid, few images): match mean and variance, k capped at the theory's.

    Keeping the theoretical shape here would trust independence exactly
    where correlation makes the tail heaviest.
    """
    if samples.size < 2:
        return BackgroundFit(1.0, dof)
    mean, variance = float(samples.mean()), float(samples.var(ddof=1))
    if mean <= 0 or variance <= 0:
        return BackgroundFit(max(mean / dof, 1e-12), dof)
    k = min(dof, 2.0 * mean * mean / variance)
    return BackgroundFit(mean / k, k)


def false_alarms(maps: Sequence[NFAMaps], epsilons: Sequence[float] = REPORT_EPSILONS, log10_factor: float = 0.0) -> FalseAlarms:
    """Mean detections per image and the fraction of images flagged at each epsilon, on normal images' maps."""
    images = _per_image(maps, log10_factor)
    counts = [[detections(m, low, e) for m, low in images] for e in epsilons]
    flagged = [[low < math.log10(e) for _, low in images] for e in epsilons]
    return FalseAlarms(len(images), tuple(epsilons), tuple(float(np.mean(c)) for c in counts),
                       tuple(float(np.mean(f)) for f in flagged))


def correction(maps: Sequence[NFAMaps], epsilons: Sequence[float] = CORRECTION_EPSILONS, step: float = 0.05) -> float:
    """The smallest log10 factor f >= 0 after which the held-out images keep the promise (see the module docstring).

    Region counts are not strictly monotone in f (two spots can merge), so
    f is the lowest point of a grid from which the promise holds at every
    larger point.
    """
    images = sorted(_per_image(maps, 0.0), key=lambda image: image[1])
    smallest = _smallest_measurable(len(images), epsilons)
    tolerated = tolerated_images(len(images), epsilons)
    typical = images[tolerated:]
    larger = [e for e in epsilons if smallest is None or e > smallest]

    def kept(factor: float) -> bool:
        if smallest is not None and sum(low + factor < math.log10(smallest) for _, low in images) > tolerated:
            return False
        return all(
            sum(detections(m + factor, low + factor, e) for m, low in typical) <= math.floor(e * len(typical) + 1e-9)
            for e in larger
        )

    steps = math.ceil(max(0.0, math.log10(max(epsilons)) - images[0][1]) / step) + 1  # beyond: nothing detected at all
    lowest = steps
    while lowest > 0 and kept((lowest - 1) * step):
        lowest -= 1
    return lowest * step


def _per_image(maps: Sequence[NFAMaps], log10_factor: float) -> list[tuple[np.ndarray, float]]:
    return [
        (m.log10_nfa[i].cpu().numpy() + log10_factor, float(m.min_log10_nfa[i]) + log10_factor)
        for m in maps for i in range(len(m.min_log10_nfa))
    ]


def fit_background(test: ScanNFA, latent_batches: Iterable[Sequence[torch.Tensor]]) -> Calibration:
    """Fit the scan test's background on held-out normal latents, correct it, and measure it.

    The fit is made twice: the images that the correction tolerates as
    atypical (see :func:`correction`) are left out of the second one, so
    one odd part does not give every test a tail so heavy it sees nothing;
    they are left out of the image tail too. The test's calibration is
    replaced.
    """
    batches = [list(b) for b in latent_batches]
    statistics = {key: torch.cat([values[key] for values in map(test.statistics, batches)]) for key in test.tests}
    n_images = sum(len(b[0]) for b in batches)
    keep = torch.ones(n_images, dtype=torch.bool)
    for _ in range(2):
        test.calibration = _fitted(test, {key: values[keep] for key, values in statistics.items()}, n_images)
        test.calibration = family_corrections(test, statistics, n_images)
        maps = [test(b) for b in batches]
        significance = torch.cat([m.min_log10_nfa.cpu() for m in maps])
        keep = torch.ones(n_images, dtype=torch.bool)
        keep[torch.argsort(significance)[: tolerated_images(n_images)]] = False
    from .scan_nfa import NFA_CEILING  # the test's module imports this one

    factor = correction(maps, CORRECTION_EPSILONS)
    test.calibration = replace(test.calibration, log10_factor=factor)
    corrected = -(significance + factor).clamp_max(math.log10(NFA_CEILING))  # what the corrected test gives, without a pass
    typical = torch.sort(corrected, descending=True).values[tolerated_images(n_images):]
    test.calibration = replace(test.calibration, image_tail=fit_image_tail(typical.tolist()))
    test.calibration = replace(test.calibration, false_alarms=false_alarms([test(b) for b in batches]))
    return test.calibration


def family_corrections(test: ScanNFA, statistics: dict[tuple[int, int], torch.Tensor], n_images: int) -> Calibration:
    """Give each (scale, window) family the factor that keeps its own held-out false alarms at the measurable level.

    Families are not equally well fitted: a coarse grid gives a few hundred
    samples where the finest gives tens of thousands, so its tail is the
    least certain. Correcting each family on its own (at most the tolerated
    number of held-out images reach NFA < epsilon through it, at the
    smallest measurable epsilon) keeps a poorly fitted family from blinding
    the well fitted ones; the global correction then keeps the promise of
    all families together.
    """
    offset = test.log10_n_tests
    smallest = _smallest_measurable(n_images, CORRECTION_EPSILONS) or 1.0
    tolerated = tolerated_images(n_images)
    fits = dict(test.calibration.fits)
    for (scale, window), values in statistics.items():
        fit = replace(fits[_key(scale, window)], log10_factor=0.0)
        fits[_key(scale, window)] = fit
        test.calibration = replace(test.calibration, fits=fits)
        minima = torch.sort(test.log10_p({(scale, window): values})[scale, window].flatten(1).amin(dim=1)).values + offset
        if tolerated < len(minima):
            needed = math.log10(smallest) - float(minima[tolerated])
            fits[_key(scale, window)] = replace(fit, log10_factor=max(0.0, needed))
    return replace(test.calibration, fits=fits)


def _smallest_measurable(n_images: int, epsilons: Sequence[float]) -> float | None:
    """The smallest epsilon below 1 at which n images can show a false alarm (epsilon * n >= 1), if any."""
    return min((e for e in epsilons if e < 1.0 and e * n_images >= 1.0), default=None)


def tolerated_images(n_images: int, epsilons: Sequence[float] = CORRECTION_EPSILONS) -> int:
    """How many of n held-out normal images may be flagged at the smallest epsilon they can measure.

    None with fewer than 10 images: too few to tell an atypical part from a badly fitted background.
    """
    smallest = _smallest_measurable(n_images, epsilons)
    return 0 if smallest is None else int(math.floor(smallest * n_images + 1e-9))


def _fitted(test: ScanNFA, statistics: dict[tuple[int, int], torch.Tensor], n_images: int) -> Calibration:
    theory = theoretical_calibration(test.latent_shapes, test.config.scan_windows)
    fits = dict(theory.fits)  # tests skipped on small grids keep the theory
    for (scale, window), values in statistics.items():
        fits[_key(scale, window)] = fit_tail(values.flatten().cpu().numpy(), theory.fit(scale, window).dof)
    return Calibration(fits=fits, n_images=n_images)


def _theoretical_dof(latent_shapes: Sequence[Sequence[int]], scale: int, window: int) -> float:
    return float(window * window * latent_shapes[scale][0])
