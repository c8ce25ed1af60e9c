"""Nightly job specs: what a valid spec means, and how each mistake is reported."""

from __future__ import annotations

import copy
from datetime import date
from pathlib import Path

import fsspec
import pytest
import yaml

from uflow_batch import storage
from uflow_batch.config import ConfigError, ScoringResources
from uflow_batch.jobs import (
    JobSpec,
    job_spec_from_dict,
    load_job_spec,
    parse_job_spec,
    validate_cron,
)
from uflow_batch.scores.retention import apply_retention, expired_run_dates

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "jobs" / "nightly-example.yaml"

MINIMAL = {
    "name": "nightly-tiles",
    "schedule": "0 2 * * *",
    "inputs": ["s3://plant-a/archive/{run_date}/"],
    "models": "s3://plant-a/models",
    "output": "s3://plant-a/scores",
}


def spec_with(**changes) -> dict:
    data = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return data


_DELETE = object()


# --- the example and the defaults ----------------------------------------------------------------

def test_the_example_spec_loads_with_every_field_as_written():
    spec = load_job_spec(str(EXAMPLE))
    assert spec.name == "nightly-tiles"
    assert spec.schedule == "0 2 * * *"
    assert spec.inputs == (
        "s3://plant-a-inspection/archive/line-1/{run_date}/",
        "s3://plant-a-inspection/archive/line-2/{run_date}/",
    )
    assert spec.categories == ("tile_exp1", "tile_exp2")
    assert spec.category_from == "path" and spec.manifest is None
    assert spec.nfa_epsilon == 1.0 and spec.max_error_fraction == 0.05
    assert spec.resources == ScoringResources(batch_size=16, gpus_per_actor=1.0, cpus_per_actor=2.0, actors=2, decode_cpus=1.0)
    assert spec.retention_days == 90 and spec.lag_days == 1 and spec.ray_address is None


def test_only_name_schedule_inputs_models_and_output_are_required():
    spec = job_spec_from_dict(MINIMAL)
    assert spec.categories is None  # every category with a model
    assert spec.category_from == "path"
    assert spec.nfa_epsilon is None  # each model keeps its own
    assert spec.resources == ScoringResources()
    assert spec.retention_days == 90
    assert spec.lag_days == 0
    assert spec.ray_address is None


def test_a_spec_is_read_through_fsspec_so_it_can_live_in_object_storage():
    url = "memory://uflow-jobs-test/specs/nightly.yaml"
    with fsspec.open(url, "wb") as out:
        out.write(EXAMPLE.read_bytes())
    assert load_job_spec(url) == load_job_spec(str(EXAMPLE))


def test_a_missing_spec_file_is_a_configuration_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_job_spec(str(tmp_path / "nope.yaml"))


def test_a_single_input_string_is_a_list_of_one():
    assert job_spec_from_dict(spec_with(inputs="s3://a/b/")).inputs == ("s3://a/b/",)


def test_yaml_1_1_exponent_without_a_dot_is_still_a_number():
    assert job_spec_from_dict(spec_with(nfa_epsilon="1e-3")).nfa_epsilon == pytest.approx(1e-3)
    assert job_spec_from_dict(spec_with(false_alarm_rate="1e-3")).false_alarm_rate == pytest.approx(1e-3)


def test_the_false_alarm_rate_of_a_spec_reaches_the_scoring_request():
    spec = job_spec_from_dict(spec_with(false_alarm_rate=0.001))
    assert spec.request_for("2026-01-01").false_alarm_rate == 0.001
    assert job_spec_from_dict(spec_with()).request_for("2026-01-01").false_alarm_rate is None, "each model keeps its own"


def test_the_error_threshold_of_a_spec_reaches_the_scoring_request():
    assert job_spec_from_dict(spec_with(max_error_fraction="5e-2")).request_for("2026-01-01").max_error_fraction == 0.05
    assert job_spec_from_dict(spec_with(max_error_fraction=0)).max_error_fraction == 0.0
    assert job_spec_from_dict(spec_with()).request_for("2026-01-01").max_error_fraction is None, "no limit by default"
    with pytest.raises(ConfigError, match=r"max_error_fraction must be a fraction of a run's rows in \[0, 1\]"):
        job_spec_from_dict(spec_with(max_error_fraction=5))


