"""The synthetic dataset: MVTec layout, exact masks, determinism and a scoring archive with bad files."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uflow_batch import data, storage
from uflow_batch.config import ConfigError
from uflow_batch.devtools.synthetic import (
    CATEGORIES,
    DECODE_ERROR,
    DEFECTS,
    NO_MODEL,
    SCORED,
    SyntheticConfig,
    generate_dataset,
    render_sample,
    write_scoring_archive,
)

TINY = SyntheticConfig(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=1, seed=5)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    generate_dataset(str(root), TINY)
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("archive")
    return write_scoring_archive(str(root), TINY, n_per_category=4, defect_rate=0.5)


def _mode(path: str | Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_config_and_seed_write_byte_identical_files(tiny_dataset: Path, tmp_path: Path) -> None:
    generate_dataset(str(tmp_path / "again"), TINY)
    assert _files(tmp_path / "again") == _files(tiny_dataset)


def test_another_seed_writes_other_images(tiny_dataset: Path, tmp_path: Path) -> None:
    config = SyntheticConfig(("fabric",), image_size=64, n_train=1, n_test_good=0, n_test_per_defect=0, seed=6)
    generate_dataset(str(tmp_path), config)
    assert (tmp_path / "fabric/train/good/000.png").read_bytes() != (tiny_dataset / "fabric/train/good/000.png").read_bytes()


def test_layout_is_discovered_by_the_data_module(tiny_dataset: Path) -> None:
    root = str(tiny_dataset)
    assert data.discover_categories(root) == sorted(CATEGORIES)
    for category in CATEGORIES:
        assert len(data.train_images(root, category)) == TINY.n_train
        tests = data.test_images(root, category)
        assert sorted({t.defect for t in tests}) == sorted(("good", *DEFECTS[category]))
        assert sum(not t.is_anomalous for t in tests) == TINY.n_test_good
        assert all((t.mask_url is not None) == t.is_anomalous for t in tests)


def test_every_defective_test_image_has_a_same_size_non_empty_mask(tiny_dataset: Path) -> None:
    for category in CATEGORIES:
        for item in data.test_images(str(tiny_dataset), category):
            image = data.decode_image(storage.read_bytes(item.url))
            assert image.shape == (TINY.image_size, TINY.image_size, 3)
            if item.is_anomalous:
                mask = data.decode_mask(storage.read_bytes(item.mask_url))
                assert mask.shape == image.shape[:2] and mask.any()
                with Image.open(item.mask_url) as stored:
                    assert set(np.unique(np.asarray(stored))) <= {0, 255}


def test_grayscale_and_rgb_categories_are_written_as_such(tiny_dataset: Path) -> None:
    assert _mode(tiny_dataset / "brushed_metal/train/good/000.png") == "L"
    assert _mode(tiny_dataset / "fabric/train/good/000.png") == "RGB"
    assert _mode(tiny_dataset / "washer/test/chip/000.png") == "RGB"


@pytest.mark.parametrize("category", CATEGORIES)
def test_mask_is_exactly_where_the_defective_image_differs_from_its_clean_render(category: str) -> None:
    for defect in DEFECTS[category]:
        for seed in range(3):
            sample = render_sample(category, defect, seed=seed, image_size=96)
            changed = sample.image != sample.clean
            changed = changed.any(axis=-1) if changed.ndim == 3 else changed
            assert sample.mask.any()
            np.testing.assert_array_equal(changed, sample.mask)
            np.testing.assert_array_equal(sample.clean, render_sample(category, seed=seed, image_size=96).image)


def test_good_samples_have_empty_masks() -> None:
    for category in CATEGORIES:
        sample = render_sample(category, image_size=64)
        assert not sample.mask.any() and not sample.is_defective


def test_defects_are_small_to_medium_and_of_moderate_contrast() -> None:
    for category in CATEGORIES:
        for defect in DEFECTS[category]:
            sample = render_sample(category, defect, seed=11, image_size=128)
            area = sample.mask.mean()
            diff = np.abs(sample.image.astype(int) - sample.clean.astype(int))
            contrast = (diff.max(axis=-1) if diff.ndim == 3 else diff)[sample.mask].mean()
            assert 0.0005 < area < 0.08, (category, defect, area)
            assert 3 < contrast < 130, (category, defect, contrast)


def test_normal_images_vary_so_one_image_cannot_be_memorized() -> None:
    for category in CATEGORIES:
        a, b = (render_sample(category, seed=s, image_size=64).image.astype(float) for s in (1, 2))
        assert np.abs(a - b).mean() > 3, category


def test_dataset_root_can_be_an_fsspec_url() -> None:
    root = f"memory://synthetic-{uuid.uuid4().hex}"
    config = SyntheticConfig(("washer",), image_size=64, n_train=2, n_test_good=1, n_test_per_defect=1)
    summary = generate_dataset(root, config)
    assert summary.counts["washer"]["train/good"] == 2 and summary.total_images == 2 + 1 + len(DEFECTS["washer"])
    assert data.discover_categories(root) == ["washer"]
    assert len(data.train_images(root, "washer")) == 2


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown synthetic category"):
        SyntheticConfig(categories=("bottle",))
    with pytest.raises(ConfigError, match="n_train"):
        SyntheticConfig(n_train=0)
    with pytest.raises(ConfigError, match="defect"):
        render_sample("washer", "scratch")


def test_archive_bad_files_are_refused_by_the_decoder(archive) -> None:
    bad = archive.expecting(DECODE_ERROR)
    assert {f.kind for f in bad} == {"empty", "truncated", "not_an_image", "decompression_bomb"}
    for item in bad:
        with pytest.raises(data.ImageDecodeError):
            data.decode_image(storage.read_bytes(item.url))


def test_archive_scorable_files_decode_to_uint8_rgb(archive) -> None:
    for item in archive.scorable + archive.expecting(NO_MODEL):
        image = data.decode_image(storage.read_bytes(item.url))
        assert image.dtype == np.uint8 and image.shape == (TINY.image_size, TINY.image_size, 3)


def test_archive_odd_encodings_decode_to_the_pixels_they_encode(archive) -> None:
    odd = {f.kind: f for f in archive.files if f.kind in ("gray16", "palette", "rgba")}
    assert set(odd) == {"gray16", "palette", "rgba"} and all(f.expected == SCORED for f in odd.values())
    assert _mode(odd["gray16"].url).startswith("I")
    assert _mode(odd["palette"].url) == "P"
    assert _mode(odd["rgba"].url) == "RGBA"
    gray16, palette = (data.decode_image(storage.read_bytes(odd[k].url)) for k in ("gray16", "palette"))
    np.testing.assert_array_equal(gray16, palette)  # both encode the same grayscale render


def test_archive_has_an_image_of_a_category_without_a_model(archive) -> None:
    (unknown,) = archive.expecting(NO_MODEL)
    assert unknown.category not in CATEGORIES and unknown.url.endswith(f"{unknown.category}/x.png")


def test_archive_ground_truth_matches_defect_rate_and_uses_fresh_images(archive, tiny_dataset: Path) -> None:
    images = [f for f in archive.files if f.kind == "image"]
    assert len(images) == 4 * len(CATEGORIES)
    assert all((f.defect_area_px > 0) == f.is_defective for f in images)
    assert all(f.defect in ("good", *DEFECTS[f.category]) for f in images)
    training = set(_files(tiny_dataset).values())
    assert not any(storage.read_bytes(f.url) in training for f in images)


def test_archive_defect_rate_zero_and_one(tmp_path: Path) -> None:
    config = SyntheticConfig(("brushed_metal",), image_size=64)
    clean = write_scoring_archive(str(tmp_path / "a"), config, n_per_category=3, defect_rate=0.0, include_bad_files=False)
    dirty = write_scoring_archive(str(tmp_path / "b"), config, n_per_category=3, defect_rate=1.0, include_bad_files=False)
    assert [f.is_defective for f in clean.files] == [False] * 3
    assert [f.is_defective for f in dirty.files] == [True] * 3


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    from uflow_batch.devtools.synthetic.__main__ import main

    main(["--out", str(tmp_path / "ds"), "--categories", "fabric", "--image-size", "64", "--n-train", "1",
          "--n-test-good", "1", "--n-test-per-defect", "1", "--archive", str(tmp_path / "arc"), "--archive-size", "1"])
    assert data.discover_categories(str(tmp_path / "ds")) == ["fabric"]
    assert (tmp_path / "arc/fabric/empty.png").exists()
