"""DuckDB for analysts: a connection that reads the scores locally or on S3, and the shipped queries.

The queries in ``uflow_batch/queries/*.sql`` (shipped with the package) are the documented, tested way to ask
the common questions (defect rate per night, top anomalies, errors...). They
read ``{current_rows}``, the current row of each image and night, defined
once in ``queries/_current_rows.sql`` (a night may hold several rows of an
image, e.g. an error and the score of its re-run; see
:func:`uflow_batch.scores.dataset.current_rows`), which names the dataset
as ``{root}``, so the very same file runs on a local directory and on an
``s3://`` prefix: :func:`query_text` fills both in.

S3 access goes through DuckDB's ``httpfs`` extension, taken from the PyPI
package ``duckdb-ext-httpfs`` (DuckDB's own ``INSTALL httpfs`` downloads it,
which offline machines cannot do). Keys set in the standard AWS environment
variables go into an in-memory (temporary) DuckDB secret. Without them,
analysts have credentials where AWS tools find them (an SSO profile, the pod's
or instance's role), so the secret's provider is then the AWS SDK's standard
credential chain, through DuckDB's ``aws`` extension (PyPI ``duckdb-ext-aws``).
Either way credentials are never logged, printed or written to disk.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa

from .storage import redact

log = logging.getLogger(__name__)

QUERIES_DIR = Path(__file__).resolve().parent / "queries"
ROOT_PLACEHOLDER = "{root}"
ROWS_PLACEHOLDER = "{current_rows}"
ROWS_DEFINITION = "_current_rows"  # queries/_current_rows.sql; names starting with "_" are parts, not queries
SECRET_NAME = "uflow_batch_s3"


def extension_directory() -> str | None:
    """Where ``duckdb-ext-httpfs`` / ``duckdb-ext-aws`` put their signed extensions, or None if neither is installed."""
    try:
        import duckdb_ext
    except ImportError:
        return None
    for base in getattr(duckdb_ext, "__path__", []):
        candidate = Path(base) / "extensions"
        if candidate.is_dir():
            return str(candidate)
    return None


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _endpoint(s3_endpoint: str | None) -> tuple[str | None, bool]:
    """(host[:port], use_ssl) from an endpoint URL or bare host; None means AWS itself."""
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None, True
    if "://" not in endpoint:
        return endpoint.rstrip("/"), True
    parts = urlsplit(endpoint)
    return parts.netloc, parts.scheme == "https"


def _load(connection: duckdb.DuckDBPyConnection, extension: str, why: str) -> None:
    """LOAD a DuckDB extension from the PyPI package's directory (autoinstall is off: nothing is downloaded)."""
    try:
        connection.execute(f"LOAD {extension}")
    except duckdb.Error as exc:
        connection.close()
        raise RuntimeError(
            f"{why} needs DuckDB's {extension} extension: pip install 'uflow-batch[analysts]' "
            f"(duckdb-ext-{extension} matching duckdb {duckdb.__version__}); DuckDB said: {redact(str(exc))}"
        ) from None


