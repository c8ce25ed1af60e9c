"""Polars equivalents of the DuckDB queries in this directory.

Every function takes the dataset root, a local directory or an ``s3://``
prefix, and returns the same columns and order as the ``.sql`` file of the
same name (``run_date`` as ``pl.Date``). Scans are lazy, so only the columns
a question uses are read: the heavy ``mask_png`` column never is.

The dataset mixes schema versions (``docs/schema.md``): a new version adds
columns, and older part files are never rewritten. Polars takes a scan's
schema from the first file and raises on a column it does not know, so
:func:`schema` unites the columns of one part of each version first, and
:func:`scan` reads every part into that union, a column a part lacks as null.

S3: Polars reads object storage itself (not through fsspec).
:func:`storage_options` builds its options from the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server; plain http is allowed only
when that endpoint says http).

    >>> import polars_examples as ex
    >>> ex.defect_rate_per_night("out/scores")
"""

from __future__ import annotations

import os

import polars as pl

HIVE_SCHEMA = {"category": pl.String, "run_date": pl.Date}


def storage_options(root: str) -> dict[str, str] | None:
    """Polars' object-store options for ``root`` from the AWS environment; None for local paths."""
    if not root.startswith("s3://"):
        return None
    options = {"aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    for variable, option in [
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
    ]:
        if os.environ.get(variable):
            options[option] = os.environ[variable]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint_url"] = endpoint
        options["aws_virtual_hosted_style_request"] = "false"
        if endpoint.startswith("http://"):
            options["aws_allow_http"] = "true"
    return options


SCORED = pl.col("error").is_null()
_FILE = "_uflow_part_file"  # a scratch column: which part file a row came from


def schema(root: str) -> dict[str, pl.DataType]:
    """The union by name of the columns of every schema version under ``root``, partition columns left out.

    Within a version every part has the same columns (``docs/schema.md``), so
    one part of each version present stands for all: a first pass reads only
    the small ``schema_version`` column with each row's file name, then one
    footer per version is read. Types must agree across versions (columns are
    never retyped), else this raises instead of guessing.
    """
    root = root.rstrip("/")
    options = storage_options(root)
    versions = (
        pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True, hive_schema=HIVE_SCHEMA,
                        storage_options=options, include_file_paths=_FILE,
                        missing_columns="insert", extra_columns="ignore")
        .group_by("schema_version")
        .agg(pl.col(_FILE).first())
        .sort("schema_version")
        .collect()
    )
    union: dict[str, pl.DataType] = {}
    for version, part in versions.iter_rows():
        for name, dtype in pl.scan_parquet(part, hive_partitioning=False, storage_options=options).collect_schema().items():
            if union.setdefault(name, dtype) != dtype:
                raise TypeError(f"column {name!r} is {union[name]} in older parts but {dtype} in version {version} ({part})")
    return union


def scan(root: str) -> pl.LazyFrame:
    """The current row of each image and night under ``root``, lazily, with the hive partition columns typed.

    A night may hold several rows of one image (an error, then the score of
    its re-run; two model versions): like ``_current_rows.sql``, a scored row
    wins over an error, then the latest ``scored_at``, then the highest model version.
    """
    root = root.rstrip("/")
    rows = pl.scan_parquet(
        f"{root}/**/*.parquet",
        hive_partitioning=True,
        hive_schema=HIVE_SCHEMA,
        schema=schema(root),
        missing_columns="insert",  # an older part lacks the newer columns: null there
        storage_options=storage_options(root),
    )
    return (
        rows.sort(["run_date", "image_uri", SCORED, "scored_at", "model_version"],
                  descending=[False, False, True, True, True], nulls_last=True)
        .unique(subset=["run_date", "image_uri"], keep="first", maintain_order=True)
    )


def defect_rate_per_night(root: str) -> pl.DataFrame:
    """Like defect_rate_per_night.sql: anomalous / scored per category and night."""
    anomalous = SCORED & pl.col("is_anomalous").fill_null(False)
    return (
        scan(root)
        .group_by("category", "run_date")
        .agg(
            pl.len().alias("n_images"),
            SCORED.sum().alias("n_scored"),
            anomalous.sum().alias("n_anomalous"),
            (~SCORED).sum().alias("n_errors"),
        )
        .with_columns(
            (pl.col("n_anomalous") / pl.when(pl.col("n_scored") > 0).then(pl.col("n_scored"))).alias("defect_rate")
        )
        .sort("category", "run_date")
        .collect()
    )


def top_anomalous(root: str, n: int = 50) -> pl.DataFrame:
    """Like top_anomalous.sql: the ``n`` highest image scores."""
    return (
        scan(root)
        .filter(SCORED)
        .select(
            "category", "run_date", "image_uri", "image_score", "max_neg_log10_nfa",
            "defect_area_px", "defect_area_fraction", "n_regions", "model_version",
        )
        .sort(["image_score", "max_neg_log10_nfa", "image_uri"], descending=[True, True, False])
        .head(n)
        .collect()
    )


def defect_area_distribution(root: str) -> pl.DataFrame:
    """Like defect_area_distribution.sql: defect-area quantiles of anomalous images per category."""
    area = pl.col("defect_area_px")
    return (
        scan(root)
        .filter(SCORED & pl.col("is_anomalous"))
        .group_by("category")
        .agg(
            pl.len().alias("n_anomalous"),
            area.min().alias("min_px"),
            area.quantile(0.25, interpolation="linear").alias("p25_px"),
            area.quantile(0.50, interpolation="linear").alias("median_px"),
            area.quantile(0.75, interpolation="linear").alias("p75_px"),
            area.quantile(0.95, interpolation="linear").alias("p95_px"),
            area.max().alias("max_px"),
            pl.col("defect_area_fraction").mean().alias("mean_area_fraction"),
            pl.col("n_regions").mean().alias("mean_regions"),
        )
        .sort("category")
        .collect()
    )


def errored_images(root: str) -> pl.DataFrame:
    """Like errored_images.sql: every image that could not be scored, newest night first."""
    return (
        scan(root)
        .filter(pl.col("error").is_not_null())
        .select("category", "run_date", "image_uri", "error", "error_message", "scored_at")
        .sort(["run_date", "category", "error", "image_uri"], descending=[True, False, False, False])
        .collect()
    )


def error_counts(root: str) -> pl.DataFrame:
    """Like error_counts.sql: failed images per category, night and error code."""
    return (
        scan(root)
        .filter(pl.col("error").is_not_null())
        .group_by("category", "run_date", "error")
        .agg(pl.len().alias("n_images"))
        .sort("category", "run_date", "error")
        .collect()
    )


def defect_regions(root: str) -> pl.DataFrame:
    """Like defect_regions.sql: one row per defect region, largest first."""
    return (
        scan(root)
        .filter(SCORED)
        .select("category", "run_date", "image_uri", "regions")
        .explode("regions")
        .drop_nulls("regions")
        .unnest("regions")
        .sort(["area_px", "image_uri", "y0", "x0"], descending=[True, False, False, False])
        .collect()
    )
