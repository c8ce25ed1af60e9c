"""Dataset layout discovery (MVTec AD style) and guarded image decoding.

Layout of a category root::

    <root>/<category>/train/good/*.png          normal images, the only training data
    <root>/<category>/test/good/*.png           normal test images
    <root>/<category>/test/<defect>/*.png       anomalous test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Decoding turns whatever a camera or an archive produces (grayscale, RGBA,
palette, 16-bit) into 8-bit RGB, and refuses what would hurt a worker (an
image of more pixels than allowed is rejected from its header, before its
pixels are decompressed). Every refusal is an :class:`ImageDecodeError` whose
message says what is wrong with the file.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image this product can score; the message says why."""


class DatasetLayoutError(FileNotFoundError):
    """A dataset root or category does not have the expected layout."""


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 RGB array (height, width, 3)."""
    return to_rgb8(open_image(data, max_pixels))


def decode_for_model(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bytes -> (uint8 (3, h, w) at the model's input size, the original (height, width)).

    An image at least four times the input size on both sides is first
    box-reduced in its own mode, so a 64-megapixel file costs about what its
    decoded pixels weigh (1-4 bytes each), not the RGB, float64 and float32
    copies a direct resize makes (about 20 bytes each). Images closer to the
    input size are resized exactly as :func:`resize_to_model` does.
    """
    image = open_image(data, max_pixels)
    original = (image.height, image.width)
    image, full_scale = _reduced(image, size)
    return resize_to_model(to_rgb8(image, full_scale), size), original


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _reduced(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, float | None]:
    """Box-reduce by an integer factor leaving at least twice the input size; the white level is read first."""
    factor = min(image.width // size[1], image.height // size[0]) // 2
    if factor < 2:
        return image, None
    full_scale = None
    if image.mode in _HIGH_DEPTH:
        full_scale = _full_scale(image.mode, np.array([image.getextrema()[1]], dtype=np.float64))
        if image.mode.startswith("I;16"):
            image = image.convert("I")  # Pillow reduces 32-bit integers, not 16-bit ones
    elif image.mode in ("1", "P"):
        image = image.convert("L" if image.mode == "1" else "RGBA")
    return image.reduce(factor), full_scale


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a loaded Pillow image, refused with an ImageDecodeError that says why when unusable."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} ({width * height / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP limit"
                )
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognized image format ({len(data)} bytes, starts with {data[:8]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    return image


def _full_scale(mode: str, values: np.ndarray) -> float:
    """The value that means white: 16-bit files use 65535; float images in [0, 1] use 1.

    32-bit integer and float files do not say their range, so it is read off
    the values: at most 1 (floats only) -> 1, at most 255 -> 255, else 65535.
    """
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(values.max(initial=0.0))
    if mode == "F" and peak <= 1.0:
        return 1.0
    return 255.0 if peak <= 255 else 65535.0


def to_rgb8(image: Image.Image, full_scale: float | None = None) -> np.ndarray:
    """Any Pillow mode -> uint8 RGB. Alpha is dropped; high bit depths are scaled, not clipped.

    ``full_scale`` is the white level when it was read before a reduction (see :func:`decode_for_model`).
    """
    if image.mode in _HIGH_DEPTH:
        values = np.asarray(image, dtype=np.float64)
        scale = full_scale if full_scale is not None else _full_scale(image.mode, values)
        gray = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"), dtype=np.uint8)


def resize_to_model(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, h, w) at the model's input size (antialiased bilinear)."""
    # torch is imported here rather than at the top: listing and write workers
    # import this module and would otherwise carry ~1 GB of torch for nothing.
    import torch
    from torch.nn import functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return tensor[0].round().clamp(0, 255).to(torch.uint8)


def decode_mask(data: bytes) -> np.ndarray:
    """A mask image as bool (H, W): a ground-truth mask or a result's ``mask_png``; any non-zero pixel is defect."""
    image = Image.open(io.BytesIO(data))
    return np.asarray(image.convert("L")) > 0


# --- MVTec layout ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TestImage:
    url: str
    defect: str  # "good" for normal images
    mask_url: str | None

    @property
    def is_anomalous(self) -> bool:
        return self.defect != "good"


def _image_urls(directory: str) -> list[str]:
    return [entry.url for entry in storage.list_entries(directory, missing_ok=True) if is_image_name(entry.name)]


def discover_categories(root: str) -> list[str]:
    """Categories under ``root``: sub-directories that have ``train/good``."""
    if not storage.exists(root):
        raise DatasetLayoutError(f"dataset root {root} does not exist")
    categories = [c for c in storage.list_dirs(root) if storage.exists(storage.join(root, c, "train", "good"))]
    if not categories:
        raise DatasetLayoutError(f"no category with train/good under {root} (expected MVTec AD layout)")
    return categories


def train_images(root: str, category: str) -> list[str]:
    directory = storage.join(root, category, "train", "good")
    urls = _image_urls(directory)
    if not urls:
        raise DatasetLayoutError(f"{directory} is missing or holds no images; a category needs normal training images")
    return urls


def test_images(root: str, category: str) -> list[TestImage]:
    test_root = storage.join(root, category, "test")
    if not storage.exists(test_root):
        raise DatasetLayoutError(f"{test_root} does not exist")
    items = []
    for defect in storage.list_dirs(test_root):
        for url in _image_urls(storage.join(test_root, defect)):
            mask_url = None
            if defect != "good":
                stem = PurePosixPath(url).stem
                candidate = storage.join(root, category, "ground_truth", defect, f"{stem}_mask.png")
                mask_url = candidate if storage.exists(candidate) else None
            items.append(TestImage(url, defect, mask_url))
    if not items:
        raise DatasetLayoutError(f"{test_root} holds no images")
    return items
