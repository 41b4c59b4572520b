"""Image grids as PNG (samples beside a trained expert, evaluation reports)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, values outside [-1, 1] clipped."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    return x.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) in [-1, 1] into one (H', W', C) uint8 array, ``nrow`` images per row, ``pad`` px apart."""
    if images.dim() != 4 or images.shape[0] == 0:
        from .errors import ConfigError

        raise ConfigError(f"make_grid expects a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    tiles = to_uint8(images)  # (B, H, W, C)
    B, H, W, C = tiles.shape
    cols = min(nrow, B)
    rows = -(-B // cols)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = tiles[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike[str] | None = None, nrow: int = 8) -> bytes:
    """PNG bytes of the grid of ``images`` (in [-1, 1]); also written to ``path`` when given."""
    from PIL import Image

    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
