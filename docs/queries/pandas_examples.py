"""pandas equivalents of the DuckDB queries in this directory.

Every function takes the dataset root, a local directory or an ``s3://``
prefix, and returns the same columns and order as the ``.sql`` file of the
same name (``run_date`` as pandas datetimes). Reading goes through
``pyarrow.dataset`` with only the columns each question needs, so the heavy
``mask_png`` column is never loaded.

The dataset mixes schema versions (``docs/schema.md``): a new version adds
columns, and older part files are never rewritten. pyarrow takes a dataset's
schema from the first file it lists, which may be the oldest, so
:func:`dataset` unifies the schemas of every part by name instead: a column a
part lacks reads as null, and no column of a newer part is lost.

S3: fsspec/s3fs take credentials and the endpoint from the standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for an S3-compatible server).

    >>> import pandas_examples as ex
    >>> ex.defect_rate_per_night("out/scores")
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

# Partition values are kept as text when read; run_date becomes a datetime after.
PARTITIONING = ds.partitioning(pa.schema([("category", pa.string()), ("run_date", pa.string())]), flavor="hive")
SCORED = ds.field("error").is_null()


# Which row of an image and night counts, like _current_rows.sql: a scored row over an
# error, then the latest scored_at, then the highest model version.
CURRENT_KEY = ["run_date", "image_uri"]
CURRENT_ORDER = ["error", "scored_at", "model_version"]


def dataset(root: str) -> ds.FileSystemDataset:
    """Every part file under ``root``, hive-partitioned, with the union of the parts' columns by name.

    Each part's footer is read (in threads: one request each on S3). Types must
    agree across parts: columns are only ever added, never retyped, so a
    conflict raises rather than being papered over.
    """
    fs, path = fsspec.core.url_to_fs(root)
    found = ds.dataset(path, filesystem=fs, format="parquet", partitioning=PARTITIONING)
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(lambda fragment: fragment.physical_schema, found.get_fragments()))
    return found.replace_schema(pa.unify_schemas([*schemas, PARTITIONING.schema]))


def load(root: str, columns: Sequence[str], filter: ds.Expression | None = None) -> pd.DataFrame:
    """The given columns of the current row of each image and night under ``root`` (optionally filtered).

    A night may hold several rows of one image (an error, then the score of
    its re-run; two model versions); the filter applies to the current rows,
    so an error that a later score replaced is not found either. It may use
    ``columns`` and ``error``.
    """
    wanted = list(dict.fromkeys([*columns, *CURRENT_KEY, *CURRENT_ORDER]))
    table = dataset(root).to_table(columns=wanted)
    ranks = table.select(CURRENT_KEY + CURRENT_ORDER).to_pandas()
    ranks["errored"] = ranks["error"].notna()
    ranks = ranks.sort_values(CURRENT_KEY + ["errored", "scored_at", "model_version"],
                              ascending=[True, True, True, False, False], na_position="last", kind="stable")
    current = ranks.drop_duplicates(CURRENT_KEY, keep="first").index.sort_values()
    table = table.take(pa.array(current))
    if filter is not None:
        table = table.filter(filter)
    frame = table.select(list(columns)).to_pandas()
    if "run_date" in frame.columns:
        frame["run_date"] = pd.to_datetime(frame["run_date"], format="%Y-%m-%d")
    return frame


def defect_rate_per_night(root: str) -> pd.DataFrame:
    """Like defect_rate_per_night.sql: anomalous / scored per category and night."""
    frame = load(root, ["category", "run_date", "is_anomalous", "error"])
    scored = frame["error"].isna()
    frame = frame.assign(
        scored=scored,
        anomalous=scored & frame["is_anomalous"].eq(True),
        errored=~scored,
    )
    out = frame.groupby(["category", "run_date"], as_index=False).agg(
        n_images=("scored", "size"),
        n_scored=("scored", "sum"),
        n_anomalous=("anomalous", "sum"),
        n_errors=("errored", "sum"),
    )
    out["defect_rate"] = out["n_anomalous"] / out["n_scored"].where(out["n_scored"] > 0)
    return out.sort_values(["category", "run_date"], ignore_index=True)


def top_anomalous(root: str, n: int = 50) -> pd.DataFrame:
    """Like top_anomalous.sql: the ``n`` highest image scores."""
    columns = [
        "category", "run_date", "image_uri", "image_score", "max_neg_log10_nfa",
        "defect_area_px", "defect_area_fraction", "n_regions", "model_version",
    ]
    frame = load(root, columns, filter=SCORED)
    frame = frame.sort_values(
        ["image_score", "max_neg_log10_nfa", "image_uri"], ascending=[False, False, True], ignore_index=True
    )
    return frame.head(n)


def defect_area_distribution(root: str) -> pd.DataFrame:
    """Like defect_area_distribution.sql: defect-area quantiles of anomalous images per category."""
    frame = load(
        root,
        ["category", "defect_area_px", "defect_area_fraction", "n_regions", "is_anomalous"],
        filter=SCORED & (ds.field("is_anomalous") == True),  # noqa: E712 - an Arrow expression, not a Python test
    )
    area = frame.groupby("category")["defect_area_px"]
    out = pd.DataFrame({
        "n_anomalous": area.size(),
        "min_px": area.min(),
        "p25_px": area.quantile(0.25),
        "median_px": area.quantile(0.50),
        "p75_px": area.quantile(0.75),
        "p95_px": area.quantile(0.95),
        "max_px": area.max(),
        "mean_area_fraction": frame.groupby("category")["defect_area_fraction"].mean(),
        "mean_regions": frame.groupby("category")["n_regions"].mean(),
    })
    return out.reset_index().sort_values("category", ignore_index=True)


def errored_images(root: str) -> pd.DataFrame:
    """Like errored_images.sql: every image that could not be scored, newest night first."""
    frame = load(
        root,
        ["category", "run_date", "image_uri", "error", "error_message", "scored_at"],
        filter=ds.field("error").is_valid(),
    )
    return frame.sort_values(
        ["run_date", "category", "error", "image_uri"], ascending=[False, True, True, True], ignore_index=True
    )


def error_counts(root: str) -> pd.DataFrame:
    """Like error_counts.sql: failed images per category, night and error code."""
    frame = load(root, ["category", "run_date", "error"], filter=ds.field("error").is_valid())
    out = frame.groupby(["category", "run_date", "error"], as_index=False).size()
    return out.rename(columns={"size": "n_images"}).sort_values(["category", "run_date", "error"], ignore_index=True)


def defect_regions(root: str) -> pd.DataFrame:
    """Like defect_regions.sql: one row per defect region, largest first."""
    frame = load(root, ["category", "run_date", "image_uri", "regions"], filter=SCORED)
    frame = frame.explode("regions", ignore_index=True).dropna(subset=["regions"]).reset_index(drop=True)
    regions = pd.DataFrame(frame.pop("regions").tolist())
    out = pd.concat([frame, regions], axis=1)
    return out.sort_values(
        ["area_px", "image_uri", "y0", "x0"], ascending=[False, True, True, True], ignore_index=True
    )
