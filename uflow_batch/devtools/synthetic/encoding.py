"""PNG bytes for the dataset and the archive, including the unusual but valid encodings a scorer must accept.

The odd encodings (16-bit, palette, RGBA) and a decompression bomb exist so the
scoring archive can hold files a robust scorer must survive; they are written
here by hand or through Pillow so the bytes are exactly known.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image


def png(array: np.ndarray) -> bytes:
    """An ordinary PNG of a uint8 (H, W) or (H, W, 3) array; fast compression, the files are rewritten often."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as MVTec stores its ground truth: 0 and 255, grayscale."""
    return png(mask.astype(np.uint8) * 255)


def gray16_png(gray: np.ndarray) -> bytes:
    """The same grey levels as 16-bit samples, which a scorer must decode to the 8-bit image."""
    return png(gray.astype(np.uint16) * 257)


def palette_png(gray: np.ndarray) -> bytes:
    """The same grey levels as a palette image with an identity grey palette."""
    image = Image.fromarray(gray)
    image.putpalette([level for level in range(256) for _ in range(3)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def rgba_png(rgb: np.ndarray) -> bytes:
    """The same colours with an opaque alpha channel."""
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
    return png(np.concatenate([rgb, alpha], axis=2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=1)
def decompression_bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` zeros: ~100 KB on disk, ~900 MB once decoded by Pillow."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    parts = [compressor.compress(row * min(rows_per_chunk, side - start)) for start in range(0, side, rows_per_chunk)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))
