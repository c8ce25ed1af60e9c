"""The analysts' ready queries: every one, in every flavour, gives the right numbers.

Expectations are computed in plain Python from the rows the test dataset was
written from (tests/scores_data.py), never from another query: DuckDB,
pandas and Polars are each checked against that truth, locally and (with the
project's SeaweedFS fixture) straight on s3://.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from scores_data import (NEXT_COLUMNS, NEXT_VERSION, PREVIOUS_LACKS, PREVIOUS_VERSION, ScoresDataset,
                         build_mixed_versions_dataset, build_scores_dataset, upload)
from uflow_batch import analysts

QUERIES = Path(__file__).resolve().parents[1] / "uflow_batch" / "queries"
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "queries.md"


def load_examples(name: str):
    spec = importlib.util.spec_from_file_location(name, GUIDE.parent / "queries" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> ScoresDataset:
    return build_scores_dataset(tmp_path_factory.mktemp("scores") / "scores")


@pytest.fixture(autouse=True)
def no_ambient_s3(monkeypatch):
    """Local queries must not depend on whatever AWS_* the shell happens to have."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# --- results as plain records, whatever produced them -----------------------------------------

def plain(value):
    if isinstance(value, datetime):  # pandas Timestamp included
        return value.date().isoformat() if (value.hour, value.minute, value.second) == (0, 0, 0) and value.tzinfo is None else value
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def records(result) -> list[dict]:
    """DuckDB/Arrow, pandas and Polars results as a list of plain dicts."""
    if hasattr(result, "to_pylist"):
        rows = result.to_pylist()
    elif hasattr(result, "to_dicts"):
        rows = result.to_dicts()
    else:
        rows = result.to_dict("records")
    return [{key: plain(value) for key, value in row.items()} for row in rows]


# --- the expected answers, from the rows the dataset was written from -------------------------

def check_defect_rate_per_night(rows: list[dict], scores: ScoresDataset) -> None:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in scores.rows:
        groups[row["category"], row["run_date"]].append(row)
    expected = []
    for (category, run_date), members in sorted(groups.items()):
        scored = [m for m in members if m["error"] is None]
        anomalous = sum(m["is_anomalous"] for m in scored)
        expected.append({
            "category": category, "run_date": run_date, "n_images": len(members), "n_scored": len(scored),
            "n_anomalous": anomalous, "n_errors": len(members) - len(scored),
            "defect_rate": pytest.approx(anomalous / len(scored)),
        })
    assert rows == expected


def check_top_anomalous(rows: list[dict], scores: ScoresDataset) -> None:
    expected = sorted(scores.scored(), key=lambda r: (-r["image_score"], -r["max_neg_log10_nfa"], r["image_uri"]))[:50]
    assert [r["image_uri"] for r in rows] == [r["image_uri"] for r in expected]
    assert [r["image_score"] for r in rows] == pytest.approx([r["image_score"] for r in expected])
    assert [(r["category"], r["run_date"], r["defect_area_px"]) for r in rows] == [
        (r["category"], r["run_date"], r["defect_area_px"]) for r in expected
    ]
    assert "mask_png" not in rows[0]


def check_defect_area_distribution(rows: list[dict], scores: ScoresDataset) -> None:
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in scores.scored():
        if row["is_anomalous"]:
            by_category[row["category"]].append(row)
    assert [r["category"] for r in rows] == sorted(by_category)
    for result in rows:
        members = by_category[result["category"]]
        areas = np.array([m["defect_area_px"] for m in members], dtype=float)
        assert result["n_anomalous"] == len(members)
        assert (result["min_px"], result["max_px"]) == (areas.min(), areas.max())
        for column, q in [("p25_px", 25), ("median_px", 50), ("p75_px", 75), ("p95_px", 95)]:
            assert result[column] == pytest.approx(np.percentile(areas, q)), column
        assert result["mean_area_fraction"] == pytest.approx(np.mean([m["defect_area_fraction"] for m in members]), rel=1e-5)
        assert result["mean_regions"] == pytest.approx(np.mean([m["n_regions"] for m in members]))


