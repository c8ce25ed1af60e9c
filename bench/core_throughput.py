#!/usr/bin/env python
"""Core scoring throughput: backbone alone vs full scoring, and the NFA vs a scipy reference.

Why this exists: the backbone is the part of scoring we cannot make cheaper
(it is frozen and pre-trained), so everything U-Flow adds on top of it (the
flow, the anomaly map, the verdict's a-contrario test, masks and regions at
original resolution) should cost little next to it. Target: full scoring at
>= 70% of the images/s of the backbone forward alone. Each test's cost is
printed beside the backbone's. The paper's block test is vectorized with a
tabulated binomial tail; it must stay well ahead of the obvious per-pixel
scipy implementation (target: >= 50x) while giving the same numbers (1e-6
relative). The scan test's exactness is checked in tests/test_scan_nfa.py.

Both sides of every comparison see the same images, decoded and resized once
up front (decoding is not part of either side), in the same batches. Warm-up
iterations are never timed; on CUDA every timed region is bracketed by
``torch.cuda.synchronize()``.

    .venv/bin/python bench/core_throughput.py --quick
    .venv/bin/python bench/core_throughput.py --images 256 --batch-size 16
    .venv/bin/python bench/core_throughput.py --device cuda --images 1024 --batch-size 64
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import special, stats

from uflow_batch import data
from uflow_batch.checkpoint import load_detector
from uflow_batch.config import NFA_TESTS, BackboneConfig, DetectorConfig
from uflow_batch.model import UFlowDetector, build_nfa, resolve_device
from uflow_batch.model.nfa import BlockNFA

DEFAULT_DATA = os.environ.get("UFLOW_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")) + "/mtd"
FULL_TARGET = 0.70  # full scoring images/s over backbone-only images/s
NFA_TARGET = 50.0  # torch NFA speed-up over the per-pixel scipy reference
NFA_RTOL = 1e-6


# --- setup ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, H, W) at the model's input size, on the CPU like the pipeline's
    sizes: list[tuple[int, int]]  # original (height, width) of each image


def image_paths(root: Path, count: int) -> list[Path]:
    """``count`` PNGs taken round-robin over categories (train and test), so every category is represented."""
    per_category = []
    for category in sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir()):
        files = sorted((category / "train" / "good").glob("*.png")) + sorted((category / "test").glob("*/*.png"))
        per_category.append(files)
    if not per_category:
        raise SystemExit(f"no category with train/good under {root}")
    chosen: list[Path] = []
    for index in range(max(len(files) for files in per_category)):
        for files in per_category:
            if index < len(files) and len(chosen) < count:
                chosen.append(files[index])
    if len(chosen) < count:
        raise SystemExit(f"asked for {count} images but {root} holds only {len(chosen)}")
    return chosen


def load_batches(paths: list[Path], size: tuple[int, int], batch_size: int) -> list[Batch]:
    """Decode and resize once; both sides of the comparison then reuse exactly these tensors."""
    images, sizes = [], []
    for path in paths:
        decoded = data.decode_image(path.read_bytes())
        sizes.append((int(decoded.shape[0]), int(decoded.shape[1])))
        images.append(data.resize_to_model(decoded, size))
    stacked = torch.stack(images)
    return [Batch(stacked[i : i + batch_size], sizes[i : i + batch_size]) for i in range(0, len(paths), batch_size)]


def build_detector(args: argparse.Namespace, device: torch.device) -> tuple[UFlowDetector, str]:
    if args.model:
        return load_detector(args.model, device=device), f"trained model {args.model}"
    config = DetectorConfig(backbone=BackboneConfig(input_size=tuple(args.input_size or (256, 256))))
    detector = UFlowDetector(config).to(device).eval()
    return detector, "untrained flow, default DetectorConfig (flow weights do not change the cost)"


def check_input_size(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--input-size H [W]`` for the untrained detector: one side means a square."""
    if args.input_size is None:
        return
    if args.model:
        parser.error("--input-size is fixed by --model")
    if len(args.input_size) == 1:
        args.input_size = args.input_size * 2
    if len(args.input_size) != 2:
        parser.error("--input-size takes a height and optionally a width")


