"""Nightly job specs: what to score, with which models, where to write, how long to keep it.

A job spec is a small YAML file (local, or in object storage next to the data,
so a scheduler pod needs nothing but its URL). It is validated completely when
loaded, with every error naming the offending field: a nightly run that starts
at 02:00 must fail at 02:00 on a typo, not at 03:40 after reading half the
archive. Schedulers (a Kubernetes CronJob, plain cron) only decide *when*
``uflow-batch run-job`` runs; the spec is the one place that says *what* runs.

This module knows nothing of Ray or of scoring. It resolves a spec for one run
date (:meth:`JobSpec.inputs_for`, :meth:`JobSpec.manifest_for`,
:meth:`JobSpec.default_run_date`) and applies its retention policy to its
output after a run (:func:`apply_job_retention`; what a night's deletion means
is the scores dataset's, :mod:`uflow_batch.scores.retention`); the CLI hands
the rest to the scoring pipeline.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, ClassVar

import yaml

from uflow_batch import storage
from uflow_batch.config import (
    ConfigError,
    ScoreRequest,
    ScoringResources,
    ScoringSettings,
    check_known_fields,
    check_no_credentials,
    from_dict,
    is_int,
    is_number,
    require,
    to_dict,
    validate_run_date,
)
from uflow_batch.scores.retention import apply_retention, expired_run_dates

RUN_DATE_PLACEHOLDER = "{run_date}"

# The CronJob names each night's RayJob ``<name>-<YYYYMMDD>`` (9 more characters),
# and KubeRay >= 1.4 rejects a RayJob whose name is over 47 characters or not a
# DNS-1035 label (it derives the cluster's and submitter's names from it, and
# Kubernetes caps those at 63): a spec name is a DNS-1035 label of at most 38.
MAX_NAME_LENGTH = 47 - len("-YYYYMMDD")
_NAME_RE = re.compile(rf"^[a-z]([a-z0-9-]{{0,{MAX_NAME_LENGTH - 2}}}[a-z0-9])?$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_RAY_ADDRESS_RE = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


# --- cron -----------------------------------------------------------------------------------

_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_WEEKDAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
# (name, lowest, highest, names allowed, '?' allowed)
_CRON_FIELDS = (
    ("minute", 0, 59, {}, False),
    ("hour", 0, 23, {}, False),
    ("day-of-month", 1, 31, {}, True),
    ("month", 1, 12, _MONTHS, False),
    ("day-of-week", 0, 7, _WEEKDAYS, True),
)


def validate_cron(expression: str, field_name: str = "schedule") -> None:
    """Check a standard 5-field cron expression (or a macro such as ``@daily``).

    Accepts what both Vixie cron and Kubernetes CronJobs accept: ``*``, values,
    ranges ``a-b``, steps ``*/n`` and ``a-b/n``, lists ``a,b``, month and
    weekday names, ``?`` for the day fields. Time zones are not part of the
    expression (a CronJob sets ``timeZone``; plain cron uses the host's), so a
    ``TZ=`` prefix is refused rather than half-supported.
    """
    require(isinstance(expression, str) and expression.strip() != "",
             f"{field_name} must be a cron expression such as '0 2 * * *', got {expression!r}")
    text = expression.strip()
    if text.startswith("@"):
        require(text in _CRON_MACROS, f"{field_name}: unknown cron macro {text!r}; known: {list(_CRON_MACROS)}")
        return
    require(not re.match(r"^(CRON_)?TZ=", text),
             f"{field_name}: a time zone prefix is not supported ({text!r}); run dates are UTC")
    parts = text.split()
    require(len(parts) == 5,
             f"{field_name} must have 5 fields (minute hour day-of-month month day-of-week), "
             f"got {len(parts)} in {text!r}")
    for part, (name, low, high, names, question_ok) in zip(parts, _CRON_FIELDS):
        _check_cron_field(part, name, low, high, names, question_ok, field_name)


def _check_cron_field(part: str, name: str, low: int, high: int, names: dict[str, int],
                      question_ok: bool, field_name: str) -> None:
    where = f"{field_name}: {name} field {part!r}"

    def value(token: str) -> int:
        if token.upper() in names:
            return names[token.upper()]
        require(token.isdigit(), f"{where}: {token!r} is not a number" + (f" or one of {list(names)}" if names else ""))
        number = int(token)
        require(low <= number <= high, f"{where}: {number} is out of range {low}-{high}")
        return number

    if part == "?":
        require(question_ok, f"{where}: '?' is only allowed in day-of-month and day-of-week")
        return
    for item in part.split(","):
        require(item != "", f"{where}: empty list element")
        base, _, step = item.partition("/")
        if step or "/" in item:
            require(step.isdigit() and int(step) >= 1, f"{where}: step {step!r} must be a positive integer")
        if base == "*":
            continue
        first, dash, last = base.partition("-")
        start = value(first)
        if dash:
            end = value(last)
            require(start <= end, f"{where}: range {base!r} runs backwards")


# --- the spec -------------------------------------------------------------------------------

def _check_url(name: str, value: Any, placeholder_ok: bool) -> None:
    require(isinstance(value, str) and value.strip() != "", f"{name} must be a non-empty URL or path, got {value!r}")
    check_no_credentials(name, value)
    placeholders = _PLACEHOLDER_RE.findall(value)
    if not placeholder_ok:
        require(not placeholders,
                 f"{name} must not contain placeholders, got {value!r}"
                 + ("; results are already partitioned by run_date" if name == "output" else ""))
    for placeholder in placeholders:
        require(placeholder == "run_date",
                 f"{name}: unknown placeholder {{{placeholder}}} in {value!r}; only {RUN_DATE_PLACEHOLDER} is allowed")


@dataclass(frozen=True)
class JobSpec(ScoringSettings):
    """One nightly scoring job, as declared in YAML (see ``jobs/nightly-example.yaml``).

    What it scores and how (categories, verdict overrides, resources) are the
    :class:`~uflow_batch.config.ScoringSettings` a :class:`ScoreRequest` has
    too; the spec adds when and where. The spec writes the mask threshold as
    ``nfa_epsilon`` (``SPELLING``: the one place a key differs from its field).

    Run dates are UTC calendar dates. ``lag_days`` says which day's data a run
    scores when no run date is given: a job that starts at 02:00 usually scores
    the day that just ended (``lag_days: 1``).
    """

    SPELLING: ClassVar[dict[str, str]] = {"epsilon": "nfa_epsilon"}

    name: str
    schedule: str
    inputs: tuple[str, ...]
    models: str
    output: str
    retention_days: int | None = 90
    lag_days: int = 0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and _NAME_RE.match(self.name) is not None,
                 f"name must be a DNS-1035 label of 1-{MAX_NAME_LENGTH} characters of [a-z0-9-], starting with a "
                 f"letter and ending with a letter or digit: KubeRay rejects a RayJob name over 47 characters or "
                 f"not DNS-1035, and the night adds -YYYYMMDD; got {self.name!r}")
        validate_cron(self.schedule, "schedule")

        inputs = (self.inputs,) if isinstance(self.inputs, str) else self.inputs
        require(isinstance(inputs, tuple) and len(inputs) >= 1,
                 f"inputs must be a list of one or more URLs, got {self.inputs!r}")
        for i, url in enumerate(inputs):
            _check_url(f"inputs[{i}]", url, placeholder_ok=True)
        require(len(set(inputs)) == len(inputs), f"inputs has duplicates: {list(inputs)}")
        object.__setattr__(self, "inputs", tuple(inputs))
        _check_url("models", self.models, placeholder_ok=False)
        _check_url("output", self.output, placeholder_ok=False)
        if self.manifest is not None:
            _check_url("manifest", self.manifest, placeholder_ok=True)
        for name in ("epsilon", "false_alarm_rate", "max_error_fraction"):
            _number_from_yaml(self, name)
        super().__post_init__()

        require(self.retention_days is None or (is_int(self.retention_days) and self.retention_days >= 1),
                 f"retention_days must be an integer >= 1 (or null to keep everything), got {self.retention_days!r}")
        require(is_int(self.lag_days) and self.lag_days >= 0,
                 f"lag_days must be an integer >= 0, got {self.lag_days!r}")
        if self.retention_days is not None:
            require(self.lag_days < self.retention_days,
                     f"lag_days ({self.lag_days}) must be smaller than retention_days ({self.retention_days}), "
                     f"or a run would delete the partition it just wrote")
        require(self.ray_address is None
                 or (isinstance(self.ray_address, str) and _RAY_ADDRESS_RE.match(self.ray_address) is not None),
                 f"ray_address must be null, 'auto', 'local', 'ray://host:port' or 'host:port', "
                 f"got {self.ray_address!r}")

    @property
    def nfa_epsilon(self) -> float | None:
        """The mask threshold under the spec's name for it (the field is ``epsilon``)."""
        return self.epsilon

    # -- resolving one run ---------------------------------------------------------------------

    def default_run_date(self, today: date) -> str:
        """The run date a run started on ``today`` (UTC) scores when none is given."""
        return (today - timedelta(days=self.lag_days)).isoformat()

    def inputs_for(self, run_date: str) -> list[str]:
        """The input URLs of one run, with ``{run_date}`` filled in."""
        run_date = validate_run_date(run_date)
        return [url.replace(RUN_DATE_PLACEHOLDER, run_date) for url in self.inputs]

    def manifest_for(self, run_date: str) -> str | None:
        """The manifest URL of one run (``{run_date}`` filled in), or None for path categories."""
        run_date = validate_run_date(run_date)
        return None if self.manifest is None else self.manifest.replace(RUN_DATE_PLACEHOLDER, run_date)

    def request_for(self, run_date: str) -> ScoreRequest:
        """The scoring run this job makes for one run date: its settings, with the date filled in."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScoringSettings)}
        return ScoreRequest(**{**settings, "manifest": self.manifest_for(run_date)},
                            inputs=tuple(self.inputs_for(run_date)), models=self.models, output=self.output, run_date=run_date)

    def to_dict(self) -> dict[str, Any]:
        """The spec as written in YAML (``nfa_epsilon``, not the field's ``epsilon``)."""
        return {self.spelt(key): value for key, value in to_dict(self).items()}


def _number_from_yaml(spec: JobSpec, name: str) -> None:
    """YAML 1.1 reads '1e-3' (no dot) as a string: take it as the number it says, and floats as floats."""
    value = getattr(spec, name)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return  # left for the range check to name
    if is_number(value):
        object.__setattr__(spec, name, float(value))


_REQUIRED = ("name", "schedule", "inputs", "models", "output")


def job_spec_from_dict(data: Any) -> JobSpec:
    """Build and validate a :class:`JobSpec` from parsed YAML/JSON data (keys as a spec writes them)."""
    require(isinstance(data, dict), f"a job spec must be a mapping of fields, got {type(data).__name__}")
    keys = {JobSpec.SPELLING.get(f.name, f.name): f.name for f in dataclasses.fields(JobSpec)}
    check_known_fields("job spec", data, keys)  # a typo is named before what it leaves missing
    missing = [name for name in _REQUIRED if name not in data]
    require(not missing, f"job spec: missing required field(s) {missing}")
    if isinstance(data.get("resources"), dict):
        check_known_fields("resources", data["resources"], ScoringResources.__dataclass_fields__)
    if data.get("resources") is None and "resources" in data:
        data = {k: v for k, v in data.items() if k != "resources"}
    return from_dict(JobSpec, {keys[key]: value for key, value in data.items()})


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate field {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_job_spec(text: str | bytes, source: str = "<string>") -> JobSpec:
    """Parse YAML text into a validated spec; errors are prefixed with ``source``."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        return job_spec_from_dict(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"job spec {source}: not valid YAML: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"job spec {source}: {exc}") from exc


def load_job_spec(path_or_url: str) -> JobSpec:
    """Read and validate a spec from a path or any fsspec URL (``s3://.../nightly.yaml``).

    A missing file, like anything wrong inside it, raises ConfigError (exit
    code 2): both are mistakes in what the operator asked for.
    """
    try:
        text = storage.read_bytes(path_or_url)
    except FileNotFoundError:
        raise ConfigError(f"job spec {storage.redact(path_or_url)} does not exist") from None
    return parse_job_spec(text, source=path_or_url)


# --- retention -------------------------------------------------------------------------------

def apply_job_retention(job: JobSpec, run_date: str, today: date, *, dry_run: bool = False) -> str:
    """Retention after a successful run of ``run_date``; returns what was (or would be) done.

    A backfill of a date that is itself past retention skips it: it would
    delete the partition it has just written.
    """
    if job.retention_days is None:
        return "retention: keep everything"
    if run_date in expired_run_dates([run_date], today, job.retention_days):
        return f"retention skipped: run date {run_date} is itself older than {job.retention_days} days (a backfill)"
    deleted = apply_retention(job.output, today, job.retention_days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    return f"retention ({job.retention_days} days): {verb} {', '.join(deleted) if deleted else 'nothing'}"
