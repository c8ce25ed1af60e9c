#!/usr/bin/env python
"""Ray pipeline overhead and memory: the streaming pipeline vs the same stages in a plain loop.

Why this exists: the Ray Data pipeline (``run_scoring``) buys streaming,
retries, exactly-once part files and scale-out; on one machine it should cost
little over running the very same stages in-process (target: pipeline
images/s >= 0.8 x in-process images/s). And because it streams, the memory
of each worker must not grow with the archive (target: peak RSS per worker
equal within noise for an archive of N and of 10N images).

What is timed, on the same archive of N images per category:

* in-process: ``plan_units`` -> ``iter_unit`` listing (with the committed-part
  check) -> ``fetch_and_decode`` -> ``CategoryScorer`` -> ``PartSink.write``
  every ``rows_per_file`` rows, in one Python loop, in batches of the same size
  as the pipeline's. Included: listing, resolving models, building the scorer
  and loading each category's model, decoding, inference, Parquet parts.
  Excluded: imports and first-call costs (a warm-up run on a separate small
  archive goes first).
* Ray: ``run_scoring`` alone, in a Ray session already started, after a
  warm-up ``run_scoring`` on a separate small archive and output (worker
  processes started, imports done). Included: everything the in-process loop
  does, plus Ray Data planning, scheduling, moving blocks through the object
  store and starting the inference actor and loading its models (the pipeline
  does that on every run). Excluded: starting Ray.

The pipeline overlaps decoding with inference on different cores; the loop
does not. Both use the same torch thread count for inference (``--threads``).

Memory: RSS of every ``ray::`` process under this driver is sampled in a
background thread (``/proc``, every ``--sample-interval`` s) and reported per
worker kind (read/decode task, inference actor, write task) with the
driver's own peak, for a run on N and on 10N images per category. Each of the
two runs gets a fresh Ray session and the same warm-up, so both start from
the same state.

    scripts/in-netns.sh .venv/bin/python bench/pipeline_overhead.py --quick
    scripts/in-netns.sh .venv/bin/python bench/pipeline_overhead.py --per-category 100
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

for _name, _value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_name, _value)

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from uflow_batch import storage  # noqa: E402
from uflow_batch.config import BackboneConfig, DetectorConfig, ScoreRequest, ScoringResources, TrainConfig  # noqa: E402
from uflow_batch.devtools.synthetic import SyntheticConfig, generate_dataset, write_scoring_archive  # noqa: E402
from uflow_batch.pipelines import commit  # noqa: E402
from uflow_batch.pipelines.cluster import ray_session  # noqa: E402
from uflow_batch.pipelines.listing import ListingContext, iter_unit, plan_request_units, plan_units, read_unit  # noqa: E402
from uflow_batch.pipelines.score import categories_in, resolve_models, run_scoring  # noqa: E402
from uflow_batch.pipelines.stages import CategoryScorer, fetch_and_decode  # noqa: E402
from uflow_batch.scores.dataset import open_dataset  # noqa: E402
from uflow_batch.storage import ModelStore  # noqa: E402
from uflow_batch.train import train_category  # noqa: E402

OVERHEAD_TARGET = 0.8  # Ray images/s over in-process images/s
MEMORY_NOISE = 0.10  # "equal within noise": 10N peak within 10% of N peak
RUN_DATE = datetime.now(timezone.utc).date().isoformat()


# --- memory sampling -----------------------------------------------------------------------------

def worker_kind(title: str) -> str:
    """A Ray worker's process title -> the pipeline stage it is running.

    Ray Data may fuse stages (here it runs ``fetch_and_decode`` inside the
    inference actor); the titles seen are printed so the grouping can be checked.
    """
    if "CategoryScorer" in title:
        return "inference actor"
    if "Write" in title:
        return "write task"
    if "Read" in title:
        return "read task"
    if "fetch_and_decode" in title:
        return "decode task"
    if title.startswith("ray::IDLE"):
        return "idle task worker"
    return "Ray's own actors/agents"


PIPELINE_KINDS = ("read task", "decode task", "inference actor", "write task")


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:  # the process ended between listing and reading
        return None


def _status_kib(status: str, key: str) -> int:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class MemoryReport:
    driver_peak: int = 0  # bytes
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # max sampled RSS while in that role
    hwm_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # VmHWM of processes seen in that role
    processes: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    titles: set[str] = field(default_factory=set)
    samples: int = 0


class RssSampler(threading.Thread):
    """Samples RSS of this process and of every ``ray::`` process descending from it.

    Reads ``/proc`` directly (psutil is not in the environment). Only this
    driver's descendants count, so other Ray sessions on the machine do not.
    """

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.report = MemoryReport()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> MemoryReport:
        self.start()
        return self.report

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join()
        self.sample()  # one last look, for tasks shorter than an interval

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = defaultdict(list)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            stat = _read(f"/proc/{entry.name}/stat")
            if stat is None:
                continue
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, ...
            children[ppid].append(int(entry.name))
        found, stack = [], [os.getpid()]
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(children.get(pid, []))
        return found[1:]

    def sample(self) -> None:
        with self._lock:
            report = self.report
            own = _read("/proc/self/status")
            if own:
                report.driver_peak = max(report.driver_peak, _status_kib(own, "VmRSS") * 1024)
            for pid in self._descendants():
                cmdline = _read(f"/proc/{pid}/cmdline")
                if not cmdline or not cmdline.startswith("ray::"):
                    continue
                status = _read(f"/proc/{pid}/status")
                if status is None:
                    continue
                title = cmdline.split("\0")[0].strip()
                kind = worker_kind(title)
                report.titles.add(title)
                report.processes[kind].add(pid)
                report.by_kind[kind] = max(report.by_kind[kind], _status_kib(status, "VmRSS") * 1024)
                report.hwm_by_kind[kind] = max(report.hwm_by_kind[kind], _status_kib(status, "VmHWM") * 1024)
            report.samples += 1


# --- setup ---------------------------------------------------------------------------------------

def train_models(workdir: Path, args: argparse.Namespace) -> str:
    """A tiny trained model per category in a local store; cost and shape are a real model's."""
    dataset = SyntheticConfig(categories=tuple(args.categories), image_size=args.image_size,
                              n_train=args.train_images, n_test_good=0, n_test_per_defect=0, seed=7)
    generate_dataset(str(workdir / "train-data"), dataset)
    detector = DetectorConfig(backbone=BackboneConfig(input_size=(args.input_size, args.input_size)))
    training = TrainConfig(max_epochs=args.epochs, batch_size=4, warmup_epochs=0, patience=2, device="auto")
    store = ModelStore(str(workdir / "models"))
    for category in args.categories:
        started = time.perf_counter()
        train_category(str(workdir / "train-data"), category, workdir / f"trained-{category}", detector, training)
        store.publish(workdir / f"trained-{category}", category)
        print(f"  trained {category} in {time.perf_counter() - started:.1f} s")
    return store.url