def check_errored_images(rows: list[dict], scores: ScoresDataset) -> None:
    errored = [r for r in scores.rows if r["error"] is not None]
    errored.sort(key=lambda r: (r["category"], r["error"], r["image_uri"]))
    errored.sort(key=lambda r: r["run_date"], reverse=True)  # stable: newest night first
    assert [(r["category"], r["run_date"], r["image_uri"], r["error"], r["error_message"]) for r in rows] == [
        (r["category"], r["run_date"], r["image_uri"], r["error"], r["error_message"]) for r in errored
    ]


def check_error_counts(rows: list[dict], scores: ScoresDataset) -> None:
    expected = Counter((r["category"], r["run_date"], r["error"]) for r in scores.rows if r["error"] is not None)
    assert [(r["category"], r["run_date"], r["error"]) for r in rows] == sorted(expected)
    assert {(r["category"], r["run_date"], r["error"]): r["n_images"] for r in rows} == dict(expected)


def check_defect_regions(rows: list[dict], scores: ScoresDataset) -> None:
    scored = scores.scored()
    assert len(rows) == sum(r["n_regions"] for r in scored)
    area_per_image = Counter()
    for region in rows:
        area_per_image[region["run_date"], region["image_uri"]] += region["area_px"]
        assert 0 <= region["x0"] < region["x1"] and 0 <= region["y0"] < region["y1"]
    assert area_per_image == Counter({(r["run_date"], r["image_uri"]): r["defect_area_px"] for r in scored if r["defect_area_px"]})
    assert [r["area_px"] for r in rows] == sorted((r["area_px"] for r in rows), reverse=True)


CHECKS: dict[str, Callable[[list[dict], ScoresDataset], None]] = {
    "defect_rate_per_night": check_defect_rate_per_night,
    "top_anomalous": check_top_anomalous,
    "defect_area_distribution": check_defect_area_distribution,
    "errored_images": check_errored_images,
    "error_counts": check_error_counts,
    "defect_regions": check_defect_regions,
}


def test_every_shipped_query_has_a_check_and_a_pandas_and_polars_twin():
    assert analysts.query_names() == sorted(CHECKS)
    source = {flavour: (GUIDE.parent / "queries" / f"{flavour}_examples.py").read_text() for flavour in ("pandas", "polars")}
    for name in CHECKS:
        for flavour, text in source.items():
            assert f"def {name}(root: str" in text, (flavour, name)


def test_the_analysts_guide_shows_each_query_as_it_is_in_its_file():
    guide = GUIDE.read_text()
    assert (QUERIES / "_current_rows.sql").read_text().strip() in guide, "docs/queries.md shows the current-row rule"
    for name in CHECKS:
        assert (QUERIES / f"{name}.sql").read_text().strip() in guide, f"docs/queries.md is out of date for {name}.sql"
        assert f"(../uflow_batch/queries/{name}.sql)" in guide


# --- DuckDB, pandas, Polars on a local root ---------------------------------------------------

@pytest.mark.parametrize("name", sorted(CHECKS))
def test_duckdb_query_file_gives_the_expected_answer(name, scores):
    CHECKS[name](records(analysts.run_query(name, str(scores.root))), scores)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_pandas_example_gives_the_expected_answer(name, scores):
    examples = load_examples("pandas_examples")
    CHECKS[name](records(getattr(examples, name)(str(scores.root))), scores)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_polars_example_gives_the_expected_answer(name, scores):
    pytest.importorskip("polars", reason="polars is optional for analysts")
    examples = load_examples("polars_examples")
    CHECKS[name](records(getattr(examples, name)(str(scores.root))), scores)


def test_run_query_accepts_a_trailing_slash_and_a_connection_of_ones_own(scores):
    with analysts.duckdb_connect() as connection:
        result = analysts.run_query("error_counts", str(scores.root) + "/", connection=connection)
        assert connection.sql("SELECT 42").fetchone() == (42,), "a caller's connection stays open"
    check_error_counts(records(result), scores)


def test_query_text_fills_in_the_root_and_quotes_it_for_sql():
    sql = analysts.query_text("error_counts", "s3://bucket/it's/scores/")
    assert "read_parquet('s3://bucket/it''s/scores/**/*.parquet'" in sql
    assert "{root}" not in sql