def prepare(args: argparse.Namespace, device: torch.device | None = None) -> tuple[torch.device, UFlowDetector, str, list[Batch]]:
    """Threads, device, detector and the decoded batches every benchmark here starts from (``device``: a fixed one)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device or resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    detector, what = build_detector(args, device)
    batches = load_batches(image_paths(Path(args.data), args.images), detector.input_size, args.batch_size)
    return device, detector, what, batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of ``fn`` with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


# --- backbone vs full scoring -----------------------------------------------------------------

STAGES = ("backbone", "flow", "maps", "results")


@torch.no_grad()
def staged_score(detector: UFlowDetector, batch: Batch, device: torch.device) -> dict[str, float]:
    """The steps of ``UFlowDetector.score`` run one by one, each timed on its own.

    The production steps of ``score_maps`` + ``results``; the report prints the sum of the stages
    next to the measured full scoring so a drift between the two shows.
    """
    seconds: dict[str, float] = {}
    seconds["backbone"], features = timed(device, lambda: detector.features(batch.images))
    seconds["flow"], (latents, _) = timed(device, lambda: detector.latents(features))
    seconds["maps"], maps = timed(device, lambda: detector.maps_from_latents(latents))
    seconds["results"], _ = timed(device, lambda: detector.results(maps, batch.sizes))
    return seconds


def compare_backbone_and_full(detector: UFlowDetector, batches: list[Batch], device: torch.device,
                              rounds: int, warmup: int) -> None:
    n_images = sum(len(b.sizes) for b in batches)

    def backbone_pass() -> float:
        return sum(timed(device, lambda b=b: detector.features(b.images))[0] for b in batches)

    def full_pass() -> float:
        return sum(timed(device, lambda b=b: detector.score(b.images, b.sizes))[0] for b in batches)

    for index in range(warmup):  # warm-up: allocator, kernels, caches; never timed
        batch = batches[index % len(batches)]
        detector.features(batch.images)
        detector.score(batch.images, batch.sizes)
        staged_score(detector, batch, device)
    synchronize(device)

    backbone_s, full_s = [], []
    stages = {name: 0.0 for name in STAGES}
    # Rounds alternate the two sides so that load from other processes hits both alike.
    for round_index in range(rounds):
        backbone_s.append(backbone_pass())
        full_s.append(full_pass())
        for batch in batches:
            for name, seconds in staged_score(detector, batch, device).items():
                stages[name] += seconds
        print(f"  round {round_index + 1}/{rounds}: backbone {n_images / backbone_s[-1]:8.2f} img/s   "
              f"full {n_images / full_s[-1]:8.2f} img/s")

    backbone_rate = n_images * rounds / sum(backbone_s)
    full_rate = n_images * rounds / sum(full_s)
    ratio = full_rate / backbone_rate
    print(f"\nA  backbone forward only (detector.features): {backbone_rate:9.2f} images/s  ({1000 / backbone_rate:8.2f} ms/image)")
    print(f"B  full scoring (detector.score)            : {full_rate:9.2f} images/s  ({1000 / full_rate:8.2f} ms/image)")
    print(f"B/A = {ratio:.3f}   target >= {FULL_TARGET:.2f}   -> {'meets' if ratio >= FULL_TARGET else 'BELOW'} target")

    total_ms = {name: 1000 * s / (n_images * rounds) for name, s in stages.items()}
    staged_sum = sum(total_ms.values())
    print("\nbreakdown of full scoring (stages timed one by one, ms per image):")
    for name in STAGES:
        print(f"  {name:<12} {total_ms[name]:9.3f} ms   {100 * total_ms[name] / staged_sum:5.1f}%")
    print(f"  {'sum':<12} {staged_sum:9.3f} ms   (full scoring measured whole: {1000 / full_rate:.3f} ms)")


# --- NFA: torch vs the per-pixel scipy reference -------------------------------------------------

def reference_candidate_maps(latents: list[np.ndarray], p: float) -> list[np.ndarray]:
    """Candidates per position (how many channels have z^2 above the chi-square(1) quantile at p)."""
    threshold = stats.chi2.ppf(p, 1)
    return [(z**2 > threshold).sum(axis=1) for z in latents]  # (N, H_l, W_l) per scale


def reference_log10_p(candidates: np.ndarray, i: int, j: int, window: int, channels: int, p: float) -> float:
    """log10 P(Bin(w^2, 1-p) >= K/C) for one pixel, block clipped at the borders, straight from scipy.

    Written independently of ``uflow_batch.model.nfa`` (no tables, no pooling):
    the number the vectorized code must reproduce.
    """
    half, n = window // 2, window * window
    block = candidates[max(0, i - half) : i + half + 1, max(0, j - half) : j + half + 1]
    x = float(block.sum()) / channels
    return 0.0 if x == 0 else math.log10(special.betainc(x, n - x + 1, 1 - p))


def compare_tests(detector: UFlowDetector, batches: list[Batch], latents_per_batch: list, device: torch.device,
                  repeats: int) -> None:
    """Each a-contrario test alone on the same latents, beside the backbone: what the verdict costs."""
    n_images = sum(len(b.sizes) for b in batches)
    with torch.no_grad():
        backbone_s = sum(timed(device, lambda b=b: detector.features(b.images))[0] for b in batches)
    print(f"\ncost of the verdict per image (same {n_images} images; backbone {1000 * backbone_s / n_images:.2f} ms/image):")
    for name in NFA_TESTS:
        test = build_nfa(detector.flow.latent_shapes, replace(detector.config.nfa, test=name),
                         detector.nfa.calibration if name == detector.config.nfa.test else None).to(device)
        with torch.no_grad():
            for latents in latents_per_batch:
                test(latents)  # warm-up, not timed
            seconds = sum(timed(device, lambda z=latents: test(z))[0] for _ in range(repeats) for latents in latents_per_batch) / repeats
        print(f"  {name:<6} test: {1000 * seconds / n_images:8.3f} ms/image = {seconds / backbone_s:6.3f} x the backbone")


def compare_nfa(detector: UFlowDetector, batches: list[Batch], device: torch.device, repeats: int,
                ref_pixels: int, seed: int) -> None:
    """The paper's block test (vectorized, tabulated) against a per-pixel scipy reference."""
    nfa = BlockNFA(detector.flow.latent_shapes, replace(detector.config.nfa, test="block")).to(device)
    p, windows = nfa.config.p, nfa.windows
    with torch.no_grad():
        latents_per_batch = [detector.latents(detector.features(b.images))[0] for b in batches]
    synchronize(device)
    compare_tests(detector, batches, latents_per_batch, device, repeats)
    n_images = sum(len(b.sizes) for b in batches)
    shapes = [tuple(z.shape[1:]) for z in latents_per_batch[0]]
    used = shapes[: len(windows)]
    print(f"\nNFA on the latents of the same {n_images} images: scales taking part "
          f"{[f'{c}x{h}x{w} (window {win})' for (c, h, w), win in zip(used, windows)]}, p={p}")

    # torch, vectorized, exactly as scoring calls it
    with torch.no_grad():
        for latents in latents_per_batch:
            nfa(latents)  # warm-up, not timed
        synchronize(device)
        torch_s = 0.0
        for _ in range(repeats):
            for latents in latents_per_batch:
                torch_s += timed(device, lambda z=latents: nfa(z))[0]
        torch_s /= repeats
        torch_maps = torch.cat([nfa(z).log10_nfa for z in latents_per_batch]).cpu().numpy()
        torch_per_scale = [torch.cat(parts).cpu().numpy()
                           for parts in zip(*[nfa.log10_probabilities(z) for z in latents_per_batch])]
    print(f"  torch (BlockNFA)          : {1000 * torch_s / n_images:10.3f} ms/image  "
          f"({torch_s:.4f} s for {n_images} images, mean of {repeats} passes)")

    # scipy reference on the same latents (CPU float32, as they come out of the flow)
    cpu_latents = [torch.cat([z[scale] for z in latents_per_batch]).cpu().numpy() for scale in range(len(used))]
    cand_s = time.perf_counter()
    candidates = reference_candidate_maps(cpu_latents, p)
    cand_s = time.perf_counter() - cand_s

    fine_h, fine_w = used[0][1], used[0][2]
    total_fine = n_images * fine_h * fine_w
    sample = min(ref_pixels, total_fine)
    rng = np.random.default_rng(seed)
    flat = rng.choice(total_fine, size=sample, replace=False)
    b_idx, rem = np.divmod(flat, fine_h * fine_w)
    i_idx, j_idx = np.divmod(rem, fine_w)

    ref_per_scale = np.zeros((len(used), sample))
    loop_s = []
    for scale, ((channels, h, w), window) in enumerate(zip(used, windows)):
        # the coarse pixel nearest-neighbour upsampling puts under each fine pixel
        ci = np.minimum((i_idx * h) // fine_h, h - 1)
        cj = np.minimum((j_idx * w) // fine_w, w - 1)
        start = time.perf_counter()
        for k in range(sample):
            ref_per_scale[scale, k] = reference_log10_p(candidates[scale][b_idx[k]], int(ci[k]), int(cj[k]), window, channels, p)
        loop_s.append(time.perf_counter() - start)
        got = torch_per_scale[scale][b_idx, ci, cj]
        err = np.abs(got - ref_per_scale[scale])
        bad = err > NFA_RTOL * np.abs(ref_per_scale[scale]) + 1e-12
        rel = err / np.maximum(np.abs(ref_per_scale[scale]), 1e-300)
        print(f"  scale {scale}: log10 P at {sample} pixels: max rel. error {rel.max():.2e}, "
              f"{int(bad.sum())} outside {NFA_RTOL:g} relative")

    n_tests = sum(h * w for _, h, w in used)
    ref_nfa = math.log10(n_tests) + ref_per_scale.sum(axis=0)
    got = torch_maps[b_idx, i_idx, j_idx]
    err = np.abs(got - ref_nfa)
    bad = int((err > NFA_RTOL * np.abs(ref_nfa) + 1e-12).sum())
    print(f"  combined log10 NFA at {sample} pixels: max rel. error {(err / np.maximum(np.abs(ref_nfa), 1e-300)).max():.2e}, "
          f"{bad} outside {NFA_RTOL:g} relative -> {'AGREE' if bad == 0 else 'DISAGREE'}")

    # Extrapolate: the per-pixel loop costs the same for every pixel, so its time per pixel
    # times the pixels of every scale of every image; the candidate maps were computed in full.
    per_pixel = [s / sample for s in loop_s]
    ref_total = cand_s + sum(t * n_images * h * w for t, (_, h, w) in zip(per_pixel, used))
    print(f"  scipy per-pixel reference : {1000 * ref_total / n_images:10.3f} ms/image  (EXTRAPOLATED: "
          f"{sample} of {total_fine} fine pixels timed, "
          + ", ".join(f"scale {s} {1e6 * t:.1f} us/pixel" for s, t in enumerate(per_pixel))
          + f"; candidate maps {1000 * cand_s / n_images:.3f} ms/image measured in full; "
          "combining the scales not counted)")
    speedup = ref_total / torch_s
    print(f"  speed-up torch / reference = {speedup:.1f}x   target >= {NFA_TARGET:.0f}x   "
          f"-> {'meets' if speedup >= NFA_TARGET else 'BELOW'} target")


# --- main ----------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model directory (model.safetensors + manifest.json); "
                        "default: an untrained flow with the default DetectorConfig, so no training is needed")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the detector runs; auto = cuda when available (default: auto)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help=f"MVTec-layout root the images are read from, never copied (default: {DEFAULT_DATA})")
    parser.add_argument("--images", type=int, default=128, help="images decoded and resized once up front (default: 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass, both sides (default: 16)")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="PX",
                        help="model input height [width] for the untrained detector (default: 256); not with --model")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed passes over all images, alternating backbone and full scoring (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches before timing (default: 2)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on the CPU (default: torch's choice)")
    parser.add_argument("--nfa-repeats", type=int, default=5, help="timed passes of the torch NFA over all latents (default: 5)")
    parser.add_argument("--ref-pixels", type=int, default=3000,
                        help="fine-grid pixels the scipy reference computes (timed per pixel, then extrapolated "
                             "to every pixel; also the pixels whose values are compared) (default: 3000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pixel sample (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: 8 images, batch 4, 1 round, 1 warm-up batch, 2 NFA passes, 300 reference pixels")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size, args.rounds, args.warmup, args.nfa_repeats, args.ref_pixels = 8, 4, 1, 1, 2, 300
    check_input_size(parser, args)
    if args.images < 1 or args.batch_size < 1 or args.rounds < 1 or args.nfa_repeats < 1 or args.ref_pixels < 1:
        parser.error("--images, --batch-size, --rounds, --nfa-repeats and --ref-pixels must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    device, detector, what, batches = prepare(args)
    n_images = sum(len(b.sizes) for b in batches)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device      : {device} ({device_name}); torch {torch.__version__}; "
          f"torch threads {torch.get_num_threads()} of {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print(f"detector    : {what}; backbone {detector.config.backbone.name}, input {detector.input_size}, "
          f"latents {detector.flow.latent_shapes}")
    print(f"images      : {n_images} from {args.data} (original sizes "
          f"{sorted({s for b in batches for s in b.sizes})[:4]}...), decoded and resized before timing; "
          f"batch {args.batch_size}, {args.rounds} round(s), {args.warmup} warm-up batch(es)")
    load = os.getloadavg()[0]
    busy = device.type == "cpu" and load + torch.get_num_threads() > (os.cpu_count() or 1) + 0.5
    if busy and torch.get_num_threads() == 1:
        print(f"NOTE: load average {load:.1f} on {os.cpu_count()} CPUs: other processes compete for the cores; figures are noisy.")
    elif busy:
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} CPUs: other processes compete for the cores, and "
              f"with {torch.get_num_threads()} torch threads every parallel op waits for its slowest thread "
              "(measured here: 10-50x slower with 2 threads than with 1 under load). Use --threads 1, or a quiet machine.")
    if args.quick:
        print("QUICK MODE: smoke-test sizes; the figures below are not measurements to report")
    print()
    compare_backbone_and_full(detector, batches, device, args.rounds, args.warmup)
    compare_nfa(detector, batches, device, args.nfa_repeats, args.ref_pixels, args.seed)


if __name__ == "__main__":
    main()