def make_archive(root: Path, categories: list[str], image_size: int, per_category: int, night: int) -> str:
    config = SyntheticConfig(categories=tuple(categories), image_size=image_size)
    return write_scoring_archive(str(root), config, n_per_category=per_category, include_bad_files=False, night=night).root


def count_images(archive: str) -> int:
    return sum(1 for unit in plan_units([archive]) for _ in iter_unit(unit, datetime.now(timezone.utc)))


def make_request(archive: str, models: str, output: str, args: argparse.Namespace) -> ScoreRequest:
    resources = ScoringResources(batch_size=args.batch_size, actors=1,
                                 gpus_per_actor=1.0 if args.device == "cuda" else 0.0,
                                 cpus_per_actor=float(args.threads), decode_cpus=1.0)
    return ScoreRequest(inputs=(archive,), models=models, output=output, run_date=RUN_DATE, resources=resources)


# --- the two ways of running the same stages -----------------------------------------------------

def score_in_process(request: ScoreRequest, device: str) -> int:
    """``run_scoring``'s stages in one loop, without Ray; returns rows written.

    The same listing (``read_unit``, committed-part check included), the two
    batch stages at the same batch size, and ``PartSink`` (a write once
    ``rows_per_file`` rows are pending).
    """
    units = plan_request_units(request)
    models = resolve_models(request.models, categories_in(units, request.models))
    resources = request.resources
    run_id = commit.new_run_id()
    context = ListingContext(request.output, request.run_date, run_id, models.versions, datetime.now(timezone.utc),
                             request.category_filter, resources.batch_size)
    scorer = CategoryScorer(request.models, device=device, epsilon=request.epsilon,
                            num_threads=max(1, int(resources.cpus_per_actor)))
    sink = commit.PartSink(request.output, request.rows_per_file, run_id)
    pending: list[pa.Table] = []
    written = 0

    def flush(force: bool) -> None:
        nonlocal written, pending
        rows = sum(t.num_rows for t in pending)
        if rows and (force or rows >= request.rows_per_file):
            written += sum(w["rows"] for w in sink.write(pending, None))
            pending = []

    for unit in units:
        for listed in read_unit(unit, context):  # blocks of batch_size rows
            pending.append(scorer(fetch_and_decode(listed, models.input_sizes, models.unusable)))
            flush(False)
    flush(True)
    return written


