"""Image decoding, torch-free so that decode worker processes start in a fraction of a second.

``decode_image`` turns one encoded image into (C, size, size) uint8; ``decode_batch`` turns a batch of them into
the (B, C, H, W) float32 array in [-1, 1] that every stream hands out (bitwise what ``Source.load`` computes).
"""
from __future__ import annotations

import io
import signal
from typing import Any, Sequence

import numpy as np

from .errors import DataError


def to_uint8(img: Any, size: int, channels: int) -> np.ndarray:
    """A PIL image -> (C, size, size) uint8: gray/RGB as asked, center crop to square, bilinear resize."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)  # (C, H, W)


def decode_image(data: bytes, size: int, channels: int, where: str) -> np.ndarray:
    """Encoded bytes -> (C, size, size) uint8; DataError naming ``where`` (file, shard, key) when corrupt."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_uint8(img, size, channels)
    except Exception as e:
        raise DataError(f"corrupt image {where}: {type(e).__name__}: {e}") from None


def to_unit_range(arrs: np.ndarray) -> np.ndarray:
    """(B, C, H, W) uint8 -> float32 in [-1, 1], in float32 arithmetic like ``tensor.float().div_(127.5).sub_(1)``."""
    out = arrs.astype(np.float32)
    np.divide(out, np.float32(127.5), out=out)
    np.subtract(out, np.float32(1.0), out=out)
    return out


def decode_batch(images: Sequence[bytes], wheres: Sequence[str], size: int, channels: int) -> np.ndarray:
    """A batch of encoded images -> (B, C, size, size) float32 in [-1, 1]. Runs in a decode worker process."""
    return to_unit_range(np.stack([decode_image(b, size, channels, w) for b, w in zip(images, wheres)]))


def ignore_stop_signals() -> None:
    """Decode workers' initializer: Ctrl-C and SIGTERM are the training process's to handle (it checkpoints, then
    shuts its workers down); a worker dying first would only turn a clean stop into a broken-pool error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