def test_an_unknown_query_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="defect_rate_per_night"):
        analysts.query_text("defect_rates", "/data")


# --- the S3 connection -----------------------------------------------------------------------

def test_a_local_connection_needs_no_httpfs_and_no_secret():
    with analysts.duckdb_connect() as connection:
        assert connection.sql("SELECT count(*) FROM duckdb_secrets()").fetchone() == (0,)


def test_an_s3_connection_keeps_credentials_in_a_redacted_temporary_secret(monkeypatch, caplog):
    if analysts.extension_directory() is None:
        pytest.skip("duckdb-ext-httpfs is not installed (pip install 'uflow-batch[analysts]')")
    key, secret = "AKIA" + uuid.uuid4().hex[:12], "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with analysts.duckdb_connect("http://127.0.0.1:9") as connection:
        name, kind, persistent, shown = connection.sql(
            "SELECT name, type, persistent, secret_string FROM duckdb_secrets()"
        ).fetchone()
    assert (name, kind, persistent) == (analysts.SECRET_NAME, "s3", False)
    assert "endpoint=127.0.0.1:9" in shown and "use_ssl=false" in shown and "url_style=path" in shown
    assert secret not in shown, "DuckDB redacts the secret"
    assert secret not in caplog.text and key not in caplog.text


# --- credentials without keys: the AWS credential chain (duckdb-ext-aws) ----------------------

AWS_CHAIN_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                       "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                       "AWS_REGION", "AWS_DEFAULT_REGION")


def aws_profile(monkeypatch, directory: Path, key_id: str | None = None, secret: str | None = None,
                region: str | None = None) -> None:
    """Point the AWS SDK's chain at a profile of this test's own (or at none), and nowhere else:
    no keys in the environment, no instance metadata service, no role or container variables."""
    for name in AWS_CHAIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(directory))
    credentials, config = directory / "credentials", directory / "config"
    credentials.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n" if key_id else "")
    config.write_text(f"[default]\nregion = {region}\n" if region else "")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))


def require_aws_extension() -> None:
    directory = analysts.extension_directory()
    if directory is None or not any(Path(directory).rglob("aws.duckdb_extension")):
        pytest.skip("duckdb-ext-aws is not installed (pip install 'uflow-batch[analysts]')")


def secret_of(connection) -> tuple:
    return connection.sql("SELECT name, type, provider, persistent, secret_string FROM duckdb_secrets()").fetchone()


def test_without_keys_an_s3_connection_takes_credentials_from_the_aws_chain(monkeypatch, tmp_path, caplog):
    """No AWS_ACCESS_KEY_ID: the secret is the AWS SDK's credential chain (here: a profile, as `aws sso
    login` or `aws configure` leave one), region from the profile, credentials redacted and never logged."""
    require_aws_extension()
    key, secret = "AKIA" + uuid.uuid4().hex[:16].upper(), "chain-" + uuid.uuid4().hex
    aws_profile(monkeypatch, tmp_path, key, secret, region="eu-west-3")
    caplog.set_level(logging.DEBUG)
    with analysts.duckdb_connect(s3=True) as connection:
        name, kind, provider, persistent, shown = secret_of(connection)
    assert (name, kind, provider, persistent) == (analysts.SECRET_NAME, "s3", "credential_chain", False)
    assert f"key_id={key}" in shown, "the chain found the profile's credentials"
    assert "region=eu-west-3" in shown and "url_style=vhost" in shown
    assert secret not in shown and secret not in caplog.text