def image_scores(output: str) -> dict[str, float]:
    table = open_dataset(output).to_table(columns=["image_uri", "image_score"])
    return dict(zip(table.column("image_uri").to_pylist(), table.column("image_score").to_pylist()))


@dataclass
class RayRun:
    images: int
    seconds: float
    memory: MemoryReport


def ray_run(archive: str, warmup_archive: str, models: str, out: Path, label: str, args: argparse.Namespace) -> RayRun:
    """A fresh Ray session, a warm-up run, then the measured run (timed and memory-sampled)."""
    with ray_session(num_cpus=args.num_cpus, object_store_memory=args.object_store_mb * 2**20):
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        run_scoring(make_request(warmup_archive, models, str(out / f"warmup-{label}"), args))
        with RssSampler(args.sample_interval) as memory:
            started = time.perf_counter()
            summary = run_scoring(make_request(archive, models, str(out / label), args))
            seconds = time.perf_counter() - started
    return RayRun(summary.rows_written, seconds, memory)


# --- main ----------------------------------------------------------------------------------------

def mib(value: int) -> str:
    return f"{value / 2**20:8.1f} MiB"


def print_memory(small: RayRun, large: RayRun, n_small: int, n_large: int, interval: float) -> None:
    print(f"\npeak RSS per Ray process kind, N = {n_small} vs 10N = {n_large} images "
          f"('sampled': max RSS seen every {interval} s while running as that kind, {small.memory.samples} and "
          f"{large.memory.samples} samples; 'VmHWM': lifetime peak of those processes, warm-up run included)")
    print(f"  {'kind':<24} {'sampled N':>12} {'sampled 10N':>12} {'10N/N':>6}   {'VmHWM N':>12} {'VmHWM 10N':>12}  procs")
    kinds = [k for k in PIPELINE_KINDS if k in small.memory.by_kind or k in large.memory.by_kind]
    kinds += sorted(k for k in set(small.memory.by_kind) | set(large.memory.by_kind) if k not in PIPELINE_KINDS)
    worst = 1.0
    for kind in kinds:
        a, b = small.memory.by_kind.get(kind, 0), large.memory.by_kind.get(kind, 0)
        ratio = b / a if a else float("nan")
        if kind in PIPELINE_KINDS and a:
            worst = max(worst, ratio)
        print(f"  {kind:<24} {mib(a)} {mib(b)} {ratio:6.2f}   {mib(small.memory.hwm_by_kind.get(kind, 0))} "
              f"{mib(large.memory.hwm_by_kind.get(kind, 0))}  {len(small.memory.processes[kind])}/{len(large.memory.processes[kind])}")
    a, b = small.memory.driver_peak, large.memory.driver_peak
    print(f"  {'driver':<24} {mib(a)} {mib(b)} {b / a:6.2f}   (this process; it ran the in-process loop before, "
          "so its RSS includes that loop's models)")
    missing = [k for k in PIPELINE_KINDS if k not in kinds]
    if missing:
        print(f"  not seen running: {', '.join(missing)} (fused into another stage, or shorter than a sampling "
              "interval: its process then shows as an idle task worker)")
    verdict = "equal within noise" if worst <= 1 + MEMORY_NOISE else "GROWS with the archive"
    print(f"largest 10N/N of a pipeline kind (sampled): {worst:.2f} (allowance {MEMORY_NOISE:.0%}) -> {verdict}")
    print(f"process titles seen: {sorted(t for t in small.memory.titles | large.memory.titles if worker_kind(t) in PIPELINE_KINDS)}")


