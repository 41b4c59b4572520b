"""FID/KID helpers: pixel conversion, weight remapping layout, and torchmetrics' distances on known features."""
from __future__ import annotations

import pytest
import torch

from ddm_trainer import fid


def test_to_uint8_rgb_maps_range_and_repeats_gray() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = fid.to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, 0].flatten().tolist() == [0, 128, 255, 255]
    assert torch.equal(out[0, 0], out[0, 2])
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\)"):
        fid.to_uint8_rgb(torch.zeros(2, 2, 4, 4))


def test_remap_fills_every_torch_fidelity_key_in_order() -> None:
    skeleton = _skeleton_state()  # the layout fid._fidelity_keys() reads (built once: Inception init is slow)
    keys = list(skeleton)
    convs = [k for k in keys if k.endswith(".conv.weight")]
    assert len(convs) == 94
    # A fake TorchScript state with the same conv shapes, in graph order, with distinct values per conv.
    target_shapes = {k: v.shape for k, v in skeleton.items()}
    ts_state = {}
    for i, k in enumerate(convs):
        name = f"net.layers.c{i}"
        out_ch = target_shapes[k][0]
        ts_state[f"{name}.weight"] = torch.full(target_shapes[k], float(i))
        ts_state[f"{name}.beta"] = torch.full((out_ch,), float(i) + 0.5)
        ts_state[f"{name}.mean"] = torch.zeros(out_ch)
        ts_state[f"{name}.var"] = torch.ones(out_ch)
    state = fid.remap_torchscript_state(ts_state, keys)
    assert set(state) == set(keys)
    assert state[convs[7]].unique().tolist() == [7.0]
    assert state[convs[7].replace("conv.weight", "bn.bias")].unique().tolist() == [7.5]
    assert state[convs[7].replace("conv.weight", "bn.weight")].unique().tolist() == [1.0]
    with pytest.raises(fid.FIDSetupError, match="93 convolutions"):
        fid.remap_torchscript_state({k: v for k, v in ts_state.items() if not k.startswith("net.layers.c93.")}, keys)


def _skeleton_state() -> dict[str, torch.Tensor]:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    layers = torch.nn.Sequential()
    for name, module in fid._build_layers(tfi).items():
        layers.add_module(name, module)
    return layers.state_dict()


def test_fid_and_kid_are_zero_for_identical_sets_and_grow_with_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 64, generator=gen, dtype=torch.float64)  # any width; Inception's is 2048
    same = fid.fid_from_features(real, real)
    near = fid.fid_from_features(real, real + 0.05)
    far = fid.fid_from_features(real, real + 0.5)
    assert abs(same) < 1e-3
    assert near == pytest.approx(64 * 0.05**2, rel=0.05)  # mean shift only: ||d||^2
    assert far > near * 10
    kid_near, _ = fid.kid_from_features(real, real + 0.05, subset_size=100, subsets=10)
    kid_far, kid_std = fid.kid_from_features(real, real + 0.5, subset_size=1000, subsets=10)  # size capped at 150
    assert kid_far > kid_near and kid_std > 0  # capped below the set size, subsets differ: a real spread
    assert fid.kid_from_features(real, real + 0.5, subsets=5) == fid.kid_from_features(real, real + 0.5, subsets=5)


def test_fid_is_torchmetrics_fid() -> None:
    """The eigh form of tr sqrt(S1 S2) gives torchmetrics' FID (its general eigvals of S1 S2), for sets whose
    covariances differ in shape as well as in mean, and for identical sets."""
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(400, 48, generator=gen, dtype=torch.float64)
    mix = torch.randn(48, 48, generator=gen, dtype=torch.float64) * 0.3 + torch.eye(48, dtype=torch.float64)
    fake = torch.randn(500, 48, generator=gen, dtype=torch.float64) @ mix + 0.2  # (500, 48) correlated, shifted
    for a, b in ((real, fake), (real, real), (fake, real)):
        ours, reference = fid.fid_from_features(a, b), fid.torchmetrics_fid(a, b)
        assert ours == pytest.approx(reference, rel=1e-6, abs=1e-6)
    assert fid.fid_from_features(real, fake) > 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fid_and_kid_on_the_gpu_match_the_cpu() -> None:
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(3000, 2048, generator=gen, dtype=torch.float64)
    fake = torch.randn(3000, 2048, generator=gen, dtype=torch.float64) * 1.1 + 0.05
    assert fid.fid_from_features(real, fake, "cuda") == pytest.approx(fid.fid_from_features(real, fake), rel=1e-9)
    kid_gpu = fid.kid_from_features(real, fake, 1000, 20, 0, "cuda")
    assert kid_gpu == pytest.approx(fid.kid_from_features(real, fake, 1000, 20, 0), rel=1e-9)


def test_a_short_last_chunk_is_padded_to_the_batch_shape_and_its_features_unchanged() -> None:
    """Every extractor call sees the same batch shape (no cuDNN re-tuning); the padding's features are dropped."""
    shapes: list[tuple[int, ...]] = []

    class Pool(torch.nn.Module):  # a per-image feature (mean colour), as Inception's are per image
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(x.shape))
            return x.float().mean(dim=(2, 3)) * self.w  # (b, 3)

    images = torch.rand(7, 3, 8, 8) * 2 - 1
    feats = fid.extract_features(Pool(), images, batch_size=3)
    assert shapes == [(3, 3, 8, 8)] * 3  # 3 + 3 + 1 padded to 3
    one_by_one = torch.cat([fid.extract_features(Pool(), images[i : i + 1], batch_size=3) for i in range(7)])
    assert feats.shape == (7, 3) and torch.equal(feats, one_by_one)
