#!/usr/bin/env python
"""Exported scoring graph: ONNX Runtime images/s beside torch, on the same decoded batches, same threads.

Why this exists: ``uflow-batch export`` writes backbone + flow + anomaly map
as one ONNX graph (issue 12, item 4). It is worth running only where ONNX
Runtime is at least as fast as torch and gives the same numbers; this script
measures both on one machine in one run.

Sides, each on exactly the same uint8 batches (decoded and resized once
before any timing; normalization is inside every timed region):

* **torch graph**: ``ScoringGraph(detector)(detector.normalize(images))``,
  the production modules (backbone, flow, anomaly map) in inference mode;
* **ONNX Runtime graph**: the exported file run by an ONNX Runtime CPU
  session on ``detector.normalize(images)``;
* **torch full scoring**: ``detector.score(images, sizes)`` (adds the NFA,
  masks and regions at each image's original size);
* **ONNX Runtime full scoring**: ``OnnxRuntimeDetector.score(images, sizes)``
  (``uflow_batch.onnx_scoring``): the exported graph, then the torch verdict
  on its latents (``detector.maps_from_latents`` + ``detector.results``).

Rounds alternate the sides so outside load hits them alike; warm-up batches
are never timed; torch and ONNX Runtime get the same intra-op thread count
(``--threads``; ONNX Runtime one inter-op thread). The parity of the two
graphs on these images is printed too. Nothing is asserted on timings: the
ratios are the result.

    .venv/bin/python bench/export_throughput.py --quick --threads 1
    .venv/bin/python bench/export_throughput.py --threads 1 --images 64 --batch-size 8
    .venv/bin/python bench/export_throughput.py --threads 1 --model out/mtd/tile_exp1 --images 64
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from core_throughput import DEFAULT_DATA, check_input_size, prepare

from uflow_batch.export import ScoringGraph, export_detector, onnx_session, run_exported
from uflow_batch.model import UFlowDetector
from uflow_batch.onnx_scoring import OnnxRuntimeDetector

SIDES = ("torch graph", "onnxruntime graph", "torch full scoring", "onnxruntime full scoring")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model directory; default: an untrained flow with the default "
                        "DetectorConfig (flow weights do not change the cost)")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"MVTec-layout root the images are read from (default: {DEFAULT_DATA})")
    parser.add_argument("--images", type=int, default=64, help="images decoded and resized once up front (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass, every side (default: 8)")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="PX",
                        help="model input height [width] for the untrained detector (default: 256); not with --model")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over all images, sides alternating (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches per side (default: 2)")
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime alike (default: torch's choice)")
    parser.add_argument("--output", help="where to write the ONNX file (default: a temporary file, removed afterwards)")
    parser.add_argument("--quick", action="store_true", help="smoke-test size: 8 images, batch 4, 1 round, 1 warm-up batch")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size, args.rounds, args.warmup = 8, 4, 1, 1
    check_input_size(parser, args)
    if min(args.images, args.batch_size, args.rounds) < 1 or args.warmup < 0:
        parser.error("--images, --batch-size and --rounds must be >= 1, --warmup >= 0")
    return args


def sides(detector: UFlowDetector, session, onnx_detector: OnnxRuntimeDetector) -> dict:
    graph = ScoringGraph(detector).eval()

    def torch_graph(batch):
        with torch.inference_mode():
            return graph(detector.normalize(batch.images))

    def onnx_graph(batch):
        with torch.inference_mode():
            normalized = detector.normalize(batch.images)
        return run_exported(session, normalized)

    def torch_full(batch):
        return detector.score(batch.images, batch.sizes)

    def onnx_full(batch):
        return onnx_detector.score(batch.images, batch.sizes)

    return dict(zip(SIDES, (torch_graph, onnx_graph, torch_full, onnx_full)))


def parity(detector: UFlowDetector, session, batches) -> None:
    """Largest differences between the two graphs, and between the verdicts read from their latents, on these images."""
    anomaly_err = latent_err = significance_err = 0.0
    verdicts_differ = 0
    for batch in batches:
        expected = detector.score_maps(batch.images)
        with torch.inference_mode():
            expected_latents = detector.latents(detector.features(batch.images))[0]
            anomaly, latents = run_exported(session, detector.normalize(batch.images))
        got = detector.maps_from_latents(latents)
        anomaly_err = max(anomaly_err, float((anomaly - expected.anomaly).abs().max()))
        latent_err = max(latent_err, max(float(((g - e).abs() / (1 + e.abs())).max()) for g, e in zip(latents, expected_latents)))
        significance_err = max(significance_err, float(((got.significance - expected.significance).abs()
                                                         / expected.significance.abs().clamp_min(1)).max()))
        verdicts_differ += sum(a.is_anomalous != b.is_anomalous for a, b in
                               zip(detector.results(got, batch.sizes), detector.results(expected, batch.sizes)))
    print(f"parity on these images: anomaly map max |d| {anomaly_err:.2e} (absolute); latents max |d| / (1 + |z|) "
          f"{latent_err:.2e}; significance max |d| / max(1, |s|) {significance_err:.2e}; verdicts that differ: {verdicts_differ}")


def main() -> None:
    args = parse_args()
    # ONNX Runtime's CPU provider: both sides on the CPU.
    device, detector, what, batches = prepare(args, torch.device("cpu"))
    n_images = sum(len(b.sizes) for b in batches)

    import onnxruntime

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(args.output) if args.output else Path(scratch) / "model.onnx"
        report = export_detector(detector, path)
        session = onnx_session(path, threads=torch.get_num_threads())
        print(f"device      : cpu ({platform.processor() or platform.machine()}); torch {torch.__version__}, "
              f"onnxruntime {onnxruntime.__version__}; {torch.get_num_threads()} intra-op thread(s) each, of "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
        print(f"detector    : {what}; kind {detector.config.kind}, backbone {detector.config.backbone.name}, "
              f"input {detector.input_size}")
        print(f"export      : {path.stat().st_size / 1e6:.1f} MB in {report.seconds:.1f} s; check on random input: "
              f"anomaly {report.max_abs_error_anomaly:.1e}, latents {report.max_scaled_error_latents:.1e} (scaled)")
        print(f"images      : {n_images} from {args.data}, decoded and resized before timing; batch {args.batch_size}, "
              f"{args.rounds} round(s), {args.warmup} warm-up batch(es) per side")
        if args.quick:
            print("QUICK MODE: smoke-test sizes; the figures below are not measurements to report")
        print()
        parity(detector, session, batches)

        runs = sides(detector, session, OnnxRuntimeDetector(detector, path, threads=torch.get_num_threads()))
        for index in range(args.warmup):
            for run in runs.values():
                run(batches[index % len(batches)])
        seconds = {name: [] for name in runs}
        for round_index in range(args.rounds):
            for name, run in runs.items():  # alternating sides within every round
                start = time.perf_counter()
                for batch in batches:
                    run(batch)
                seconds[name].append(time.perf_counter() - start)
            print(f"  round {round_index + 1}/{args.rounds}: "
                  + "   ".join(f"{name} {n_images / seconds[name][-1]:7.2f}" for name in runs) + "  img/s")

    rate = {name: n_images * args.rounds / sum(s) for name, s in seconds.items()}
    print()
    for name in runs:
        print(f"{name:<26}: {rate[name]:8.2f} images/s  ({1000 / rate[name]:8.2f} ms/image)")
    print(f"onnxruntime / torch, graph        = {rate['onnxruntime graph'] / rate['torch graph']:.3f}")
    print(f"onnxruntime / torch, full scoring = {rate['onnxruntime full scoring'] / rate['torch full scoring']:.3f}")


if __name__ == "__main__":
    main()