def print_fit(label: str, n_small: int, t_small: float, n_large: int, t_large: float) -> float | None:
    """Two-point fit time = fixed + images / rate over the N and 10N runs (derived, not measured)."""
    if n_large <= n_small or t_large <= t_small:
        print(f"  {label:<16}: fit skipped, the 10N run was not slower than the N run (noise dominates)")
        return None
    rate = (n_large - n_small) / (t_large - t_small)
    print(f"  {label:<16}: fixed cost per run {t_small - n_small / rate:6.2f} s, marginal {rate:8.2f} images/s")
    return rate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="an existing model store URL (one current model per category); "
                        "default: train a tiny model per category into the work dir")
    parser.add_argument("--archive", help="an existing archive URL (<root>/<category>/*.png) as the N archive; "
                        "default: write a synthetic one")
    parser.add_argument("--archive-large", help="an existing archive URL as the 10N archive (with --archive); "
                        "default: write a synthetic one of --scale x N images per category")
    parser.add_argument("--categories", default="brushed_metal,fabric",
                        help="synthetic categories to train and score (default: brushed_metal,fabric)")
    parser.add_argument("--per-category", type=int, default=100, help="N: images per category in the archive (default: 100)")
    parser.add_argument("--scale", type=int, default=10, help="the large archive holds scale x N per category (default: 10)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic images in pixels (default: 256)")
    parser.add_argument("--input-size", type=int, default=256, help="model input side for trained models (default: 256)")
    parser.add_argument("--train-images", type=int, default=12, help="training images per category (default: 12)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs: cost is what matters here, not accuracy (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch in both the loop and the pipeline (default: 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for inference in both; also the pipeline's cpus_per_actor (default: 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="inference device; cuda gives the actor one GPU (default: cpu)")
    parser.add_argument("--num-cpus", type=int,
                        help="CPUs the local Ray session advertises (default: max(cores, threads + 1), "
                             "so a decode task can always run beside the actor)")
    parser.add_argument("--object-store-mb", type=int, default=512, help="Ray object store size in MiB (default: 512)")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between RSS samples (default: 0.2)")
    parser.add_argument("--workdir", help="where models, archives and outputs go (default: a temporary directory, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument("--skip-memory", action="store_true", help="only the overhead ratio, no 10N run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: N=4 per category, 96 px images, 64 px model input, 6 training "
                             "images, 1 epoch, batch 4")
    args = parser.parse_args()
    if args.quick:
        args.per_category, args.image_size, args.input_size, args.train_images, args.epochs, args.batch_size = 4, 96, 64, 6, 1, 4
    args.categories = [c for c in args.categories.split(",") if c]
    if args.archive_large and not args.archive:
        parser.error("--archive-large needs --archive")
    if args.num_cpus is None:
        args.num_cpus = max(os.cpu_count() or 1, args.threads + 1)
    return args


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="uflow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device      : {args.device} ({device}); inference threads {args.threads}; Ray num_cpus {args.num_cpus} "
          f"of {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    if args.quick:
        print("QUICK MODE: smoke-test sizes; the figures below are not measurements to report")
    try:
        models = args.models or train_models(workdir, args)
        cats = args.categories
        archive = args.archive or make_archive(workdir / "archive-N", cats, args.image_size, args.per_category, night=0)
        warmup = make_archive(workdir / "archive-warmup", cats, args.image_size, 2, night=99) if not args.archive else None
        if warmup is None:  # an existing archive: warm up on a copy of a few of its images
            warmup = str(workdir / "archive-warmup")
            for unit in plan_units([archive]):
                for index, row in zip(range(2), iter_unit(unit, datetime.now(timezone.utc))):
                    storage.write_bytes_atomic(storage.join(warmup, unit.category, f"warmup-{index}.png"),
                                               storage.read_bytes(row["image_uri"]))
        n_small = count_images(archive)
        print(f"models      : {models}")
        print(f"archive N   : {archive} ({n_small} images), batch {args.batch_size}, warm-up archive {warmup}")
        out = workdir / "out"

        # in-process baseline (warm-up first, on its own output)
        score_in_process(make_request(warmup, models, str(out / "warmup-loop"), args), args.device)
        with RssSampler(args.sample_interval) as loop_memory:
            started = time.perf_counter()
            loop_rows = score_in_process(make_request(archive, models, str(out / "loop"), args), args.device)
            loop_s = time.perf_counter() - started
        loop_rate = loop_rows / loop_s
        print(f"\nin-process loop : {loop_rows} images in {loop_s:7.2f} s = {loop_rate:8.2f} images/s "
              f"(driver peak RSS {mib(loop_memory.driver_peak).strip()})")

        small = ray_run(archive, warmup, models, out, "ray-N", args)
        ray_rate = small.images / small.seconds
        print(f"Ray pipeline    : {small.images} images in {small.seconds:7.2f} s = {ray_rate:8.2f} images/s")
        ratio = ray_rate / loop_rate
        print(f"Ray / in-process = {ratio:.3f}   target >= {OVERHEAD_TARGET}   -> {'meets' if ratio >= OVERHEAD_TARGET else 'BELOW'} target")

        loop_scores, ray_scores = image_scores(str(out / "loop")), image_scores(str(out / "ray-N"))
        same = loop_scores.keys() == ray_scores.keys()
        diff = max((abs(loop_scores[k] - ray_scores[k]) for k in loop_scores if k in ray_scores), default=float("nan"))
        print(f"same rows on both sides: {same} ({len(loop_scores)} vs {len(ray_scores)}); max |image_score difference| {diff:.2e}")

        if args.skip_memory:
            return
        large_archive = args.archive_large or make_archive(workdir / "archive-10N", cats, args.image_size,
                                                           args.per_category * args.scale, night=1)
        n_large = count_images(large_archive)
        print(f"\narchive 10N : {large_archive} ({n_large} images)")
        large = ray_run(large_archive, warmup, models, out, "ray-10N", args)
        print(f"Ray pipeline on 10N: {large.images} images in {large.seconds:7.2f} s = {large.images / large.seconds:8.2f} images/s "
              "(fresh session, same warm-up)")
        started = time.perf_counter()
        large_loop_rows = score_in_process(make_request(large_archive, models, str(out / "loop-10N"), args), args.device)
        large_loop_s = time.perf_counter() - started
        large_ratio = (large.images / large.seconds) / (large_loop_rows / large_loop_s)
        print(f"in-process loop on 10N: {large_loop_rows} images in {large_loop_s:7.2f} s = "
              f"{large_loop_rows / large_loop_s:8.2f} images/s -> Ray / in-process on 10N = {large_ratio:.3f} "
              f"(target >= {OVERHEAD_TARGET})")
        print("two-point fits time = fixed + images / marginal rate over the N and 10N runs (derived, not measured):")
        ray_marginal = print_fit("Ray pipeline", small.images, small.seconds, large.images, large.seconds)
        loop_marginal = print_fit("in-process loop", loop_rows, loop_s, large_loop_rows, large_loop_s)
        if ray_marginal and loop_marginal:
            print(f"  marginal Ray / in-process = {ray_marginal / loop_marginal:.3f} (the per-run fixed costs set aside)")
        print_memory(small, large, n_small, n_large, args.sample_interval)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"work dir kept: {workdir}")


if __name__ == "__main__":
    main()