def test_round_trip_through_to_dict():
    spec = load_job_spec(str(EXAMPLE))
    assert job_spec_from_dict(spec.to_dict()) == spec


# --- every mistake names its field ----------------------------------------------------------------

BAD_SPECS = [
    # (what is wrong, the data, a phrase the error must contain)
    ("unknown top-level key", spec_with(retention=30), "retention"),
    ("unknown resources key", spec_with(resources={"gpus": 1}), "gpus"),
    ("missing required field", spec_with(models=_DELETE), "models"),
    ("name with capitals", spec_with(name="Nightly"), "name"),
    ("name with underscore", spec_with(name="nightly_tiles"), "name"),
    ("name ending in a dash", spec_with(name="nightly-"), "name"),
    ("name too long for KubeRay with the night's -YYYYMMDD", spec_with(name="n" * 39), "47"),
    ("name starting with a digit (not DNS-1035)", spec_with(name="1nightly"), "DNS-1035"),
    ("cron with 6 fields", spec_with(schedule="0 0 2 * * *"), "schedule"),
    ("cron minute out of range", spec_with(schedule="61 2 * * *"), "minute"),
    ("cron hour out of range", spec_with(schedule="0 24 * * *"), "hour"),
    ("cron day 0", spec_with(schedule="0 2 0 * *"), "day-of-month"),
    ("cron bad month name", spec_with(schedule="0 2 1 FOO *"), "month"),
    ("cron backwards range", spec_with(schedule="0 5-2 * * *"), "hour"),
    ("cron zero step", spec_with(schedule="*/0 * * * *"), "minute"),
    ("cron unknown macro", spec_with(schedule="@nightly"), "schedule"),
    ("cron with a time zone", spec_with(schedule="TZ=UTC 0 2 * * *"), "schedule"),
    ("cron not a string", spec_with(schedule=2), "schedule"),
    ("empty inputs", spec_with(inputs=[]), "inputs"),
    ("empty input URL", spec_with(inputs=[""]), "inputs[0]"),
    ("unknown placeholder", spec_with(inputs=["s3://a/{date}/"]), "inputs[0]"),
    ("placeholder in output", spec_with(output="s3://a/{run_date}/"), "output"),
    ("credentials in a URL", spec_with(models="s3://AKEY:secret@bucket/models"), "models"),
    ("duplicate inputs", spec_with(inputs=["s3://a/", "s3://a/"]), "inputs"),
    ("empty categories", spec_with(categories=[]), "categories"),
    ("category with a slash", spec_with(categories=["a/b"]), "categories[0]"),
    ("unknown category source", spec_with(category_from="folder"), "category_from"),
    ("manifest source without a manifest", spec_with(category_from="manifest"), "manifest"),
    ("manifest given but unused", spec_with(manifest="s3://a/m.csv"), "manifest"),
    ("epsilon zero", spec_with(nfa_epsilon=0), "nfa_epsilon"),
    ("epsilon negative", spec_with(nfa_epsilon=-1.0), "nfa_epsilon"),
    ("epsilon text", spec_with(nfa_epsilon="small"), "nfa_epsilon"),
    ("epsilon boolean", spec_with(nfa_epsilon=True), "nfa_epsilon"),
    ("false-alarm rate of one", spec_with(false_alarm_rate=1.0), "false_alarm_rate"),
    ("false-alarm rate as a percentage", spec_with(false_alarm_rate=5), "false_alarm_rate"),
    ("batch size zero", spec_with(resources={"batch_size": 0}), "resources.batch_size"),
    ("batch size as text", spec_with(resources={"batch_size": "16"}), "resources.batch_size"),
    ("negative gpus", spec_with(resources={"gpus_per_actor": -1}), "resources.gpus_per_actor"),
    ("zero actors", spec_with(resources={"actors": 0}), "resources.actors"),
    ("resources not a mapping", spec_with(resources=4), "resources"),
    ("retention zero", spec_with(retention_days=0), "retention_days"),
    ("lag reaching retention", spec_with(retention_days=2, lag_days=2), "lag_days"),
    ("negative lag", spec_with(lag_days=-1), "lag_days"),
    ("bad ray address", spec_with(ray_address="my cluster"), "ray_address"),
    ("category pattern without its group", spec_with(category_pattern="^([^/]+)/"), "group named 'category'"),
    ("category pattern that is no regex", spec_with(category_pattern="(?P<category>["), "not a valid regular expression"),
    ("category pattern with a manifest", spec_with(category_from="manifest", manifest="s3://b/m.csv",
                                                   category_pattern="(?P<category>[^/]+)/"), "category_pattern"),
]


