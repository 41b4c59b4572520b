"""Checkpoints in a real file store: commit order, torn checkpoints skipped, pruning, final weights, images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddm_trainer import layout
from ddm_trainer.checkpoint import (latest_checkpoint, load_checkpoint, load_final, prune_checkpoints, save_checkpoint,
                                    save_final)
from ddm_trainer.errors import MissingArtifactError
from ddm_trainer.images import make_grid, save_grid
from ddm_trainer.store import FileStore

STAGE = "experts/003"


def state(step: int) -> dict[str, object]:
    return {"step": step, "model": {"w": torch.full((2,), float(step))}, "rng": (1, 2, [3])}


def test_latest_is_the_newest_that_verifies(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert latest_checkpoint(store, STAGE) is None
    for step in (10, 20, 30):
        save_checkpoint(store, STAGE, step, state(step), {"cfg": 1}, keep=5)
    assert latest_checkpoint(store, STAGE) == layout.checkpoint(STAGE, 30)
    loaded = load_checkpoint(store, layout.checkpoint(STAGE, 30))
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((2,), 30.0))

    # A torn write: the file under a manifest no longer matches its hash -> that checkpoint is skipped.
    (tmp_path / layout.checkpoint(STAGE, 30) / "state.pt").write_bytes(b"torn")
    assert latest_checkpoint(store, STAGE) == layout.checkpoint(STAGE, 20)
    # Files without a manifest (killed before it was written) are never trusted.
    (tmp_path / layout.checkpoint(STAGE, 20) / "MANIFEST.json").unlink()
    assert latest_checkpoint(store, STAGE) == layout.checkpoint(STAGE, 10)


def test_keep_prunes_the_oldest(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for step in (1, 2, 3, 4):
        save_checkpoint(store, STAGE, step, state(step), {}, keep=2)
    assert store.committed_prefixes(layout.checkpoints(STAGE)) == [layout.checkpoint(STAGE, 3),
                                                                    layout.checkpoint(STAGE, 4)]
    assert not (tmp_path / layout.checkpoint(STAGE, 1)).exists()
    prune_checkpoints(store, STAGE, keep=1)
    assert store.committed_prefixes(layout.checkpoints(STAGE)) == [layout.checkpoint(STAGE, 4)]


def test_final_weights_round_trip_and_missing_final_names_the_uri(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(MissingArtifactError, match=f"{STAGE}/final"):
        load_final(store, STAGE)
    model, ema = {"w": torch.ones(3)}, {"w": torch.zeros(3)}
    save_final(store, STAGE, model, ema, {"model": {"preset": "DiT-N/4"}, "step": 7})
    final = load_final(store, STAGE)
    assert torch.equal(final.model["w"], model["w"]) and torch.equal(final.ema["w"], ema["w"])
    assert final.config["model"]["preset"] == "DiT-N/4" and final.config["step"] == 7
    assert load_final(store, STAGE, with_model=False).model == {}


def test_grid_layout_and_png(tmp_path: Path) -> None:
    images = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0, 2.0, -3.0)])  # (5, 1, 4, 4)
    grid = make_grid(images, nrow=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 128 and grid[6, 1, 0] == 255 and grid[6, 6, 0] == 255  # clipped
    data = save_grid(images.expand(5, 3, 4, 4), tmp_path / "g.png", nrow=2)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "g.png").read_bytes() == data
