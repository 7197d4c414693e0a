"""Image files for input-contract tests, built byte by byte so the expected decode is known independently."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG file of a uint8 (L, RGB, RGBA) or uint16 (grayscale) array, written by PIL."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG (H x W gray, H x W x 2 gray+alpha, H x W x 3 RGB or x 4 RGBA), written by hand.

    PIL cannot write 16-bit colour PNGs, and its decoder should not be the judge of its own input.
    """
    arr = np.asarray(arr, dtype=np.uint16)
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = arr.reshape(h, w * channels).astype(">u2").tobytes()
    stride = w * channels * 2
    raw = b"".join(b"\x00" + rows[y * stride : (y + 1) * stride] for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def declared_size_png(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims ``width`` x ``height`` pixels (pixel data of a 1x1 image).

    Enough to exercise the decompression-bomb refusal, which must happen on the header, before any decoding.
    """
    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)
