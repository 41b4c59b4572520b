"""bench/prompt_adherence.py reads each sample of ``ddm sample``'s combined grid with its prompt's class: in the
product's layout (each prompt its own rows) and in drawing order (image i has prompt i mod P, grids written before
the layout changed). A misread cell would count a sample against the wrong prompt."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddm_trainer.stages.sample import by_prompt, grid_png
from fixtures.bench import load_bench


@pytest.mark.parametrize("order", ["by-prompt", "drawing"])
def test_grid_cells_come_back_with_their_prompts(tmp_path: Path, order: str) -> None:
    bench = load_bench("prompt_adherence")
    P, per_prompt, nrow = 10, 6, 4
    gen = torch.Generator().manual_seed(0)
    drawn = torch.rand(P * per_prompt, 3, 32, 32, generator=gen) * 2 - 1  # image i has prompt i mod P
    uint8 = ((drawn + 1) * 127.5).round().to(torch.uint8)  # what the PNG holds
    path = tmp_path / "grid.png"
    if order == "by-prompt":  # as ddm sample writes it now: each prompt's rows, its name on the left
        rows = -(-per_prompt // nrow)
        path.write_bytes(grid_png(by_prompt(drawn, P, P * per_prompt, nrow), nrow,
                                  [(p * rows, f"a photo of class {p}") for p in range(P)]))
    else:  # as it wrote it before: drawing order, no labels
        path.write_bytes(grid_png(drawn, nrow))

    cells, classes = bench.grid_samples(str(path), per_prompt, order, nrow)
    assert cells.shape == (P * per_prompt, 3, 32, 32)
    for cell, cls in zip(cells, classes):  # each cell is one drawn image of the prompt it is counted for
        matches = [i for i in range(cls.item(), P * per_prompt, P) if torch.equal(uint8[i], cell)]
        assert len(matches) == 1
    assert np.bincount(classes.numpy()).tolist() == [per_prompt] * P


def test_samples_npz_gives_each_image_its_prompts_class(tmp_path: Path) -> None:
    """``--samples``: the samples.npz that ``ddm sample`` commits (uint8 (N, C, H, W) and each image's prompt)."""
    from ddm_trainer.stages.sample import to_uint8

    bench = load_bench("prompt_adherence")
    prompts = ["a photo of a truck", "a photo of a airplane", "a photo of a cat"]
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    path = tmp_path / "samples.npz"
    np.savez_compressed(path, images=to_uint8(images), labels=np.asarray([], dtype=np.int64),
                        prompts=np.asarray([prompts[i % 3] for i in range(6)]))  # as stages/sample.run writes it
    x, classes = bench.npz_samples(str(path))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.uint8
    assert classes.tolist() == [9, 0, 3, 9, 0, 3]
