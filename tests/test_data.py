"""Decoding what cameras and archives produce, and finding the MVTec layout."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import torch

from shared_data import MTD, require_mtd
from uflow_batch import data


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_grayscale_rgba_and_palette_images_become_rgb():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = data.decode_image(png(gray))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)

    rgba = np.dstack([np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4), np.uint8)])
    assert np.all(data.decode_image(png(rgba)) == 200), "alpha is dropped, colour kept"

    palette = Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert tuple(data.decode_image(buffer.getvalue())[0, 0]) == (10, 20, 30)


def test_16_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    decoded = data.decode_image(png(values))
    assert list(decoded[0, :, 0]) == [0, 100, 255]


def test_float_images_in_the_unit_range_are_scaled_to_bytes():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert list(data.to_rgb8(unit)[0, :, 0]) == [0, 128, 255]
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), mode="F")
    assert list(data.to_rgb8(bytes_range)[0, :, 0]) == [0, 100, 255]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognized image"),
        (png(np.zeros((64, 64), np.uint8))[:-40], "corrupt or truncated"),
    ],
)
def test_unusable_bytes_raise_a_decode_error_that_says_why(payload, message):
    with pytest.raises(data.ImageDecodeError, match=message):
        data.decode_image(payload)


def test_truncated_jpeg_is_refused():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(data.ImageDecodeError, match="truncated"):
        data.decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, a few hundred bytes on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    with pytest.raises(data.ImageDecodeError, match="decompression bomb"):
        data.decode_image(bomb_png(30000, 30000))
    with pytest.raises(data.ImageDecodeError, match="MP limit"):
        data.decode_image(bomb_png(9000, 9000))
    with pytest.raises(data.ImageDecodeError, match="MP limit"):
        data.decode_image(png(np.zeros((100, 100), np.uint8)), max_pixels=5000)


def test_resize_to_model_keeps_uint8_channels_first():
    image = np.zeros((231, 105, 3), np.uint8)
    out = data.resize_to_model(image, (64, 96))
    assert out.shape == (3, 64, 96) and out.dtype.is_floating_point is False


def test_mvtec_layout_is_discovered_with_masks():
    root = str(require_mtd())
    assert data.discover_categories(root) == ["tile_exp1", "tile_exp2", "tile_exp3"]
    assert len(data.train_images(root, "tile_exp1")) == 100
    items = data.test_images(root, "tile_exp1")
    defects = {i.defect for i in items}
    assert defects == {"good", "blowhole", "crack"}
    assert all((i.mask_url is not None) == i.is_anomalous for i in items)
    image = data.decode_image((MTD / "tile_exp1" / "test" / "crack").glob("*.png").__next__().read_bytes())
    assert image.ndim == 3


def test_a_category_without_training_images_is_a_clear_error(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(data.DatasetLayoutError, match="no category"):
        data.discover_categories(str(tmp_path))
    (tmp_path / "part" / "train" / "good").mkdir(parents=True)
    with pytest.raises(data.DatasetLayoutError, match="holds no images"):
        data.train_images(str(tmp_path), "part")
    with pytest.raises(data.DatasetLayoutError, match="does not exist"):
        data.discover_categories(str(tmp_path / "missing"))


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "P"])
def test_an_image_near_the_input_size_is_resized_exactly_as_before(mode):
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 65535 if mode == "I;16" else 255, size=(300, 400), dtype=np.uint16 if mode == "I;16" else np.uint8)
    image = Image.fromarray(pixels) if mode != "RGB" else Image.fromarray(np.stack([pixels] * 3, axis=2).astype(np.uint8))
    if mode == "P":
        image = image.convert("P")
    raw = _png_bytes(image)
    resized, original = data.decode_for_model(raw, (256, 256))
    assert original == (300, 400)
    assert torch.equal(resized, data.resize_to_model(data.decode_image(raw), (256, 256)))


@pytest.mark.parametrize("mode", ["L", "I;16", "P"])
def test_a_much_larger_image_is_reduced_first_and_looks_the_same_to_the_model(mode):
    y, x = np.mgrid[0:2048, 0:3072]
    smooth = (127 + 100 * np.sin(x / 97.0) * np.cos(y / 61.0))
    image = Image.fromarray((smooth * 257).astype(np.uint16)) if mode == "I;16" else Image.fromarray(smooth.astype(np.uint8))
    if mode == "P":
        image = image.convert("P")
    raw = _png_bytes(image)
    resized, original = data.decode_for_model(raw, (256, 256))
    assert original == (2048, 3072)
    direct = data.resize_to_model(data.decode_image(raw), (256, 256))
    assert (resized.int() - direct.int()).abs().max() <= 3, "the box pre-reduction changes at most a few grey levels"


# Runs in a fresh process: samples the resident set while one call decodes, against the RSS just before it
# (the peak of the imports must not hide what the call costs).
_MEMORY_PROBE = """
import os, sys, threading, time
import torch
from uflow_batch import data

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

raw = open(sys.argv[1], "rb").read()
decode = {
    "bounded": lambda: data.decode_for_model(raw, (256, 256)),
    "direct": lambda: data.resize_to_model(data.decode_image(raw), (256, 256)),
}[sys.argv[2]]
before, peak, done = resident(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
decode()
done.set()
sampler.join()
print(max(peak[0], resident()) - before)
"""


def test_decoding_a_large_image_for_the_model_costs_about_what_its_pixels_weigh(tmp_path):
    import subprocess
    import sys

    height, width = 6000, 8000  # 48 MP, 16-bit: a few hundred KB on disk, 96 MB of pixels
    path = tmp_path / "big16.png"
    Image.fromarray(np.zeros((height, width), dtype=np.uint16)).save(path)

    def cost(how: str) -> int:
        run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), how], capture_output=True, text=True, check=True)
        return int(run.stdout)

    pixel_bytes = height * width * 2
    bounded, direct = cost("bounded"), cost("direct")
    assert bounded < 4 * pixel_bytes, (bounded, direct)  # the 16-bit decode, its 32-bit copy, and little else
    assert direct > 4 * pixel_bytes, (bounded, direct)  # what the direct path costs, so this test can fail
