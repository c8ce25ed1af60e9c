"""The ``uflow-batch`` command line: parse, call one function, print.

Exit codes: 0 success; 1 the work ran but something failed (a category did
not train, a crash); 2 bad usage or configuration; 3 a scoring run finished
but more of its rows are errors than ``max_error_fraction`` allows
(:data:`EXIT_TOO_MANY_ERRORS`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import __version__
from .cli_options import config_from_options, config_options
from .config import (
    EVALUATION_BATCH_SIZE,
    REPORT_TOP_N,
    BackboneConfig,
    ConfigError,
    DetectorConfig,
    FlowConfig,
    MODEL_KINDS,
    NFA_TESTS,
    NFAConfig,
    ScoreRequest,
    TaskResources,
    TrainConfig,
    check_known_fields,
    parse_category_kinds,
    validate_run_date,
)
from .model.backbones import available_backbones

log = logging.getLogger("uflow_batch")

# score / run-job: the run finished, but its error fraction passed max_error_fraction (its run log says "partial").
EXIT_TOO_MANY_ERRORS = 3


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _default(config: type, name: str) -> Any:
    """A config dataclass field's default, so the CLI offers (and shows) the one the library defines."""
    value = next(f.default for f in dataclasses.fields(config) if f.name == name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in text.split(",")) if text else None