@pytest.mark.parametrize("data, field", [(d, f) for _, d, f in BAD_SPECS], ids=[w for w, _, _ in BAD_SPECS])
def test_each_bad_field_is_a_config_error_naming_the_field(data, field):
    with pytest.raises(ConfigError) as caught:
        job_spec_from_dict(data)
    assert field in str(caught.value)


def test_errors_from_a_file_say_which_file():
    text = yaml.safe_dump(spec_with(nfa_epsilon=0))
    with pytest.raises(ConfigError, match=r"job spec s3://x/spec.yaml: nfa_epsilon"):
        parse_job_spec(text, source="s3://x/spec.yaml")


def test_a_key_written_twice_is_an_error_not_a_silent_override():
    text = yaml.safe_dump(MINIMAL) + "name: other-name\n"
    with pytest.raises(ConfigError, match="duplicate field 'name'"):
        parse_job_spec(text)


def test_broken_yaml_and_non_mappings_are_config_errors():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_job_spec("name: [unclosed\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_job_spec("- just\n- a list\n")


def test_manifest_source_with_a_manifest_is_valid():
    spec = job_spec_from_dict(spec_with(category_from="manifest", manifest="s3://a/manifests/{run_date}.jsonl"))
    assert spec.manifest_for("2026-11-22") == "s3://a/manifests/2026-11-22.jsonl"


@pytest.mark.parametrize("expression", [
    "0 2 * * *", "*/15 * * * *", "0 2 * * 1-5", "0 2 1,15 * *", "30 1 * JAN-MAR MON",
    "0 2 ? * SUN", "0 0-23/6 * * *", "5/10 * * * *", "0 2 * * 7", "@daily", "@hourly",
])
def test_standard_cron_expressions_are_accepted(expression):
    validate_cron(expression)


# --- resolving a run --------------------------------------------------------------------------------

def test_inputs_for_fills_in_the_run_date_everywhere():
    spec = job_spec_from_dict(spec_with(inputs=["s3://a/{run_date}/", "gs://b/x/{run_date}/y/{run_date}", "/local/c/"]))
    assert spec.inputs_for("2026-11-22") == ["s3://a/2026-11-22/", "gs://b/x/2026-11-22/y/2026-11-22", "/local/c/"]
    assert spec.manifest_for("2026-11-22") is None


@pytest.mark.parametrize("run_date", ["20261122", "2026-2-3", "2026-02-30", "yesterday", "", None])
def test_inputs_for_refuses_anything_but_a_real_yyyy_mm_dd_date(run_date):
    spec = job_spec_from_dict(MINIMAL)
    with pytest.raises(ConfigError, match="run_date"):
        spec.inputs_for(run_date)


def test_default_run_date_is_today_minus_the_lag():
    assert job_spec_from_dict(spec_with(lag_days=1)).default_run_date(date(2026, 3, 1)) == "2026-02-28"
    assert job_spec_from_dict(MINIMAL).default_run_date(date(2026, 3, 1)) == "2026-03-01"


def test_a_spec_is_immutable():
    spec = job_spec_from_dict(MINIMAL)
    with pytest.raises(AttributeError):
        spec.output = "s3://elsewhere"  # type: ignore[misc]
    assert isinstance(spec, JobSpec)


# --- retention ------------------------------------------------------------------------------------

def test_expired_run_dates_are_exactly_those_older_than_the_retention():
    today = date(2026, 11, 23)
    existing = ["2026-11-23", "2026-08-25", "2026-08-24", "2025-01-01", "2026-11-30"]
    # 2026-08-25 is exactly 90 days old: kept. 2026-08-24 is 91: deleted.
    assert expired_run_dates(existing, today, 90) == ["2025-01-01", "2026-08-24"]


def test_retention_of_one_day_keeps_today_and_yesterday():
    assert expired_run_dates(["2026-11-23", "2026-11-22", "2026-11-21"], date(2026, 11, 23), 1) == ["2026-11-21"]


def test_retention_never_touches_values_it_does_not_understand():
    assert expired_run_dates(["__HIVE_DEFAULT_PARTITION__", "2020-13-01", "old"], date(2026, 11, 23), 1) == []


def test_no_retention_keeps_everything():
    assert expired_run_dates(["1999-01-01"], date(2026, 11, 23), None) == []


@pytest.fixture(params=["local", "s3"])
def root_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty place for an output: a local directory, or a fresh prefix on the session's S3 server."""
    if request.param == "local":
        return str(tmp_path / "scores")
    return request.getfixturevalue("s3_bucket_url")


def _put(root: str, relative: str) -> None:
    storage.write_bytes_atomic(storage.join(root, relative), b"PAR1")


def _all_files(root: str) -> set[str]:
    """Every file under ``root``, relative to it, as a fresh client sees it."""
    fs, base = storage.filesystem(root)
    fs.invalidate_cache()
    return {path[len(base.rstrip("/")) + 1:] for path in fs.find(base)}


def test_apply_retention_deletes_only_expired_run_date_partitions(root_url):
    kept = {
        "category=tile_exp1/run_date=2026-11-22/part-0.parquet",
        "category=tile_exp1/run_date=2026-10-01/part-0.parquet",
        "category=tile_exp2/run_date=2026-11-01/part-0.parquet",
        "category=tile_exp2/run_date=garbage/part-0.parquet",  # not a date: left alone
        "category=tile_exp2/notes.txt",
        "_checkpoints/2026-01-01/state.json",  # not a category partition
        "run_date=2020-01-01/stray.parquet",  # not under a category
        "_runs/run_date=2026-11-22/20261122T020000Z-def.json",
    }
    expired = {
        "category=tile_exp1/run_date=2026-08-01/part-0.parquet",
        "category=tile_exp1/run_date=2026-08-01/part-1.parquet",
        "category=tile_exp2/run_date=2025-12-31/sub/part-0.parquet",
        "_runs/run_date=2026-08-01/20260801T020000Z-abc.json",  # the run log of a deleted night goes with it
    }
    for relative in sorted(kept | expired):
        _put(root_url, relative)

    deleted = apply_retention(root_url, date(2026, 11, 23), 90)

    assert sorted(deleted) == sorted([
        storage.join(root_url, "category=tile_exp1/run_date=2026-08-01"),
        storage.join(root_url, "category=tile_exp2/run_date=2025-12-31"),
        storage.join(root_url, "_runs/run_date=2026-08-01"),
    ])
    assert _all_files(root_url) == kept
    # A second pass finds nothing, even where the store still lists the emptied prefixes.
    assert apply_retention(root_url, date(2026, 11, 23), 90) == []


def test_apply_retention_dry_run_deletes_nothing(root_url):
    _put(root_url, "category=a/run_date=2000-01-01/part-0.parquet")
    assert apply_retention(root_url, date(2026, 11, 23), 30, dry_run=True) == [
        storage.join(root_url, "category=a/run_date=2000-01-01"),
    ]
    assert _all_files(root_url) == {"category=a/run_date=2000-01-01/part-0.parquet"}


def test_apply_retention_on_a_missing_output_or_without_retention_does_nothing(root_url):
    assert apply_retention(storage.join(root_url, "never-written"), date(2026, 11, 23), 30) == []
    _put(root_url, "category=a/run_date=2000-01-01/part-0.parquet")
    assert apply_retention(root_url, date(2026, 11, 23), None) == []
    assert _all_files(root_url) == {"category=a/run_date=2000-01-01/part-0.parquet"}


def test_a_spec_in_s3_loads_like_the_local_one(s3_bucket_url):
    url = storage.join(s3_bucket_url, "jobs", "nightly.yaml")
    storage.write_bytes_atomic(url, EXAMPLE.read_bytes())
    assert load_job_spec(url) == load_job_spec(str(EXAMPLE))


def test_a_mistyped_key_is_named_with_the_field_it_most_likely_meant():
    data = spec_with()
    data["ouput"] = data.pop("output")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'ouput' \(did you mean 'output'\?\)"):
        job_spec_from_dict(data)
    with pytest.raises(ConfigError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        job_spec_from_dict(spec_with(resources={"batchsize": 4}))


def test_the_longest_name_kuberay_accepts_with_its_date_suffix_is_valid():
    spec = job_spec_from_dict(spec_with(name="n" * 38))
    assert len(f"{spec.name}-20261202") == 47
