"""The scoring pipeline's stages without Ray: listing, decoding, inference rows, commits."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uflow_batch import data
from uflow_batch.config import ConfigError, ScoreRequest
from uflow_batch.devtools.synthetic import DECODE_ERROR, NO_MODEL, SCORED, write_scoring_archive
from uflow_batch.pipelines import commit
from uflow_batch.pipelines.blocks import DECODED_SCHEMA, LISTING_SCHEMA, ROUTED_SCHEMA
from uflow_batch.pipelines.listing import UNCATEGORIZED, ListingContext, iter_unit, plan_units, read_unit, walk_sorted
from uflow_batch.pipelines.score import resolve_models
from uflow_batch.pipelines.stages import CategoryScorer, fetch_and_decode
from uflow_batch.scores import layout
from uflow_batch.scores.schema import FILE_SCHEMA
from uflow_batch.storage import ModelStore, TransientStorageError

from conftest import TINY_SYNTHETIC

RUN_DATE = "2026-11-22"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    return write_scoring_archive(str(root), TINY_SYNTHETIC, n_per_category=3, defect_rate=0.5)


def listing_rows(archive, model_store) -> list[dict]:
    units = plan_units([archive.root])
    versions = resolve_models(model_store, [u.category for u in units]).versions
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    return [
        {**row, "model_version": versions.get(row["category"]), "run_date": RUN_DATE, "pkey": unit.key}
        for unit in units for row in iter_unit(unit, later)
    ]


def test_units_are_one_per_category_folder(archive):
    units = plan_units([archive.root])
    assert [u.category for u in units] == ["brushed_metal", "fabric", "unknown_part"]
    assert len({u.key for u in units}) == 3
    assert [u.category for u in plan_units([archive.root], categories=["fabric"])] == ["fabric"]


def test_an_input_that_does_not_exist_or_holds_none_of_the_categories_is_a_configuration_error(archive, tmp_path):
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        plan_units([str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match=r"none of the categories \['fabirc'\].*fabric"):
        plan_units([archive.root], categories=["fabirc"])
    assert [u.category for u in plan_units([archive.root], categories=["fabric", "gone"])] == ["fabric"]
    image = next(Path(archive.root, "fabric").glob("*.png"))
    with pytest.raises(ConfigError, match="is a file; give the archive folder"):
        plan_units([str(image)])


def test_a_folder_name_that_cannot_be_a_partition_value_is_filed_as_uncategorized(tmp_path):
    for folder in ("lot=42", "fabric", ".hidden", "a b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(b"x")
    units = plan_units([str(tmp_path)])
    assert sorted(u.category for u in units) == ["fabric", UNCATEGORIZED, UNCATEGORIZED, UNCATEGORIZED]
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    rows = [row for unit in units if unit.category == UNCATEGORIZED for row in iter_unit(unit, later)]
    assert any("lot=42" in row["image_uri"] for row in rows), "the raw name stays in image_uri"


def test_loose_files_under_an_input_root_are_uncategorized(tmp_path):
    (tmp_path / "part").mkdir()
    (tmp_path / "loose.png").write_bytes(b"x")
    units = plan_units([str(tmp_path)])
    assert [u.category for u in units] == ["part", UNCATEGORIZED]
    rows = list(iter_unit(units[1], datetime.now(timezone.utc) + timedelta(seconds=5)))
    assert [Path(r["image_uri"]).name for r in rows] == ["loose.png"]


def test_listing_is_sorted_recursive_and_leaves_newer_objects_for_the_next_run(tmp_path):
    for name in ["b/2.png", "a/1.png", "a/c/3.png", "0.png", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = [str(Path(url).relative_to(tmp_path)) for url, _ in walk_sorted(str(tmp_path))]
    assert names == ["0.png", "notes.txt", "a/1.png", "a/c/3.png", "b/2.png"]
    cutoff = datetime.now(timezone.utc)
    time.sleep(0.05)
    (tmp_path / "a" / "late.png").write_bytes(b"x")
    unit = plan_units([str(tmp_path)])[0]
    assert [Path(r["image_uri"]).name for r in iter_unit(unit, cutoff)] == ["1.png", "3.png"]


def test_a_category_pattern_reads_the_category_from_deeper_in_the_path(tmp_path):
    for name in ["line1/cam1/fabric/a.png", "line1/cam2/washer/b.png", "line2/cam1/fabric/c.png", "line2/notes/d.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    pattern = r"^line\d/cam\d/(?P<category>[^/]+)/"
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    units = plan_units([str(tmp_path)], pattern=pattern)
    assert [u.category for u in units] == [None, None], "a unit may hold several categories"
    rows = [r for unit in units for r in iter_unit(unit, later)]
    assert [(Path(r["image_uri"]).name, r["category"]) for r in rows] == [
        ("a.png", "fabric"), ("b.png", "washer"), ("c.png", "fabric"), ("d.png", UNCATEGORIZED)]
    only = [r["category"] for unit in plan_units([str(tmp_path)], categories=["fabric"], pattern=pattern)
            for r in iter_unit(unit, later, ["fabric"])]
    assert only == ["fabric", "fabric"]
    with pytest.raises(ConfigError, match="group named 'category'"):
        plan_units([str(tmp_path)], pattern=r"^([^/]+)/")


def test_manifest_units_take_categories_from_the_manifest(tmp_path):
    manifest = tmp_path / "night.csv"
    manifest.write_text("uri,category\ns3://b/x.png,fabric\ns3://b/y.png,washer\n")
    (unit,) = plan_units([], category_from="manifest", manifest=str(manifest))
    rows = list(iter_unit(unit, datetime.now(timezone.utc), categories=["fabric"]))
    assert [(r["image_uri"], r["category"]) for r in rows] == [("s3://b/x.png", "fabric")]
    manifest.write_text("uri\ns3://b/x.png\n")
    with pytest.raises(ValueError, match="needs 'uri' and 'category'"):
        list(iter_unit(unit, datetime.now(timezone.utc)))


def test_fetch_and_decode_turns_every_bad_file_into_its_error(archive, model_store):
    items = listing_rows(archive, model_store)
    items.append({**items[0], "image_uri": items[0]["image_uri"] + ".gone"})
    sizes = resolve_models(model_store, ["brushed_metal", "fabric"]).input_sizes
    decoded = fetch_and_decode(pa.Table.from_pylist(items, schema=LISTING_SCHEMA), sizes).to_pylist()
    by_uri = {row["image_uri"]: row for row in decoded}
    expected = {f.url: f.expected for f in archive.files}
    for uri, outcome in expected.items():
        row = by_uri[uri]
        if outcome == SCORED:
            assert row["error"] is None and len(row["pixels"]) == 3 * 64 * 64, uri
        elif outcome == DECODE_ERROR:
            assert row["error"] == "decode_error" and row["error_message"], uri
        elif outcome == NO_MODEL:
            assert row["error"] == "no_model" and row["pixels"] is None, uri
    assert by_uri[items[-1]["image_uri"]]["error"] == "read_error"


def test_scorer_writes_one_schema_row_per_input_and_loads_each_model_once(archive, model_store):
    items = listing_rows(archive, model_store)
    sizes = resolve_models(model_store, ["brushed_metal", "fabric"]).input_sizes
    decoded = fetch_and_decode(pa.Table.from_pylist(items, schema=LISTING_SCHEMA), sizes)
    scorer = CategoryScorer(model_store)
    out = scorer(decoded)
    assert out.schema == ROUTED_SCHEMA and out.num_rows == len(items)
    assert len(scorer.models) == 2
    loaded = dict(scorer.models)
    scorer(decoded)
    assert all(scorer.models[key] is model for key, model in loaded.items()), "models are cached, not reloaded"

    rows = {r["image_uri"]: r for r in out.to_pylist()}
    for file in archive.files:
        row = rows[file.url]
        if file.expected == SCORED:
            assert row["error"] is None and 0.0 <= row["image_score"] <= 1.0
            mask = data.decode_mask(row["mask_png"])
            assert mask.shape == (row["height"], row["width"])
            assert row["defect_area_px"] == mask.sum() and row["n_regions"] == len(row["regions"])
            assert row["is_anomalous"] == (row["n_regions"] > 0)
        else:
            assert row["error"] is not None and row["image_score"] is None


def test_an_image_that_breaks_inference_fails_alone(archive, model_store):
    items = [r for r in listing_rows(archive, model_store) if r["category"] == "fabric"][:3]
    sizes = resolve_models(model_store, ["fabric"]).input_sizes
    decoded = fetch_and_decode(pa.Table.from_pylist(items, schema=LISTING_SCHEMA), sizes).to_pylist()
    decoded[1]["pixels"] = decoded[1]["pixels"][:100]  # a corrupted tensor reaching the model
    out = CategoryScorer(model_store)(pa.Table.from_pylist(decoded, schema=DECODED_SCHEMA)).to_pylist()
    assert [r["error"] for r in out] == [None, "inference_error", None]


def test_the_onnx_runtime_gives_the_rows_torch_gives(model_store, archive):
    pytest.importorskip("onnxruntime")
    items = listing_rows(archive, model_store)
    decoded = fetch_and_decode(pa.Table.from_pylist(items, schema=LISTING_SCHEMA),
                               resolve_models(model_store, ["brushed_metal", "fabric"]).input_sizes)
    torch_rows = CategoryScorer(model_store, device="cpu")(decoded).to_pylist()
    onnx_rows = CategoryScorer(model_store, device="cpu", runtime="onnx")(decoded).to_pylist()
    assert [r["image_uri"] for r in onnx_rows] == [r["image_uri"] for r in torch_rows]
    for ours, theirs in zip(onnx_rows, torch_rows):
        assert ours["error"] == theirs["error"]
        if ours["error"] is None:
            assert ours["image_score"] == pytest.approx(theirs["image_score"], abs=1e-4)
            assert ours["is_anomalous"] == theirs["is_anomalous"]


def test_part_names_depend_on_content_not_order():
    a = layout.part_name("k", "run1", ["u1", "u2"], ["v1", "v1"])
    assert a == layout.part_name("k", "run1", ["u2", "u1"], ["v1", "v1"])
    assert a != layout.part_name("k", "run1", ["u1", "u2"], ["v1", "v2"])
    assert a != layout.part_name("k", "run2", ["u1", "u2"], ["v1", "v1"])
    assert a.startswith("part-k-run1-") and a.endswith(".parquet") and layout.run_of(a) == "run1"


def result_table(uris, version="v1"):
    rows = [{name: None for name in ROUTED_SCHEMA.names} | {
        "schema_version": 1, "image_uri": u, "model_version": version, "category": "fabric",
        "run_date": RUN_DATE, "pkey": "k", "error": "no_model", "error_message": "x"} for u in uris]
    return pa.Table.from_pylist(rows, schema=ROUTED_SCHEMA)


def test_a_rewritten_part_replaces_itself_and_commits_its_rows(tmp_path):
    output = str(tmp_path / "out")
    first = commit.write_part(output, "fabric", RUN_DATE, "k", "run1", result_table(["a", "b"]))
    again = commit.write_part(output, "fabric", RUN_DATE, "k", "run1", result_table(["b", "a"]))
    assert first == again and len(layout.unit_parts(output, RUN_DATE, "k", ["fabric"])) == 1
    commit.write_part(output, "fabric", RUN_DATE, "k", "run2", result_table(["c"], version="v2"))
    assert commit.committed(output, RUN_DATE, "k", ["fabric"]) == {("a", "v1"), ("b", "v1"), ("c", "v2")}
    assert commit.committed(output, RUN_DATE, "k", ["fabric"], exclude_run="run2") == {("a", "v1"), ("b", "v1")}
    assert commit.committed(output, RUN_DATE, "k", None) == commit.committed(output, RUN_DATE, "k", ["fabric"])
    assert commit.committed(output, RUN_DATE, "other", None) == set()
    written = pq.read_table(first)
    assert written.schema.remove_metadata() == FILE_SCHEMA.remove_metadata()
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.startswith("part-")]
    assert leftovers == [], "no temporary files are left behind"


def test_a_replayed_read_task_lists_the_same_objects_as_the_first_attempt(archive, model_store, tmp_path):
    """Ray replays a failed read task and drops the blocks it already produced: the sequence must not change."""
    unit = next(u for u in plan_units([archive.root]) if u.category == "fabric")
    versions = resolve_models(model_store, ["fabric"]).versions
    output = str(tmp_path / "out")
    context = ListingContext(output, RUN_DATE, "this-run", versions, datetime.now(timezone.utc) + timedelta(minutes=1),
                             block_rows=2)
    first = [t.to_pylist() for t in read_unit(unit, context)]
    assert first, "the unit has objects"
    done_now = pa.Table.from_pylist(first[0], schema=LISTING_SCHEMA)
    rows = [{name: None for name in ROUTED_SCHEMA.names} | r | {"schema_version": 1, "error": "no_model", "error_message": "x"}
            for r in done_now.to_pylist()]
    commit.write_part(output, "fabric", RUN_DATE, unit.key, "this-run", pa.Table.from_pylist(rows, schema=ROUTED_SCHEMA))
    assert [t.to_pylist() for t in read_unit(unit, context)] == first, "parts of the run itself do not change its listing"
    later_run = ListingContext(**{**context.__dict__, "run_id": "next-run"})
    listed_later = [r["image_uri"] for t in read_unit(unit, later_run) for r in t.to_pylist()]
    assert listed_later == [r["image_uri"] for block in first[1:] for r in block], "a later run skips what was committed"


def test_a_denied_read_fails_the_task_instead_of_committing_an_error(s3_bucket_url, monkeypatch):
    import s3fs

    from uflow_batch import storage

    url = storage.join(s3_bucket_url, "fabric", "x.png")
    storage.write_bytes_atomic(url, b"png bytes")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    item = {"image_uri": url, "model_version": "v1", "object_size": 9, "object_etag": None, "object_mtime": None,
            "category": "fabric", "run_date": RUN_DATE, "pkey": "k"}
    try:
        with pytest.raises(TransientStorageError) as raised:
            fetch_and_decode(pa.Table.from_pylist([item], schema=LISTING_SCHEMA), {"fabric": (64, 64)})
        assert "wrong-secret" not in str(raised.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_model_with_an_unreadable_manifest_gives_error_rows_not_a_failed_run(model_store, tmp_path):
    import shutil

    store_url = str(tmp_path / "models")
    shutil.copytree(model_store, store_url)
    store = ModelStore(store_url)
    version = store.current_version("fabric")
    (Path(store_url) / "fabric" / version / "manifest.json").write_text("{not json")
    index = resolve_models(store_url, ["fabric", "brushed_metal"])
    assert "fabric" in index.unusable and "brushed_metal" in index.input_sizes
    item = {"image_uri": "/nowhere.png", "model_version": version, "object_size": 1, "object_etag": None,
            "object_mtime": None, "category": "fabric", "run_date": RUN_DATE, "pkey": "k"}
    (row,) = fetch_and_decode(pa.Table.from_pylist([item], schema=LISTING_SCHEMA), index.input_sizes, index.unusable).to_pylist()
    assert row["error"] == "inference_error" and "manifest" in row["error_message"]


def _copy_of(model_store, tmp_path) -> tuple[str, ModelStore]:
    import shutil

    store_url = str(tmp_path / "models")
    shutil.copytree(model_store, store_url)
    return store_url, ModelStore(store_url)


def test_a_category_whose_pointer_is_corrupt_gets_error_rows_naming_it_and_the_others_are_scored(model_store, tmp_path):
    store_url, _ = _copy_of(model_store, tmp_path)
    pointer = Path(store_url) / "fabric" / "CURRENT"
    pointer.write_text('{"version": "../../../somewhere"}')
    index = resolve_models(store_url, ["fabric", "brushed_metal"])
    assert "brushed_metal" in index.input_sizes and index.versions["fabric"] is None
    item = {"image_uri": "/nowhere.png", "model_version": None, "object_size": 1, "object_etag": None,
            "object_mtime": None, "category": "fabric", "run_date": RUN_DATE, "pkey": "k"}
    (row,) = fetch_and_decode(pa.Table.from_pylist([item], schema=LISTING_SCHEMA), index.input_sizes, index.unusable).to_pylist()
    assert row["error"] == "inference_error" and str(pointer) in row["error_message"]


def test_a_model_whose_weights_are_truncated_gives_error_rows_without_retries(archive, model_store, tmp_path):
    store_url, store = _copy_of(model_store, tmp_path)
    weights = Path(store_url) / "fabric" / store.current_version("fabric") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    sizes = resolve_models(store_url, ["fabric", "brushed_metal"]).input_sizes
    decoded = fetch_and_decode(pa.Table.from_pylist(listing_rows(archive, store_url), schema=LISTING_SCHEMA), sizes)
    rows = CategoryScorer(store_url, device="cpu")(decoded).to_pylist()  # raises nothing: nothing to retry
    fabric = [r for r in rows if r["category"] == "fabric" and r["error"] != "decode_error"]
    assert fabric and all(r["error"] == "inference_error" and "safetensors" in r["error_message"] for r in fabric)
    assert any(r["category"] == "brushed_metal" and r["error"] is None for r in rows), "the healthy category is scored"


def test_a_bad_manifest_is_refused_before_anything_runs(tmp_path):
    manifest = tmp_path / "night.jsonl"
    manifest.write_text('{"uri": "s3://b/x.png", "category": "fabric"}\n{"uri": "s3://b/x.png", "category": "fabric"}\n')
    with pytest.raises(ConfigError, match="repeats"):
        plan_units([], category_from="manifest", manifest=str(manifest))
    manifest.write_text('{"uri": "s3://b/x.png", "category": "../etc"}\n')
    with pytest.raises(ConfigError, match="not a usable category name"):
        plan_units([], category_from="manifest", manifest=str(manifest))


def test_a_root_given_twice_is_listed_once(archive):
    assert plan_units([archive.root, archive.root + "/"]) == plan_units([archive.root])


@pytest.mark.parametrize("change, message", [
    ({"epsilon": -1.0}, "epsilon"), ({"epsilon": 0.0}, "epsilon"), ({"category_from": "folder"}, "category_from"),
    ({"run_date": "2026-13-01"}, "run_date"), ({"categories": ("a/b",)}, "categories"), ({"inputs": ()}, "no inputs"),
    ({"false_alarm_rate": 1.0}, "false_alarm_rate"), ({"false_alarm_rate": 0.0}, "false_alarm_rate"),
    ({"inputs": ("s3://AKIAKEY:s3cr3t@bucket/archive",)}, r"inputs\[0\] must not embed credentials"),
    ({"models": "s3://AKIAKEY:s3cr3t@bucket/models"}, "models must not embed credentials"),
])
def test_a_score_request_is_checked_before_it_runs(change, message):
    base = {"inputs": ("/a",), "models": "/m", "output": "/o", "run_date": RUN_DATE}
    with pytest.raises(ConfigError, match=message) as refused:
        ScoreRequest(**{**base, **change})
    assert "s3cr3t" not in str(refused.value), "a secret is never echoed"
    assert ScoreRequest(**{**base, "inputs": ("/a", "/a/")}).inputs == ("/a",)