def detector_options(command):
    """Options that define a detector's architecture (recorded in its manifest)."""
    options = [
        click.option("--kind", type=click.Choice(list(MODEL_KINDS)), default=_default(DetectorConfig, "kind"), show_default=True,
                     help="The flow: uflow (U-Flow), fastflow, cflow (CFlow-AD) or differnet (image verdict only, no mask)."),
        click.option("--backbone", default=_default(BackboneConfig, "name"), show_default=True,
                     help=f"Frozen feature extractor: {', '.join(available_backbones())}."),
        click.option("--input-size", default=_default(BackboneConfig, "input_size"), show_default=True,
                     help="Model input HEIGHT,WIDTH (multiples of 32); images of any size are resized to it."),
        click.option("--backbone-weights", default=None,
                     help="Local weights file (or directory, for mcait) for backbones whose weights are not packaged."),
        click.option("--layers", default=None, help="Backbone stages to use, e.g. 1,2,3 (default: the backbone's own)."),
        click.option("--steps-per-stage", default=_default(FlowConfig, "steps_per_stage"), show_default=True, help="Glow-style flow steps per scale."),
        click.option("--nfa-test", type=click.Choice(list(NFA_TESTS)), default=_default(NFAConfig, "test"), show_default=True,
                     help="The a-contrario test: scan (every scale and window, background fitted on held-out normals) "
                          "or block (the paper's)."),
        click.option("--scan-windows", default=_default(NFAConfig, "scan_windows"), show_default=True,
                     help="Scan test: block sides tested on every latent scale (must include 1)."),
        click.option("--nfa-windows", default=_default(NFAConfig, "windows"), show_default=True,
                     help="Block test: block side per scale, finest first; the number of entries is the number of scales tested."),
        click.option("--nfa-p", default=_default(NFAConfig, "p"), show_default=True,
                     help="Block test: chi-square(1) quantile level of z^2 defining candidates."),
        click.option("--mask-p", default=_default(NFAConfig, "mask_p"), show_default=True,
                     help="Scan test: a cell is painted into a mask only if its own tail probability is below 1 - mask_p."),
        click.option("--epsilon", default=_default(NFAConfig, "epsilon"), show_default=True,
                     help="Mask threshold: pixels of a flagged image with NFA below it."),
        click.option("--false-alarm-rate", default=_default(NFAConfig, "false_alarm_rate"), show_default=True,
                     help="Image verdict: the share of good images that may be flagged (an image is anomalous when its NFA is below it)."),
        click.option("--image-score", type=click.Choice(["anomaly_max", "nfa_max"]), default=_default(DetectorConfig, "image_score"),
                     show_default=True, help="Image score: max of the anomaly map, or max -log10 NFA."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_recipe(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """``--config FILE``: a YAML mapping of this command's options, used as their defaults.

    A training recipe can then be versioned beside the data; options given on
    the command line still win. Keys are option names with underscores
    (``max_epochs`` is ``--epochs``: the names are the configuration's).
    """
    if path is None:
        return None
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from exc
    if not isinstance(recipe, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got {type(recipe).__name__}")
    names = {p.name for p in ctx.command.params if p.name != "config"}
    check_known_fields(f"--config {path}", recipe, names)
    ctx.default_map = {**(ctx.default_map or {}), **{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in recipe.items()}}
    return path


def training_options(command):
    options = [
        click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_recipe,
                     help="YAML file of option values (keys: option names with underscores), e.g. a versioned training recipe."),
        click.option("--epochs", "max_epochs", default=_default(TrainConfig, "max_epochs"), show_default=True, help="Maximum epochs (early stopping may end sooner)."),
        click.option("--batch-size", default=_default(TrainConfig, "batch_size"), show_default=True),
        click.option("--lr", "learning_rate", default=_default(TrainConfig, "learning_rate"), show_default=True, help="Adam learning rate (peak of the schedule)."),
        click.option("--patience", default=_default(TrainConfig, "patience"), show_default=True, help="Epochs without validation improvement before stopping."),
        click.option("--val-fraction", default=_default(TrainConfig, "val_fraction"), show_default=True, help="Share of train/good held out for validation."),
        click.option("--seed", default=_default(TrainConfig, "seed"), show_default=True),
        click.option("--device", default=_default(TrainConfig, "device"), show_default=True, help="auto, cpu, cuda, cuda:1, ..."),
        click.option("--skip-corrupt", is_flag=True, help="Skip unreadable training images (counted in the manifest) instead of failing."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_detector_config(kind, backbone, input_size, backbone_weights, layers, steps_per_stage, nfa_test, scan_windows, nfa_windows,
                          nfa_p, mask_p, epsilon, false_alarm_rate, image_score) -> DetectorConfig:
    return DetectorConfig(
        kind=kind,
        backbone=BackboneConfig(name=backbone, input_size=_ints(input_size), weights=backbone_weights, layers=_ints(layers)),
        flow=FlowConfig(steps_per_stage=steps_per_stage),
        nfa=NFAConfig(test=nfa_test, p=nfa_p, windows=_ints(nfa_windows), scan_windows=_ints(scan_windows), mask_p=mask_p, epsilon=epsilon,
                      false_alarm_rate=false_alarm_rate),
        image_score=image_score,
    )


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


class _EpochBar:
    """tqdm over epochs showing the losses; closes itself at the end."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = tqdm(total=total, desc=label, unit="epoch", leave=True, file=sys.stderr)

    def __call__(self, epoch: int, train_loss: float, val_loss: float) -> None:
        self.bar.update(epoch - self.bar.n)
        self.bar.set_postfix(train=f"{train_loss:.0f}", val=f"{val_loss:.0f}")

    def close(self) -> None:
        self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="-v for progress logs, -vv for debug.")
@click.version_option(__version__, "--version", prog_name="uflow-batch", message="%(prog)s %(version)s")
def main(verbose: int) -> None:
    """Train U-Flow anomaly detectors per product category and score image archives at scale."""
    _setup_logging(verbose)


@main.command()
@click.option("--data", required=True, help="Dataset root (MVTec AD layout): local path or s3://, gs:// URL.")
@click.option("--category", required=True, help="Category folder under --data.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Local directory for the trained model.")
@detector_options
@training_options
def train(data, category, out, **options) -> None:
    """Train one category's detector on its train/good images."""
    from .train import train_category

    detector_config, train_config = _split_configs(options)
    bar = _EpochBar(train_config.max_epochs, category)
    try:
        report = train_category(data, category, out, detector_config, train_config, on_epoch=bar)
    finally:
        bar.close()
    click.echo(
        f"{category}: {report.epochs} epochs (best {report.best_epoch}), validation NLL/dim {report.best_val_nll_per_dim:.4f}, "
        f"features {report.feature_seconds:.1f}s + fit {report.fit_seconds:.1f}s on {report.device}; "
        f"{report.n_train} train / {report.n_val} validation images, {len(report.skipped_images)} skipped -> {out}"
    )


def _split_configs(options: dict) -> tuple[DetectorConfig, TrainConfig]:
    detector_keys = ("kind", "backbone", "input_size", "backbone_weights", "layers", "steps_per_stage", "nfa_test", "scan_windows",
                     "nfa_windows", "nfa_p", "mask_p", "epsilon", "false_alarm_rate", "image_score")
    detector_config = build_detector_config(**{k: options.pop(k) for k in detector_keys})
    return detector_config, TrainConfig(**options)


@main.command("train-all")
@click.option("--data", required=True, help="Dataset root (MVTec AD layout): local path, s3:// or gs:// URL.")
@click.option("--models", required=True, help="Model store URL; models land in <models>/<category>/<version>/.")
@click.option("--categories", default=None, help="Comma-separated categories (default: every category under --data).")
@click.option("--num-cpus", default=_default(TaskResources, "num_cpus"), show_default=True, help="CPUs per category task.")
@click.option("--num-gpus", default=None, type=float, help="GPUs per category task (default: 1 if the cluster has GPUs, else 0).")
@click.option("--max-attempts", default=_default(TaskResources, "max_attempts"), show_default=True, help="Attempts per category before it is reported failed.")
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance).")
@click.option("--category-kinds", default=None,
              help="Another flow for some categories, e.g. washer=fastflow,fabric=cflow (the others use --kind).")
@detector_options
@training_options
def train_all(data, models, categories, num_cpus, num_gpus, max_attempts, address, category_kinds, **options) -> None:
    """Train every category in parallel on a Ray cluster and publish the models."""
    from .pipelines.ray_env import prepare_ray_env

    prepare_ray_env(address)  # before Ray is imported: it reads some settings only then
    from .pipelines.cluster import ray_session
    from .pipelines.train_all import train_all as run_train_all

    detector_config, train_config = _split_configs(options)
    kinds = parse_category_kinds(category_kinds)
    resources = TaskResources(num_cpus=num_cpus, num_gpus=num_gpus, max_attempts=max_attempts)
    from .data import discover_categories

    wanted = [c for c in categories.split(",") if c] if categories else discover_categories(data)
    if stray := sorted(set(kinds) - set(wanted)):
        raise ConfigError(f"--category-kinds names categories that are not trained: {', '.join(stray)}")
    with ray_session(address), tqdm(total=len(wanted), desc="categories", unit="category", file=sys.stderr) as bar:
        outcomes = run_train_all(data, models, wanted, detector_config, train_config, resources,
                                 on_done=lambda o: (bar.update(), bar.set_postfix_str(f"{o.category}: {o.status}")), kinds=kinds,
                                 on_progress=lambda latest: bar.set_postfix_str(_epochs_line(latest)))
    rows = [{**o.as_dict(), "seconds": round(o.seconds, 1), "best_val_loss": o.best_val_loss if o.best_val_loss is not None else "-",
             "model_version": o.model_version or "-", "node": (o.node_id or "-")[:8]} for o in outcomes]
    click.echo(format_table(rows, [("status", "status"), ("attempts", "attempts"), ("epochs", "epochs"),
                                   ("best_val_loss", "best val loss"), ("seconds", "seconds"), ("model_version", "model version"),
                                   ("node", "node")]))
    failed = [o for o in outcomes if o.status != "ok"]
    for outcome in failed:
        click.echo(f"{outcome.category} failed: {outcome.error}", err=True)
    if failed:
        click.get_current_context().exit(1)


def _epochs_line(latest: dict) -> str:
    """``tile_exp1 12/200 val -3.1e+04, ...``: where each category still training stands."""
    return ", ".join(f"{c} {p.epoch}/{p.max_epochs} val {p.val_loss:.3g}" for c, p in sorted(latest.items()))


def _print_preview(counts: dict) -> None:
    columns = [("to_score", "to score"), ("done", "already scored"), ("no_model", "no model"),
               ("late", "late (second pass)")]
    rows = [{"category": c, **{key: n[key] for key, _ in columns}} for c, n in sorted(counts.items())]
    click.echo(format_table(rows, columns))


def _print_score_summary(summary) -> None:
    codes = sorted({code for counts in summary.by_category.values() for code in counts})
    rows = [
        {"category": c, "version": summary.model_versions.get(c) or "-", **{code: counts.get(code, 0) for code in codes}}
        for c, counts in sorted(summary.by_category.items())
    ]
    click.echo(f"{summary.rows_written} rows in {summary.files_written} part files")
    if summary.run_id:
        click.echo(f"run {summary.run_id} {summary.status}: {summary.errors} errors in {summary.rows_written} rows "
                   f"({summary.error_fraction:.1%}); run log {summary.run_record}")
    if rows:
        click.echo(format_table(rows, [("version", "model version")] + [(code, code) for code in codes]))
    if summary.late:
        per_category = ", ".join(f"{category} {n}" for category, n in sorted(summary.late.items()))
        click.echo(f"note: {sum(summary.late.values())} images modified after the run started (a clock ahead of this "
                   f"machine's, or still arriving) were scored in a second pass: {per_category} "
                   f"(e.g. {', '.join(summary.late_examples)})")


def _run_scoring(request, address: str | None, dry_run: bool):
    from .pipelines.ray_env import prepare_ray_env

    prepare_ray_env(address)  # before Ray is imported: it reads some settings only then
    from .pipelines.cluster import ray_session
    from .pipelines.score import preview, run_scoring

    if dry_run:
        _print_preview(preview(request))
        return None
    with ray_session(address):
        summary = run_scoring(request)
    _print_score_summary(summary)
    return summary


# ScoreRequest fields without an option: the run date defaults to today here (to the job's lag in run-job),
# the category source follows --manifest, and the listing block and retries are tuning the CLI leaves alone.
SCORE_FIELDS_WITHOUT_OPTION = ("run_date", "category_from", "listing_block_rows", "storage_retries")


@main.command()
@config_options(ScoreRequest, skip=SCORE_FIELDS_WITHOUT_OPTION)
@click.option("--run-date", default=None, help="Run date YYYY-MM-DD (default: today, UTC).")
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance).")
@click.option("--dry-run", is_flag=True, help="Print what would be scored (lists the inputs), score nothing.")
def score(run_date, address, dry_run, **options) -> None:
    """Score image archives into Parquet (streaming, resumable, one row per image)."""
    request = config_from_options(
        ScoreRequest, options, run_date=run_date or datetime.now(timezone.utc).date().isoformat(),
        category_from="manifest" if options["manifest"] else "path",
    )
    _exit_if_too_many_errors(_run_scoring(request, address, dry_run), "--max-error-fraction")


def _exit_if_too_many_errors(summary, name: str) -> None:
    """One line on stderr and exit code 3 when the run's error fraction passed its threshold."""
    if summary is None or not summary.over_error_threshold:
        return
    click.echo(f"error: {summary.errors} of {summary.rows_written} rows are errors ({summary.error_fraction:.1%}), "
               f"above {name} {summary.max_error_fraction:g}; the run is marked partial in {summary.run_record}", err=True)
    click.get_current_context().exit(EXIT_TOO_MANY_ERRORS)


@main.command("run-job")
@click.argument("spec")
@click.option("--run-date", default=None, help="Run date YYYY-MM-DD (default: today UTC minus the spec's lag_days).")
@click.option("--dry-run", is_flag=True, help="Resolve the spec, print what would be scored and deleted, change nothing.")
def run_job(spec, run_date, dry_run) -> None:
    """Run a nightly job spec (YAML, local or in object storage); idempotent per run date."""
    from .jobs import apply_job_retention, load_job_spec

    job = load_job_spec(spec)
    today = datetime.now(timezone.utc).date()
    run_date = validate_run_date(run_date) if run_date else job.default_run_date(today)
    request = job.request_for(run_date)
    click.echo(f"job {job.name}: run date {run_date}, inputs {', '.join(request.inputs) or request.manifest} -> {job.output}")
    summary = _run_scoring(request, job.ray_address, dry_run)
    # A night over its error threshold is not a success: retention, which runs only after one, waits.
    _exit_if_too_many_errors(summary, "max_error_fraction")
    click.echo(apply_job_retention(job, run_date, today, dry_run=dry_run))


EVALUATION_COLUMNS = [
    ("kind", "kind"), ("image_auroc", "img AUROC"), ("pixel_auroc", "px AUROC"), ("aupro", "AUPRO"),
    ("false_alarms_good", "false alarms"), ("recall", "recall"), ("oracle_recall", "oracle recall"),
    ("iou_nfa", "IoU NFA"), ("iou_fair", "IoU fair"), ("iou_oracle", "IoU oracle"),
    ("mean_iou_nfa", "mIoU NFA"), ("mean_iou_fair", "mIoU fair"), ("mean_iou_oracle", "mIoU oracle"),
    ("image_auroc_nfa", "img AUROC (NFA)"), ("ms_per_image", "ms/img"), ("training_seconds", "train s"),
    ("trainable_parameters", "parameters"),
]


def format_table(rows: list[dict], columns: list[tuple[str, str]], first: tuple[str, str] = ("category", "category")) -> str:
    """A plain-text table; floats with 3 decimals."""
    columns = [first, *columns]
    cells = [[label for _, label in columns]]
    for row in rows:
        cells.append([f"{row[key]:.3f}" if isinstance(row[key], float) else str(row[key]) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _models_to_evaluate(model_dirs: tuple[str, ...], store_url: str | None) -> list[tuple[str, str | None]]:
    """(local model directory, category) pairs from --model options and/or a model store."""
    from .storage import ModelStore

    pairs: list[tuple[str, str | None]] = [(directory, None) for directory in model_dirs]
    if store_url:
        store = ModelStore(store_url)
        pairs += [(str(store.fetch(category)[0]), category) for category in store.categories()]
    if not pairs:
        raise click.UsageError("give --model DIR (repeatable) or --models STORE_URL")
    return pairs


@main.command()
@click.option("--data", required=True, help="Dataset root (MVTec AD layout) holding the test split; local path or URL.")
@click.option("--model", "model_dirs", multiple=True, help="Local model directory; repeat for several categories.")
@click.option("--models", "store_url", default=None, help="Model store URL: evaluate the current model of every category.")
@click.option("--category", default=None, help="Category to evaluate (default: the one recorded in the model).")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=EVALUATION_BATCH_SIZE, show_default=True, help="Test images per forward pass.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Write the metrics as JSON here.")
@click.option("--figure-out", default=None, type=click.Path(dir_okay=False),
              help="Write the calibration curves (false detections per good image against epsilon) as a PNG here.")
@click.option("--nfa-test", type=click.Choice(list(NFA_TESTS)), default=None,
              help="Try the other a-contrario test on the same model (the block test needs no calibration; "
                   "the scan test is calibrated by training or by `uflow-batch calibrate`).")
@click.option("--nfa-windows", default=None,
              help="Try other block-test sides, finest scale first (default: the model's); the flow is not retrained.")
@click.option("--nfa-p", default=None, type=float, help="Try another block-test candidate level (default: the model's).")
@click.option("--mask-p", default=None, type=float, help="Try another scan-test mask level (default: the model's).")
@click.option("--false-alarm-rate", default=None, type=float, help="Try another image verdict level (default: the model's).")
@click.option("--epsilon", default=None, type=float, help="Try another mask threshold (default: the model's).")
def evaluate(data, model_dirs, store_url, category, device, batch_size, json_out, figure_out, nfa_test, nfa_windows, nfa_p,
             mask_p, false_alarm_rate, epsilon) -> None:
    """Ranking (AUROC, AUPRO), verdict (false alarms, recall) and masks (IoU) on the test split."""
    from .checkpoint import load_detector, read_manifest
    from .evaluate import evaluate_detector
    from .model import resolve_device

    nfa_overrides = {
        key: value
        for key, value in {"test": nfa_test, "p": nfa_p, "mask_p": mask_p, "windows": _ints(nfa_windows),
                           "false_alarm_rate": false_alarm_rate, "epsilon": epsilon}.items()
        if value is not None
    }
    rows = []
    for model_dir, store_category in _models_to_evaluate(model_dirs, store_url):
        manifest = read_manifest(model_dir)
        detector = load_detector(model_dir, device=resolve_device(device))
        if nfa_overrides:
            detector.use_nfa(dataclasses.replace(detector.config.nfa, **nfa_overrides))
        name = category or store_category or manifest.category
        if not name:
            raise click.UsageError(f"{model_dir} records no category; pass --category")
        with tqdm(desc=f"evaluate {name}", unit="img", file=sys.stderr) as bar:
            report = evaluate_detector(detector, data, name, batch_size=batch_size,
                                       on_image=lambda done, total: _advance(bar, done, total),
                                       fair_threshold=manifest.fair_threshold,
                                       training_seconds=manifest.training_seconds)
        rows.append(report.as_dict())
    for kind in sorted({r["kind"] for r in rows}):
        of_kind = [r for r in rows if r["kind"] == kind]
        if len(of_kind) > 1:
            mean = {key: sum(r[key] for r in of_kind) / len(of_kind) for key, _ in EVALUATION_COLUMNS if key != "kind"}
            rows.append({"category": "mean", "kind": kind, **mean})
    click.echo(format_table(rows, EVALUATION_COLUMNS))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))
    if figure_out:
        from .figures import calibration_figure

        calibration_figure([r for r in rows if r.get("calibration_curve")], figure_out)


@main.command()
@click.option("--model", "model_dirs", required=True, multiple=True, help="Local model directory (repeatable).")
@click.option("--data", required=True, help="The dataset root the models were trained on (its train/good is re-read).")
@click.option("--nfa-test", type=click.Choice(list(NFA_TESTS)), default=None, help="Switch the model to this test (default: keep its own).")
@click.option("--device", default="auto", show_default=True)
def calibrate(model_dirs, data, nfa_test, device) -> None:
    """Fit a trained model's verdict again on its held-out normal images, without retraining.

    Models saved before the scan test existed keep the paper's block test
    until they are calibrated with --nfa-test scan.
    """
    from .train import recalibrate

    for model_dir in model_dirs:
        calibration = recalibrate(model_dir, data, test=nfa_test, device=device)
        alarms = calibration.false_alarms
        curve = ", ".join(f"{d:.2g} at {e:g}" for e, d in zip(alarms.epsilons, alarms.detections_per_image))
        click.echo(f"{model_dir}: calibrated on {calibration.n_images} held-out normal images; "
                   f"false detections per image: {curve}")


@main.command()
@click.option("--scores", required=True, help="Root of the scores dataset (local path or s3:// URL).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--top", default=REPORT_TOP_N, show_default=True, help="How many of the most anomalous images to show.")
@click.option("--category", "categories", multiple=True, help="Only these categories (repeatable).")
@click.option("--run-date", "run_dates", multiple=True, help="Only these run dates, YYYY-MM-DD (repeatable).")
def report(scores, out, top, categories, run_dates) -> None:
    """Write a self-contained HTML defect report from a scores dataset."""
    from .report import build_report

    summary = build_report(scores, out, top_n=top, categories=categories or None, run_dates=run_dates or None)
    click.echo(
        f"{summary.out_path}: {summary.n_images} images, {summary.n_anomalous} anomalous, "
        f"{summary.n_errors} errors, {summary.size_bytes / 1e6:.1f} MB"
    )


@main.command()
@click.argument("name", required=False)
@click.option("--scores", default=None, help="Root of the scores dataset (local path or s3:// URL).")
@click.option("--limit", default=50, show_default=True, help="Rows to print at most (table format only).")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="table for people; csv or json (one object per line) for scripts, every row.")
def query(name, scores, limit, output_format) -> None:
    """Run one of the shipped analyst queries (DuckDB); without NAME, list them."""
    from .analysts import query_names, run_query

    if not name:
        click.echo("\n".join(query_names()))
        return
    if not scores:
        raise click.UsageError("--scores is required to run a query")
    if name not in query_names():
        raise click.UsageError(f"no query named {name!r}; known: {', '.join(query_names())}")
    table = run_query(name, scores)
    if output_format == "csv":
        click.echo(table.to_pandas().to_csv(index=False), nl=False)
    elif output_format == "json":
        click.echo(table.to_pandas().to_json(orient="records", lines=True, date_format="iso"), nl=False)
    else:
        click.echo(table.slice(0, limit).to_pandas().to_string(index=False))
        if table.num_rows > limit:
            click.echo(f"... {table.num_rows - limit} more rows")


RUN_COLUMNS = [("run_id", "run"), ("status", "status"), ("started_at", "started"), ("ended_at", "ended"),
               ("rows", "rows"), ("errors", "errors"), ("error_fraction", "error fraction"), ("reason", "reason")]


@main.command("runs")
@click.option("--scores", required=True, help="Root of the scores dataset (a scoring run's --output).")
@click.option("--run-date", "run_dates", multiple=True, help="Only these run dates, YYYY-MM-DD (repeatable; default: all).")
def runs(scores, run_dates) -> None:
    """List the scoring runs from the run log (<scores>/_runs/): status, counts, errors, oldest first."""
    from .pipelines import runlog

    rows = [{**record, **{key: "-" if record.get(key) is None else record[key] for key, _ in RUN_COLUMNS}}
            for run_date in (run_dates or runlog.run_dates(scores)) for record in runlog.run_records(scores, validate_run_date(run_date))]
    if not rows:
        click.echo(f"no run records under {scores}")
        return
    click.echo(format_table(rows, RUN_COLUMNS, first=("run_date", "run date")))


@main.command("export")
@click.option("--model", "model_dir", required=True, help="Local model directory (model.safetensors + manifest.json).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True,
              help="onnx (ONNX Runtime, TensorRT, ...) or torchscript (torch.jit.load).")
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="File to write (default: model.onnx or model.torchscript.pt in --model).")
def export_model(model_dir, fmt, output) -> None:
    """Write backbone + flow + anomaly map as one graph (batch dynamic); the NFA verdict stays in torch.

    Input: normalized images (B, 3, H, W); outputs: the anomaly map (B, H, W)
    and the latents, finest first. The written file is run once on a batch
    of another size and compared with torch.
    """
    import importlib

    from .manifest import ModelFormatError

    if fmt == "onnx":
        try:
            importlib.import_module("onnx")
        except ImportError:
            raise click.ClickException("--format onnx needs the onnx package: pip install 'uflow-batch[export]'") from None
    from .checkpoint import load_detector
    from .export import default_output, export_detector

    try:
        detector = load_detector(model_dir)
    except ModelFormatError as exc:
        raise ConfigError(f"--model {model_dir}: {exc}") from exc
    result = export_detector(detector, output or default_output(model_dir, fmt), fmt)
    check = ("not run (onnxruntime is not installed)" if result.max_abs_error_anomaly is None else
             f"anomaly map {result.max_abs_error_anomaly:.1e}, latents {result.max_scaled_error_latents:.1e} (|d| / (1 + |z|))")
    height, width = detector.input_size
    click.echo(f"{result.path}: {detector.config.kind} scoring graph ({fmt}), input (B, 3, {height}, {width}) normalized, "
               f"{len(detector.flow.latent_shapes)} latents; largest difference to torch: {check}")


@main.command("backbones")
def list_backbones() -> None:
    """List the registered backbones."""
    from .model.backbones import backbone_spec

    for name in available_backbones():
        click.echo(f"{name:18s} {backbone_spec(name).description}")


def run() -> None:
    """Entry point with errors mapped to exit codes and short messages."""
    from .storage import redact

    try:
        code = main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except ConfigError as exc:
        click.echo(f"configuration error: {redact(str(exc))}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: a message, not a traceback
        log.debug("failure", exc_info=True)
        click.echo(f"error: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