def duckdb_connect(
    s3_endpoint: str | None = None,
    *,
    s3: bool = False,
    url_style: str | None = None,
    use_ssl: bool | None = None,
    database: str = ":memory:",
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can ``read_parquet`` local paths and ``s3://`` URLs.

    ``s3_endpoint`` (``http://127.0.0.1:8333``, or a bare ``host:port``) points
    at an S3-compatible server; by default ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, and AWS itself when neither is set. ``url_style``
    defaults to "path" with an endpoint (SeaweedFS, MinIO) and "vhost" for
    AWS. ``use_ssl`` defaults to the endpoint's scheme (https unless it says http).

    Keys set in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (optionally
    ``AWS_SESSION_TOKEN``) make an explicit secret (provider ``config``), region
    from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default us-east-1). Without
    keys, when ``s3`` is true (the caller will read ``s3://``) or an endpoint is
    set, the secret's provider is ``credential_chain``: the AWS SDK's default
    chain (profile and SSO in ``~/.aws`` or ``AWS_PROFILE``, web identity as on
    an EKS pod with a role, container and instance roles), refreshed when the
    credentials expire; the region then also comes from the profile unless the
    environment sets one. Without keys, endpoint or ``s3``, the connection is a
    plain local one and no extension is needed.
    """
    extensions = extension_directory()
    config: dict[str, object] = {"autoinstall_known_extensions": False}
    if extensions:
        config["extension_directory"] = extensions
    connection = duckdb.connect(database, config=config)
    endpoint, endpoint_ssl = _endpoint(s3_endpoint)
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    keys = bool(key_id and secret)
    if endpoint is None and not keys and not s3:
        return connection
    _load(connection, "httpfs", "reading s3://")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options = {"TYPE": "s3"}
    if keys:
        options.update(PROVIDER="config", KEY_ID=_sql_string(key_id), SECRET=_sql_string(secret))
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["SESSION_TOKEN"] = _sql_string(os.environ["AWS_SESSION_TOKEN"])
        options["REGION"] = _sql_string(region or "us-east-1")
    else:
        _load(connection, "aws", "reading s3:// without AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the AWS credential chain)")
        options.update(PROVIDER="credential_chain", REFRESH="auto")
        if region:
            options["REGION"] = _sql_string(region)
    options["URL_STYLE"] = _sql_string(url_style or ("path" if endpoint is not None else "vhost"))
    if endpoint is not None:
        options["ENDPOINT"] = _sql_string(endpoint)
        options["USE_SSL"] = "true" if (endpoint_ssl if use_ssl is None else use_ssl) else "false"
    statement = f"CREATE OR REPLACE TEMPORARY SECRET {SECRET_NAME} (" + ", ".join(f"{k} {v}" for k, v in options.items()) + ")"
    try:
        connection.execute(statement)
    except duckdb.Error as exc:
        connection.close()
        hint = "" if keys else (
            "; no AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are set and the AWS credential chain found no credentials"
            " (looked for: a profile in ~/.aws or AWS_PROFILE, an SSO login (aws sso login), a web identity token,"
            " a container or instance role)"
        )
        raise RuntimeError(f"could not configure S3 access for DuckDB{hint}: {redact(str(exc))}") from None
    log.debug("duckdb: S3 access via %s, credentials from %s", endpoint or "AWS", "the environment" if keys else "the AWS credential chain")
    return connection


# --- the shipped queries ---------------------------------------------------------------------

def _queries_dir(queries_dir: str | Path | None) -> Path:
    directory = Path(queries_dir) if queries_dir is not None else QUERIES_DIR
    if not directory.is_dir():
        raise FileNotFoundError(
            f"query directory {directory} not found"
        )
    return directory


def query_names(queries_dir: str | Path | None = None) -> list[str]:
    """Names of the shipped queries (file names without ``.sql``; ``_`` files are parts of queries)."""
    return sorted(path.stem for path in _queries_dir(queries_dir).glob("*.sql") if not path.stem.startswith("_"))


def current_rows_sql(root: str, queries_dir: str | Path | None = None) -> str:
    """The subquery that ``{current_rows}`` stands for, on the dataset at ``root`` (its comment lines left out)."""
    path = _queries_dir(queries_dir) / f"{ROWS_DEFINITION}.sql"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip().replace(ROOT_PLACEHOLDER, _sql_root(root))


def _sql_root(root: str) -> str:
    return str(root).rstrip("/").replace("'", "''")


def query_text(name: str, root: str, queries_dir: str | Path | None = None) -> str:
    """The SQL of query ``name`` on the dataset at ``root`` (path or s3:// URL), ready to run.

    ``{current_rows}`` becomes the current-row subquery, ``{root}`` the quoted root.
    """
    path = _queries_dir(queries_dir) / f"{name}.sql"
    if name.startswith("_") or not path.is_file():
        raise KeyError(f"no query named {name!r}; known: {', '.join(query_names(queries_dir))}")
    text = path.read_text(encoding="utf-8").replace(ROWS_PLACEHOLDER, current_rows_sql(root, queries_dir))
    return text.replace(ROOT_PLACEHOLDER, _sql_root(root))


def run_query(
    name: str,
    root: str,
    connection: duckdb.DuckDBPyConnection | None = None,
    queries_dir: str | Path | None = None,
) -> pa.Table:
    """Run a shipped query on the dataset at ``root`` and return its result as an Arrow table.

    Without ``connection``, one from :func:`duckdb_connect` is opened for the
    call (S3 settings from the environment, the AWS credential chain on an
    ``s3://`` root without keys) and closed afterwards.
    """
    sql = query_text(name, root, queries_dir)
    own = connection is None
    connection = connection or duckdb_connect(s3=str(root).startswith("s3://"))
    try:
        return connection.sql(sql).fetch_arrow_table()
    finally:
        if own:
            connection.close()