def test_with_keys_in_the_environment_the_secret_is_the_explicit_one(monkeypatch, tmp_path):
    """Keys set: they win over any profile, as in every AWS tool, in a config secret."""
    require_aws_extension()
    aws_profile(monkeypatch, tmp_path, "AKIAPROFILEKEYNOTUSED", "profile-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    with analysts.duckdb_connect(s3=True) as connection:
        name, kind, provider, persistent, shown = secret_of(connection)
    assert (name, kind, provider, persistent) == (analysts.SECRET_NAME, "s3", "config", False)
    assert "key_id=AKIAENVIRONMENTKEY01" in shown and "region=us-east-1" in shown


def test_without_keys_or_any_credentials_the_error_says_where_they_were_looked_for(monkeypatch, tmp_path):
    require_aws_extension()
    aws_profile(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="AWS credential chain found no credentials") as raised:
        analysts.duckdb_connect(s3=True)
    assert "aws sso login" in str(raised.value) and "AWS_ACCESS_KEY_ID" in str(raised.value)


def test_run_query_on_a_local_root_needs_no_credentials(monkeypatch, tmp_path, scores):
    aws_profile(monkeypatch, tmp_path)  # no credentials anywhere: a local root must not care
    check_error_counts(records(analysts.run_query("error_counts", str(scores.root))), scores)


# --- straight on s3:// (the project's SeaweedFS fixture) -------------------------------------

@pytest.fixture
def s3_scores(scores, s3_bucket_url) -> str:
    return upload(scores.root, f"{s3_bucket_url}/scores")


@pytest.mark.parametrize("flavour", ["duckdb", "pandas", "polars"])
def test_every_query_runs_straight_on_s3(flavour, scores, s3_scores):
    """The same files and functions, with root = an s3:// URL and credentials from the environment."""
    if flavour == "duckdb":
        if analysts.extension_directory() is None:
            pytest.skip("duckdb-ext-httpfs is not installed (pip install 'uflow-batch[analysts]')")
        with analysts.duckdb_connect() as connection:
            results = {name: analysts.run_query(name, s3_scores, connection=connection) for name in CHECKS}
    else:
        if flavour == "polars":
            pytest.importorskip("polars", reason="polars is optional for analysts")
        examples = load_examples(f"{flavour}_examples")
        results = {name: getattr(examples, name)(s3_scores) for name in CHECKS}
    for name, result in results.items():
        try:
            CHECKS[name](records(result), scores)
        except AssertionError as failure:
            raise AssertionError(f"{flavour} {name} on s3: {failure}") from None


def test_the_query_command_reads_s3_with_keys_in_the_environment(scores, s3_scores):
    """What `uflow-batch query` does: run_query on an s3:// root, no connection given, keys set."""
    if analysts.extension_directory() is None:
        pytest.skip("duckdb-ext-httpfs is not installed (pip install 'uflow-batch[analysts]')")
    with analysts.duckdb_connect(s3=True) as connection:
        assert secret_of(connection)[2] == "config"
    check_error_counts(records(analysts.run_query("error_counts", s3_scores)), scores)


def test_the_query_command_reads_s3_through_the_aws_chain_without_keys(scores, s3_scores, s3_env, monkeypatch, tmp_path):
    """The server's keys moved from the environment into a profile, as an analyst's `aws configure` or SSO
    login leaves them: `uflow-batch query` on s3:// finds them through the chain and reads."""
    import subprocess
    import sys

    require_aws_extension()
    key_id, secret = s3_env.env["AWS_ACCESS_KEY_ID"], s3_env.env["AWS_SECRET_ACCESS_KEY"]
    aws_profile(monkeypatch, tmp_path, key_id, secret, region=s3_env.env["AWS_REGION"])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with analysts.duckdb_connect(s3=True) as connection:
        assert secret_of(connection)[2] == "credential_chain"
    check_error_counts(records(analysts.run_query("error_counts", s3_scores)), scores)
    done = subprocess.run([sys.executable, "-m", "uflow_batch.cli", "query", "error_counts", "--scores", s3_scores,
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == len({(r["category"], r["run_date"], r["error"]) for r in scores.rows if r["error"]})
    assert secret not in done.stdout + done.stderr


def test_the_guides_recipe_by_hand_gives_the_same_sql_as_query_text(scores):
    """What docs/queries.md tells analysts to do without the package runs and answers the same."""
    import duckdb

    rows = "\n".join(line for line in (QUERIES / "_current_rows.sql").read_text().splitlines() if not line.startswith("--"))
    for name in CHECKS:
        sql = (QUERIES / f"{name}.sql").read_text().replace("{current_rows}", rows).replace("{root}", str(scores.root))
        CHECKS[name](records(duckdb.sql(sql).fetch_arrow_table()), scores)


def test_a_night_that_holds_several_rows_of_an_image_counts_it_once(scores):
    """The dataset holds superseded rows (a no_model row before the score, an older model's score, a later
    error beside a score, an earlier error): the checks above are only meaningful if it really does."""
    import pyarrow.parquet as pq

    written = sum(pq.read_metadata(path).num_rows for path in Path(scores.root).rglob("*.parquet"))
    assert written == len(scores.rows) + len(scores.superseded) and len(scores.superseded) >= 4
    per_night = records(analysts.run_query("defect_rate_per_night", str(scores.root)))
    assert sum(r["n_images"] for r in per_night) == len(scores.rows)
    assert {(r["run_date"], r["image_uri"]) for r in scores.superseded} <= {(r["run_date"], r["image_uri"]) for r in scores.rows}


def test_the_cli_prints_a_query_as_csv_or_json_lines_with_every_row(scores):
    import io
    import json
    import subprocess
    import sys

    import pandas as pd

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "uflow_batch.cli", "query", "top_anomalous", "--scores", str(scores.root),
                               "--limit", "1", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    expected = analysts.run_query("top_anomalous", str(scores.root)).to_pandas()
    assert len(expected) > 1, "the limit must not apply to machine-readable output"
    as_csv = pd.read_csv(io.StringIO(cli("--format", "csv")))
    assert list(as_csv.columns) == list(expected.columns) and len(as_csv) == len(expected)
    lines = [json.loads(line) for line in cli("--format", "json").splitlines()]
    assert [row["image_uri"] for row in lines] == list(expected["image_uri"])
    assert "more rows" in cli()  # the table for people keeps its limit


# --- mixed schema versions (docs/schema.md, "Schema versions") --------------------------------
#
# The run log (<root>/_runs/...) and the completion markers (_SUCCESS.json in each partition) lie
# beside the data; no reader may take them for data.

@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> ScoresDataset:
    """The scores dataset with a run record (final and one still running) and a marker in every partition."""
    from datetime import timezone

    from uflow_batch.pipelines import runlog

    scores = build_scores_dataset(tmp_path_factory.mktemp("logged") / "scores")
    root = str(scores.root)
    for partition in sorted(scores.root.glob("category=*/run_date=*")):
        category, run_date = (part.split("=", 1)[1] for part in partition.relative_to(scores.root).parts)
        for run_id in ("donerun", "liverun"):
            log = runlog.RunLog(root, run_date, run_id, datetime.now(timezone.utc), inputs=["a"], manifest=None,
                                models="m", max_error_fraction=None)
            log.start()
            if run_id == "donerun":
                log.finish(runlog.SUCCEEDED, by_category={category: {"ok": 1}}, model_versions={}, files=1, late={},
                           markers=[category])
        runlog.write_markers(root, run_date, "donerun", {category: {"ok": 1}}, {}, {category: 1}, [category])
        assert (partition / runlog.MARKER_NAME).is_file()
    assert list(scores.root.glob(f"{runlog.RUNS_DIR}/run_date=*/*.json"))
    return scores


@pytest.mark.parametrize("flavour", ["duckdb", "pandas", "polars"])
def test_run_records_and_completion_markers_are_not_data_to_any_reader(flavour, logged):
    for name in sorted(CHECKS):
        CHECKS[name](records(run_reader(flavour, name, str(logged.root))), logged)
    if flavour == "pandas":
        files = load_examples("pandas_examples").dataset(str(logged.root)).files
        assert files and all(f.endswith(".parquet") and "/_runs/" not in f for f in files)


# A new version adds columns and older partitions are never rewritten, so every reader meets part
# files of several versions, even side by side in one night: the readers shipped with this
# version must read a part of the next one (built from this version's table plus columns) and
# one of the previous one, answer every query right, and keep the new columns where they
# return every column.

@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> ScoresDataset:
    return build_mixed_versions_dataset(tmp_path_factory.mktemp("mixed") / "scores")


def run_reader(flavour: str, name: str, root: str):
    """Query ``name`` on ``root`` through the DuckDB file, the pandas example or the Polars example."""
    if flavour == "duckdb":
        return analysts.run_query(name, root)
    if flavour == "polars":
        pytest.importorskip("polars", reason="polars is optional for analysts")
    return getattr(load_examples(f"{flavour}_examples"), name)(root)


EVOLVING = ("schema_version", *PREVIOUS_LACKS, *(field.name for field in NEXT_COLUMNS))


def every_column(flavour: str, root: str) -> list[dict]:
    """The current rows with every column, as each flavour's reader that returns all columns gives them."""
    if flavour == "duckdb":
        with analysts.duckdb_connect(s3=root.startswith("s3://")) as connection:
            return records(connection.sql(f"SELECT * FROM {analysts.current_rows_sql(root)}").fetch_arrow_table())
    if flavour == "polars":
        pytest.importorskip("polars", reason="polars is optional for analysts")
        return records(load_examples("polars_examples").scan(root).collect())
    examples = load_examples("pandas_examples")
    columns = examples.dataset(root).schema.names
    assert "mask_png" in columns
    return records(examples.load(root, [c for c in columns if c != "mask_png"]))


def check_every_column(rows: list[dict], mixed: ScoresDataset) -> None:
    assert set(EVOLVING) <= set(rows[0]), "the next version's columns are kept"
    assert len(rows) == len(mixed.rows)
    got = {(r["run_date"], r["image_uri"]): {c: r[c] for c in EVOLVING} for r in rows}
    expected = {(r["run_date"], r["image_uri"]): {c: r.get(c) for c in EVOLVING} for r in mixed.rows}
    assert got == expected
    versions = Counter(r["schema_version"] for r in rows)
    assert set(versions) == {PREVIOUS_VERSION, NEXT_VERSION - 1, NEXT_VERSION}
    assert any(r["camera"] for r in rows) and any(r["false_alarm_rate"] for r in rows)


def test_the_mixed_dataset_holds_three_versions_the_oldest_first_and_two_side_by_side(mixed):
    """Else the tests below prove nothing: a reader that takes its schema from the first file it
    lists (Polars' and pyarrow's default) must meet the previous version there."""
    import pyarrow.parquet as pq

    parts = sorted(Path(mixed.root).rglob("*.parquet"), key=lambda p: p.as_posix())
    version = {p: int(pq.read_schema(p).metadata[b"uflow_batch.schema_version"]) for p in parts}
    assert version[parts[0]] == PREVIOUS_VERSION
    assert "false_alarm_rate" not in pq.read_schema(parts[0]).names
    side_by_side = defaultdict(set)
    for path, v in version.items():
        side_by_side[path.parent].add(v)
    assert {NEXT_VERSION - 1, NEXT_VERSION} in side_by_side.values()
    assert {r["schema_version"] for r in mixed.superseded} >= {NEXT_VERSION - 1, NEXT_VERSION}


@pytest.mark.parametrize("flavour", ["duckdb", "pandas", "polars"])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_query_reads_parts_of_the_previous_and_next_schema_version(name, flavour, mixed):
    CHECKS[name](records(run_reader(flavour, name, str(mixed.root))), mixed)


@pytest.mark.parametrize("flavour", ["duckdb", "pandas", "polars"])
def test_readers_of_every_column_keep_the_next_versions_columns(flavour, mixed):
    check_every_column(every_column(flavour, str(mixed.root)), mixed)


@pytest.mark.parametrize("flavour", ["duckdb", "pandas", "polars"])
def test_mixed_schema_versions_read_straight_on_s3(flavour, mixed, s3_bucket_url):
    if flavour == "duckdb" and analysts.extension_directory() is None:
        pytest.skip("duckdb-ext-httpfs is not installed (pip install 'uflow-batch[analysts]')")
    root = upload(mixed.root, f"{s3_bucket_url}/mixed")
    check_every_column(every_column(flavour, root), mixed)
    check_defect_rate_per_night(records(run_reader(flavour, "defect_rate_per_night", root)), mixed)
