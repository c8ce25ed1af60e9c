"""The project against anomalib 2.7 on the same images, backbone weights and threads.

Why this exists: uflow-batch's scoring does more than anomalib's predict step
(the a-contrario verdict, a mask and regions at each image's original size),
and its training caches the frozen backbone's features instead of running
the backbone every step. Both claims are only worth something measured
against the peer a user would otherwise pick, in one process and one run.

Scoring (images per CPU-second, the median of interleaved rounds):

* the project's backbone alone (``detector.features``);
* the project's full scoring (``detector.score``: backbone, flow, anomaly map,
  NFA, masks and regions at original size);
* anomalib's ``UflowModel`` and ``FastflowModel`` ``forward`` in eval mode
  (anomaly map and image score only), both on Lite0 stages 1-3 with the
  same packaged weights (anomalib offers Lite0 for neither, so its
  ``timm.create_model`` is pointed at the project's weight loader; see
  :func:`lite0_for_anomalib`), normalized with mean = std = 0.5 as Lite0 wants.

Targets (issue 12): full scoring >= 1.0x anomalib's UFlow forward and >= 0.85x
the project's backbone alone.

Training (``--training``; seconds per epoch on the same train/good images,
same batch size): the project's ``fit_flow`` (cached features, production
code, including its validation pass) against anomalib's UFlow training step
(backbone + flow forward, its ``UFlowLoss``, backward, Adam) written as a
plain loop, without Lightning's own overhead, which flatters anomalib.
Target: >= 3x.

With ``--model``, the same model also scores through ONNX Runtime
(``uflow-batch export``'s graph, the verdict in torch on its latents) when
the ``export`` extra is installed.

anomalib is a benchmark-only extra (``pip install -e '.[bench,export]'``,
see bench/README.md); it is never a dependency of the package.

    python bench/vs_anomalib.py --threads 1
    python bench/vs_anomalib.py --threads 1 --model out/mtd/tile_exp1 --training
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import timm
import torch
from core_throughput import DEFAULT_DATA, Batch, load_batches, prepare, synchronize

from uflow_batch.config import TrainConfig
from uflow_batch.model import UFlowDetector
from uflow_batch.model.backbones import features_from_state, lite0_state_dict
from uflow_batch.manifest import TrainingReport
from uflow_batch.train import fit_flow

SCORING_TARGET_VS_ANOMALIB = 1.0
SCORING_TARGET_VS_BACKBONE = 0.85
TRAINING_TARGET = 3.0
ANOMALIB_LAYERS = (1, 2, 3)  # Lite0 stages 1-3: anomalib's UFlow and FastFlow use three scales


@contextlib.contextmanager
def lite0_for_anomalib() -> Iterator[None]:
    """Every ``timm.create_model`` call builds Lite0 features from the packaged weights.

    anomalib builds its extractors with ``timm.create_model(name,
    pretrained=True, features_only=True, out_indices=...)`` and accepts only
    backbones whose weights come from the hub; this keeps its code path and
    swaps the network for the one the project scores with.
    """
    state, source = lite0_state_dict()
    body = features_from_state("tf_efficientnet_lite0", ANOMALIB_LAYERS, state, source)

    def create(_name: str, *args, out_indices=ANOMALIB_LAYERS, **kwargs) -> torch.nn.Module:
        if tuple(out_indices) != ANOMALIB_LAYERS:
            raise ValueError(f"anomalib asked for stages {out_indices}; this benchmark builds {ANOMALIB_LAYERS}")
        return copy.deepcopy(body)

    with mock.patch.object(timm, "create_model", create):
        yield


def anomalib_models(input_size: tuple[int, int]) -> dict[str, torch.nn.Module]:
    from anomalib.models.image.fastflow.torch_model import FastflowModel
    from anomalib.models.image.uflow.feature_extraction import LayerNormFeatureExtractor
    from anomalib.models.image.uflow.torch_model import UflowModel

    with lite0_for_anomalib():
        extractor = LayerNormFeatureExtractor("tf_efficientnet_lite0", input_size, layers=ANOMALIB_LAYERS)
        with mock.patch("anomalib.models.image.uflow.torch_model.get_feature_extractor", lambda *a, **k: extractor):
            uflow = UflowModel(input_size=input_size, flow_steps=4, backbone="resnet18")
        # FastFlow's own defaults for resnet18 (8 steps, alternating 3x3/1x1 subnets, hidden ratio 1).
        fastflow = FastflowModel(input_size=input_size, backbone="resnet18", pre_trained=True, flow_steps=8,
                                 conv3x3_only=False, hidden_ratio=1.0)
    return {"anomalib UFlow forward": uflow.eval(), "anomalib FastFlow forward": fastflow.eval()}


def normalized_for_lite0(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - 0.5) / 0.5


def cpu_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """CPU time of this process for ``fn`` (wall time on CUDA, where the CPU mostly waits)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def compare_scoring(detector: UFlowDetector, batches: list[Batch], device: torch.device, rounds: int,
                    onnx_detector: object | None = None) -> None:
    peers = {name: model.to(device) for name, model in anomalib_models(detector.input_size).items()}
    inputs = [normalized_for_lite0(b.images).to(device) for b in batches]
    sides: dict[str, Callable[[int], object]] = {
        "project backbone alone": lambda i: detector.features(batches[i].images),
        "project full scoring": lambda i: detector.score(batches[i].images, batches[i].sizes),
    }
    if onnx_detector is not None:
        sides["project full scoring, ONNX Runtime"] = lambda i: onnx_detector.score(batches[i].images, batches[i].sizes)
    for name, model in peers.items():
        sides[name] = lambda i, model=model: model(inputs[i])
    n_images = sum(len(b.sizes) for b in batches)
    with torch.inference_mode():
        for fn in sides.values():  # warm-up, never timed
            fn(0)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for round_index in range(rounds):
            # Interleaved: every side runs once per round, so outside load hits them alike.
            for name, fn in sides.items():
                seconds = sum(cpu_seconds(lambda i=i: fn(i), device) for i in range(len(batches)))
                rates[name].append(n_images / seconds)
            print(f"  round {round_index + 1}/{rounds}: " + "  ".join(f"{n}: {r[-1]:.1f}" for n, r in rates.items()))
    median = {name: statistics.median(values) for name, values in rates.items()}
    unit = "images/s" if device.type == "cuda" else "images/CPU-s"
    backbone = median["project backbone alone"]
    print(f"\n| side | {unit} | vs project backbone |\n|---|---|---|")
    for name, rate in median.items():
        print(f"| {name} | {rate:.1f} | {rate / backbone:.2f} |")
    full = median["project full scoring"]
    vs_anomalib = full / median["anomalib UFlow forward"]
    print(f"\nfull scoring / anomalib UFlow forward = {vs_anomalib:.2f}  (target >= {SCORING_TARGET_VS_ANOMALIB:.2f}: "
          f"{'meets' if vs_anomalib >= SCORING_TARGET_VS_ANOMALIB else 'BELOW'})")
    print(f"full scoring / project backbone     = {full / backbone:.2f}  (target >= {SCORING_TARGET_VS_BACKBONE:.2f}: "
          f"{'meets' if full / backbone >= SCORING_TARGET_VS_BACKBONE else 'BELOW'})")


