"""DiT: shapes, presets, conditioning, analytic FLOPs against torch's FLOP counter."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddm_trainer.errors import ConfigError
from ddm_trainer.models.dit import DIT_PRESETS, DiT, build_dit

torch.set_num_threads(1)


def test_paper_presets_have_the_paper_sizes() -> None:
    params = {p: sum(x.numel() for x in build_dit(p, 32, 4).parameters()) / 1e6 for p in ("DiT-S/2", "DiT-XL/2")}
    assert 32 < params["DiT-S/2"] < 34  # paper: 33M
    assert 670 < params["DiT-XL/2"] < 680  # paper: 675M
    for name in ("DiT-S/2", "DiT-S/4", "DiT-B/2", "DiT-B/4", "DiT-L/2", "DiT-L/4", "DiT-XL/2", "DiT-XL/4",
                 "DiT-T/2", "DiT-T/4"):
        assert name in DIT_PRESETS


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="DiT-Q/2.*DiT-XL/2"):
        build_dit("DiT-Q/2", 32, 3)
    with pytest.raises(ConfigError, match="image_size 30"):
        build_dit("DiT-T/4", 30, 3)


@pytest.mark.parametrize("channels,num_classes,learn_sigma", [(1, None, False), (3, 10, False), (3, None, True)])
def test_output_shape(channels: int, num_classes: int | None, learn_sigma: bool) -> None:
    model = build_dit("DiT-N/4", 16, channels, num_classes=num_classes, learn_sigma=learn_sigma)
    x = torch.randn(3, channels, 16, 16)
    y = torch.tensor([0, 1, 2]) if num_classes else None
    out = model(x, torch.rand(3), y)
    assert out.shape == (3, channels * (2 if learn_sigma else 1), 16, 16)


def test_zero_init_output_and_conditioning_matters_after_training_step() -> None:
    torch.manual_seed(0)
    model = build_dit("DiT-N/4", 16, 1, num_classes=3)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert torch.count_nonzero(model(x, t, torch.tensor([0, 1]))) == 0  # adaLN-Zero: starts at zero velocity
    for p in model.parameters():  # move away from the zero init
        p.data.add_(0.05 * torch.randn_like(p))
    a = model(x, t, torch.tensor([0, 0]))
    b = model(x, t, torch.tensor([1, 1]))
    null = model(x, t, torch.full((2,), model.null_label))
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    assert torch.allclose(model(x, t, None), null)  # y=None means the null class
    assert not torch.allclose(model(x, torch.zeros(2), None), model(x, torch.ones(2), None))  # time matters


def test_unconditional_model_has_no_null_label() -> None:
    with pytest.raises(ConfigError, match="unconditional"):
        _ = build_dit("DiT-N/4", 16, 1).null_label


@pytest.mark.parametrize("preset,size,channels", [("DiT-T/4", 32, 1), ("DiT-N/4", 16, 3), ("DiT-T/2", 16, 3)])
def test_forward_flops_match_torch_flop_counter(preset: str, size: int, channels: int) -> None:
    model: DiT = build_dit(preset, size, channels, num_classes=10)
    x, t, y = torch.randn(2, channels, size, size), torch.rand(2), torch.tensor([1, 2])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math path: attention as bmm
        model(x, t, y)
    assert model.forward_flops(batch=2) == counter.get_total_flops()
