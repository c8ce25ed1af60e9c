"""Configuration as frozen dataclasses, validated when built.

Every knob that changes a model's behaviour lives here, so a model manifest can
record the exact configuration it was trained with and a loader can rebuild it
with no code paths or pickles. Values are checked in ``__post_init__`` so a bad
value fails at the edge (CLI, job spec, manifest) with a message naming the
field, never deep inside a training loop.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from datetime import date
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def require(condition: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def is_int(value: Any) -> bool:
    """A real integer (YAML's ``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a (possibly nested) config dataclass from plain JSON/YAML data.

    Unknown keys are an error rather than silently ignored: a typo in a job
    spec must not train a model with a default the user did not ask for.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    check_known_fields(cls.__name__, data, (f.name for f in dataclasses.fields(cls)))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong types that dataclasses cannot coerce
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def check_known_fields(where: str, data: dict[str, Any], known: Iterable[str]) -> None:
    """Refuse keys that are no field, suggesting the field a typo most likely meant (``ouput`` -> ``output``)."""
    known = sorted(known)
    unknown = sorted(set(data) - set(known))
    if not unknown:
        return
    hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(key), known, n=1)) else repr(key)
             for key in unknown]
    raise ConfigError(f"{where}: unknown field(s) {', '.join(hints)}; known: {known}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(config)


def check_category_pattern(pattern: str) -> re.Pattern:
    """A regex that reads an image's category from its path: it needs a group named ``category``."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"category pattern {pattern!r} is not a valid regular expression: {exc}") from None
    require("category" in compiled.groupindex,
             f"category pattern {pattern!r} needs a group named 'category', e.g. '^(?P<category>[^/]+)/'")
    return compiled


_RUN_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Categories and model versions become directory names (category=<name>, <store>/<category>/<version>).
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CATEGORY_SOURCES = ("path", "manifest")


def validate_run_date(run_date: Any) -> str:
    """``run_date`` as a real calendar date in ``YYYY-MM-DD`` form, else a ConfigError."""
    ok = isinstance(run_date, str) and _RUN_DATE_RE.match(run_date) is not None
    if ok:
        try:
            date.fromisoformat(run_date)
        except ValueError:
            ok = False
    require(ok, f"run_date must be a date as YYYY-MM-DD, got {run_date!r}")
    return run_date


def is_safe_name(name: Any) -> bool:
    """One folder name, never a path: letters, digits, '.', '_', '-', starting with a letter or digit, no '..'."""
    return isinstance(name, str) and _SAFE_NAME_RE.match(name) is not None and ".." not in name


def is_category_name(name: Any) -> bool:
    return is_safe_name(name)


def check_categories(categories: Any) -> None:
    require(isinstance(categories, tuple) and len(categories) >= 1,
            f"categories must be a non-empty list (omit it to score every category with a model), got {categories!r}")
    for i, name in enumerate(categories):
        require(is_category_name(name),
                f"categories[{i}] must be a category directory name (letters, digits, '.', '_', '-'), got {name!r}")
    require(len(set(categories)) == len(categories), f"categories has duplicates: {list(categories)}")


def check_category_source(category_from: Any, pattern: str | None, manifest: str | None) -> None:
    """Where categories come from: folders (optionally through a pattern) or a manifest, never both."""
    require(category_from in CATEGORY_SOURCES, f"category_from must be one of {list(CATEGORY_SOURCES)}, got {category_from!r}")
    if pattern is not None:
        require(category_from == "path", "category_pattern is only used with category_from: path")
        check_category_pattern(pattern)
    if category_from == "manifest":
        require(manifest is not None, "manifest: a manifest URL is required when category_from is 'manifest'")
    else:
        require(manifest is None, "manifest is only used with category_from: manifest; remove it or set category_from")


def check_false_alarm_rate(rate: Any, name: str = "false_alarm_rate") -> None:
    require(rate is None or (is_number(rate) and 0 < rate < 1),
            f"{name} must be a fraction of good images in (0, 1), e.g. 0.01 (or null to keep each model's), got {rate!r}")


def check_max_error_fraction(fraction: Any, name: str = "max_error_fraction") -> None:
    require(fraction is None or (is_number(fraction) and 0 <= fraction <= 1),
            f"{name} must be a fraction of a run's rows in [0, 1], e.g. 0.05 (or null for no limit), got {fraction!r}")


_USERINFO_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*:[^/@]*@")


def check_no_credentials(name: str, url: str) -> None:
    """A URL must not carry a key and secret (``s3://KEY:SECRET@bucket``): they would reach logs and errors."""
    require(not _USERINFO_RE.match(url),
            f"{name} must not embed credentials in the URL; use the cloud role (IRSA, instance profile)")


def check_epsilon(epsilon: Any, name: str = "epsilon") -> None:
    require(epsilon is None or (is_number(epsilon) and epsilon > 0),
            f"{name} must be a number > 0 (or null to keep each model's), got {epsilon!r}")


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen feature extractor to use and at what input size.

    ``weights`` is a local file for backbones whose weights are not shipped in a
    package; without it the registry falls back to timm's hub (internet needed).
    ``layers`` picks the stages of a convolutional backbone (timm
    ``out_indices``, consecutive so each scale halves); None keeps the
    backbone's default.
    """

    name: str = "lite0"
    input_size: tuple[int, int] = (256, 256)
    weights: str | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
            require(
                len(self.layers) >= 1 and list(self.layers) == sorted(set(self.layers)),
                f"backbone.layers must be increasing stage indices, got {self.layers}",
            )
        require(len(self.input_size) == 2, f"backbone.input_size must be (height, width), got {self.input_size}")
        require(
            all(v >= 32 and v % 32 == 0 for v in self.input_size),
            f"backbone.input_size must be multiples of 32 of at least 32, got {self.input_size}",
        )


@dataclass(frozen=True)
class FlowConfig:
    """The U-shaped flow: Glow-style steps per scale, coupling clamp, kernels."""

    steps_per_stage: int = 4
    affine_clamp: float = 2.0
    subnet_kernels: tuple[int, ...] = (3, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subnet_kernels", tuple(int(k) for k in self.subnet_kernels))
        require(self.steps_per_stage >= 1, "flow.steps_per_stage must be >= 1")
        require(self.affine_clamp > 0, "flow.affine_clamp must be > 0")
        require(
            len(self.subnet_kernels) >= 1 and all(k >= 1 and k % 2 == 1 for k in self.subnet_kernels),
            f"flow.subnet_kernels must be odd sizes, got {self.subnet_kernels}",
        )


NFA_TESTS = ("scan", "block")
# The flows a detector can use (uflow_batch.model.registry builds them): U-Flow, FastFlow, CFlow-AD, CS-Flow, DifferNet.
MODEL_KINDS = ("uflow", "fastflow", "cflow", "csflow", "differnet")


@dataclass(frozen=True)
class NFAConfig:
    """The a-contrario verdict: which test, its windows, and the two thresholds.

    ``test`` is ``scan`` (chi-square evidence in blocks of the
    ``scan_windows`` sides on every latent scale, combined across scales at
    each cell, its background fitted on held-out normal images) or ``block`` (the paper's test: candidates z^2 above the
    chi-square(1) quantile at ``p`` counted in blocks of side ``windows``
    per scale, finest first).
    ``mask_p`` is the scan test's: in a flagged image, a cell is painted into
    the mask only where a detection covers it and its own single-cell tail
    probability is below 1 - ``mask_p`` (so a normal cell is painted by
    chance once in a hundred, not once in ten).

    ``false_alarm_rate`` decides the image verdict: an image is anomalous
    when its smallest NFA is below it, so at most that fraction of normal
    images is flagged. ``epsilon`` is the mask threshold: in a flagged image,
    the pixels with NFA < epsilon.
    """

    test: str = "scan"
    p: float = 0.9
    windows: tuple[int, ...] = (5, 3)
    scan_windows: tuple[int, ...] = (1, 3, 5)
    mask_p: float = 0.99
    epsilon: float = 1.0
    false_alarm_rate: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple(int(w) for w in self.windows))
        object.__setattr__(self, "scan_windows", tuple(int(w) for w in self.scan_windows))
        require(self.test in NFA_TESTS, f"nfa.test must be one of {list(NFA_TESTS)}, got {self.test!r}")
        for name in ("p", "mask_p"):
            require(0.0 < getattr(self, name) < 1.0, f"nfa.{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("windows", "scan_windows"):
            value = getattr(self, name)
            require(len(value) >= 1 and all(w >= 1 and w % 2 == 1 for w in value),
                    f"nfa.{name} must be odd block sizes, got {value}")
        require(1 in self.scan_windows, f"nfa.scan_windows must include 1 so single cells can fire, got {self.scan_windows}")
        require(self.epsilon > 0, f"nfa.epsilon must be > 0, got {self.epsilon}")
        require(self.false_alarm_rate is not None, "nfa.false_alarm_rate must be set")
        check_false_alarm_rate(self.false_alarm_rate, "nfa.false_alarm_rate")


IMAGE_SCORES = ("anomaly_max", "nfa_max")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a trained detector's architecture and outputs.

    ``kind`` names the flow between the frozen features and the latents
    (:data:`MODEL_KINDS`); backbone, training, verdict and outputs are shared
    by every kind, and ``flow`` sets each kind's steps per scale and clamp.
    """

    kind: str = "uflow"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    nfa: NFAConfig = field(default_factory=NFAConfig)
    image_score: str = "anomaly_max"

    def __post_init__(self) -> None:
        require(self.kind in MODEL_KINDS, f"kind must be one of {list(MODEL_KINDS)}, got {self.kind!r}")
        require(self.image_score in IMAGE_SCORES, f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")


def parse_category_kinds(text: str | None) -> dict[str, str]:
    """``washer=fastflow,fabric=cflow`` -> {category: kind}, each name and kind checked."""
    kinds: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        category, equals, kind = item.partition("=")
        require(bool(equals) and is_safe_name(category), f"category kinds: {item!r} must be CATEGORY=KIND")
        require(kind in MODEL_KINDS, f"category kinds: {category}={kind!r}: the kind must be one of {list(MODEL_KINDS)}")
        kinds[category] = kind
    return kinds


@dataclass(frozen=True)
class TrainConfig:
    """How one category's flow is fitted on cached backbone features."""

    max_epochs: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 3
    val_fraction: float = 0.15
    patience: int = 25
    seed: int = 0
    skip_corrupt: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        require(self.max_epochs >= 1, "train.max_epochs must be >= 1")
        require(self.batch_size >= 1, "train.batch_size must be >= 1")
        require(self.learning_rate > 0, "train.learning_rate must be > 0")
        require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        require(self.warmup_epochs >= 0, "train.warmup_epochs must be >= 0")
        require(0.0 < self.val_fraction < 1.0, "train.val_fraction must be in (0, 1)")
        require(self.patience >= 1, "train.patience must be >= 1")


@dataclass(frozen=True)
class TaskResources:
    """What one category's training task asks of the cluster.

    ``num_gpus=None`` means one GPU when the cluster has any, none otherwise.
    """

    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_attempts: int = 3

    def __post_init__(self) -> None:
        require(self.num_cpus > 0, f"CPUs per training task must be > 0, got {self.num_cpus}")
        require(self.num_gpus is None or self.num_gpus >= 0, f"GPUs per training task must be >= 0, got {self.num_gpus}")
        require(is_int(self.max_attempts) and self.max_attempts >= 1,
                f"attempts per category must be an integer >= 1, got {self.max_attempts}")


SCORING_RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class ScoringResources:
    """How the scoring pipeline sizes its Ray work: inference actors, their batches, the decode tasks.

    Each field's help (its ``metadata``) is what ``uflow-batch score --help`` prints.
    """

    batch_size: int = field(default=16, metadata={"help": "Images per inference batch."})
    gpus_per_actor: float | None = field(default=None, metadata={
        "help": "GPUs per inference actor (default: 1 if the cluster has GPUs, else 0 = CPU inference); "
                "a fraction such as 0.5 packs two actors per GPU."})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved by each inference actor."})
    actors: int = field(default=1, metadata={"help": "Inference actors (each holds the models it needs)."})
    decode_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved by each read/decode task."})
    runtime: str = field(default="torch", metadata={
        "help": "What runs the model on CPU actors: torch, or onnx (ONNX Runtime on the exported graph, the "
                "verdict in torch; ~1.7x torch on one thread; needs the 'export' extra). GPU actors use torch."})

    def __post_init__(self) -> None:
        require(is_int(self.batch_size) and self.batch_size >= 1,
                 f"resources.batch_size must be an integer >= 1, got {self.batch_size!r}")
        require(self.gpus_per_actor is None or (is_number(self.gpus_per_actor) and self.gpus_per_actor >= 0),
                 f"resources.gpus_per_actor must be a number >= 0, got {self.gpus_per_actor!r}")
        require(is_number(self.cpus_per_actor) and self.cpus_per_actor > 0,
                 f"resources.cpus_per_actor must be a number > 0, got {self.cpus_per_actor!r}")
        require(is_int(self.actors) and self.actors >= 1,
                 f"resources.actors must be an integer >= 1, got {self.actors!r}")
        require(is_number(self.decode_cpus) and self.decode_cpus > 0,
                 f"resources.decode_cpus must be a number > 0, got {self.decode_cpus!r}")
        require(self.runtime in SCORING_RUNTIMES,
                f"resources.runtime must be one of {', '.join(SCORING_RUNTIMES)}, got {self.runtime!r}")
        for name in ("gpus_per_actor", "cpus_per_actor", "decode_cpus"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    """What a scoring run selects, how it overrides the models' verdict, how it sizes its work.

    The one definition of these knobs: a :class:`ScoreRequest` (one run) and a
    nightly :class:`~uflow_batch.jobs.JobSpec` both are ScoringSettings, and
    the ``score`` command's options are generated from the fields (help text
    in each field's ``metadata``), so a knob and its default are written once.
    Keyword-only, so each subclass keeps its own required fields first.

    ``SPELLING`` maps a field to the name its users write where the two differ
    (a job spec says ``nfa_epsilon``); error messages use that name.
    """

    SPELLING: ClassVar[dict[str, str]] = {}

    categories: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Categories to score, comma-separated (default: every category found)."})
    category_from: str = field(default="path", metadata={
        "help": "Where an image's category comes from: 'path' (its folder) or 'manifest'."})
    category_pattern: str | None = field(default=None, metadata={
        "help": "Regex with a group named 'category', searched in each object's path under its input root "
                "(default: the first folder, i.e. '^(?P<category>[^/]+)/')."})
    manifest: str | None = field(default=None, metadata={
        "help": "CSV/JSONL manifest (uri,category) instead of categories from paths."})
    epsilon: float | None = field(default=None, metadata={
        "help": "Override the models' mask threshold epsilon (pixels of a flagged image with NFA below it)."})
    false_alarm_rate: float | None = field(default=None, metadata={
        "help": "Override the models' image verdict: the share of good images that may be flagged, e.g. 0.01."})
    max_error_fraction: float | None = field(default=None, metadata={
        "help": "Fail the run (exit code 3, status 'partial' in its run log) when more than this fraction of the "
                "rows it writes are errors, e.g. 0.05 (default: never)."})
    resources: ScoringResources = field(default_factory=ScoringResources)

    def spelt(self, name: str) -> str:
        """A field's name as this kind of settings is written (``nfa_epsilon`` in a job spec)."""
        return self.SPELLING.get(name, name)

    def __post_init__(self) -> None:
        if isinstance(self.categories, list):
            object.__setattr__(self, "categories", tuple(self.categories))
        if self.categories is not None:
            check_categories(self.categories)
        check_category_source(self.category_from, self.category_pattern, self.manifest)
        if self.manifest is not None:
            check_no_credentials("manifest", self.manifest)
        check_epsilon(self.epsilon, self.spelt("epsilon"))
        check_false_alarm_rate(self.false_alarm_rate, self.spelt("false_alarm_rate"))
        check_max_error_fraction(self.max_error_fraction, self.spelt("max_error_fraction"))
        require(isinstance(self.resources, ScoringResources),
                f"resources must be ScoringResources (in a spec: a mapping of "
                f"{sorted(ScoringResources.__dataclass_fields__)}), got {self.resources!r}")

    @property
    def category_filter(self) -> list[str] | None:
        """The categories to score, or None for every category found."""
        return list(self.categories) if self.categories else None


@dataclass(frozen=True)
class ScoreRequest(ScoringSettings):
    """One scoring run: what to read, which models, where to write, with which :class:`ScoringSettings`.

    Every value is checked here, before anything is read or written: a wrong
    value found mid-run could commit rows that a corrected re-run then skips.
    """

    inputs: tuple[str, ...] = field(metadata={
        "help": "Archive root to score (repeatable): <root>/<category>/... ; local path, s3:// or gs:// URL.",
        "option": "--input", "repeatable": True})
    models: str = field(metadata={"help": "Model store URL written by train-all."})
    output: str = field(metadata={"help": "Output root; Parquet lands in <output>/category=<c>/run_date=<d>/."})
    run_date: str = field(metadata={"help": "Run date YYYY-MM-DD."})
    listing_block_rows: int = field(default=64, metadata={"help": "Listed objects per block a read task yields."})
    rows_per_file: int = field(default=256, metadata={
        "help": "Rows gathered before a Parquet part file is committed (smaller: finer resume points)."})
    storage_retries: int = field(default=8, metadata={"help": "Ray Data retries of a task that failed on a transient storage error."})

    def __post_init__(self) -> None:
        # The same root written twice ('a' and 'a/') would be listed, and scored, twice.
        inputs = tuple(dict.fromkeys(url.rstrip("/") for url in self.inputs))
        object.__setattr__(self, "inputs", inputs)
        validate_run_date(self.run_date)
        super().__post_init__()
        require(bool(inputs) or self.category_from == "manifest", "no inputs to score")
        for name in ("models", "output"):
            require(isinstance(getattr(self, name), str) and getattr(self, name) != "", f"{name} must be a URL or path")
            check_no_credentials(name, getattr(self, name))
        for i, url in enumerate(inputs):
            check_no_credentials(f"inputs[{i}]", url)
        for name in ("listing_block_rows", "rows_per_file", "storage_retries"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, f"{name} must be an integer >= 1")


# Defaults of library functions that the CLI also offers (``evaluate --batch-size``,
# ``report --top``), defined here so the command shows the library's own value.
EVALUATION_BATCH_SIZE = 8  # test images per forward pass in evaluate_detector
REPORT_TOP_N = 24  # most anomalous images a report shows