def project_epoch_seconds(detector: UFlowDetector, images: torch.Tensor, epochs: int, batch_size: int) -> list[float]:
    """Seconds of each epoch of the production ``fit_flow`` (features cached once, as training does)."""
    features = [f.to(detector.device) for f in detector.features(images)]
    n_val = max(1, len(images) // 7)
    train = [f[n_val:] for f in features]
    val = [f[:n_val] for f in features]
    stamps = [time.perf_counter()]
    config = TrainConfig(max_epochs=epochs, batch_size=batch_size, patience=epochs + 1)
    fit_flow(detector, train, val, config, TrainingReport("bench", len(train[0]), len(val[0])),
             on_epoch=lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def anomalib_epoch_seconds(images: torch.Tensor, input_size: tuple[int, int], epochs: int, batch_size: int,
                           device: torch.device) -> list[float]:
    """Seconds per epoch of anomalib UFlow's training step in a plain loop (its model, loss and optimizer)."""
    from anomalib.models.image.uflow.loss import UFlowLoss

    model = anomalib_models(input_size)["anomalib UFlow forward"].to(device).train()
    loss_fn = UFlowLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    inputs = normalized_for_lite0(images).to(device)
    n_val = max(1, len(images) // 7)
    train = inputs[n_val:]
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(0, len(train), batch_size):
            z, ljd = model(train[i : i + batch_size])
            loss = loss_fn(z, ljd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def compare_training(detector: UFlowDetector, data_root: Path, category: str, n_images: int, epochs: int,
                     batch_size: int, device: torch.device) -> None:
    paths = sorted((data_root / category / "train" / "good").glob("*.png"))[:n_images]
    images = torch.cat([b.images for b in load_batches(paths, detector.input_size, len(paths))])
    ours = project_epoch_seconds(detector, images.to(device), epochs, batch_size)
    theirs = anomalib_epoch_seconds(images, detector.input_size, epochs, batch_size, device)
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"\ntraining on {len(paths)} {category} train/good images (1/7 held out), batch {batch_size}, {epochs} epochs each, "
          "median seconds per epoch:")
    print(f"  project fit_flow (cached features, with its validation pass): {ours_s:.2f} s")
    print(f"  anomalib UFlow training step (backbone + flow every step)    : {theirs_s:.2f} s")
    ratio = theirs_s / ours_s
    print(f"  speed-up = {ratio:.1f}x  (target >= {TRAINING_TARGET:.0f}x: {'meets' if ratio >= TRAINING_TARGET else 'BELOW'})")


def onnx_side(args: argparse.Namespace, device: torch.device) -> object | None:
    """The same trained model scoring through ONNX Runtime (``uflow-batch export``'s graph), where it can run."""
    if not args.model or device.type != "cpu":
        return None
    try:
        from uflow_batch.onnx_scoring import load_onnx_detector
        return load_onnx_detector(args.model, threads=torch.get_num_threads())
    except ImportError as exc:
        print(f"(no ONNX Runtime side: {exc}; install the 'export' extra)")
        return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model directory; default: an untrained default detector")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"MVTec-layout root (default: {DEFAULT_DATA})")
    parser.add_argument("--images", type=int, default=32, help="images scored per round (default: 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass, every side (default: 8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--training", action="store_true", help="also compare seconds per training epoch")
    parser.add_argument("--train-category", default="tile_exp1", help="category whose train/good images train (default: tile_exp1)")
    parser.add_argument("--train-images", type=int, default=64, help="train/good images per epoch (default: 64)")
    parser.add_argument("--epochs", type=int, default=3, help="timed training epochs per side (default: 3)")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="PX", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.images, args.batch_size, args.rounds, args.train_images, args.epochs) < 1:
        parser.error("--images, --batch-size, --rounds, --train-images and --epochs must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    device, detector, what, batches = prepare(args)
    print(f"device {device}; torch {torch.__version__}; {torch.get_num_threads()} thread(s) of {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"project detector: {what}; kind {detector.config.kind}, backbone {detector.config.backbone.name} layers "
          f"{detector.config.backbone.layers}, input {detector.input_size}, NFA test {detector.config.nfa.test}")
    print(f"{args.images} images from {args.data}, batch {args.batch_size}, {args.rounds} interleaved rounds\n")
    compare_scoring(detector, batches, device, args.rounds, onnx_side(args, device))
    if args.training:
        compare_training(detector, Path(args.data), args.train_category, args.train_images, args.epochs,
                         args.batch_size, device)


if __name__ == "__main__":
    main()
