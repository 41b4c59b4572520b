"""CombinedSampler: validation before sampling, per-sample expert routing, lazy loading, CFG, NFE/FLOPs, determinism."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ddm_trainer.errors import ConfigError
from ddm_trainer.sampler import CombinedSampler, draw_noise

torch.set_num_threads(1)


class ConstExpert(nn.Module):
    """Velocity = a constant per expert (+ label offset); counts the samples it saw."""

    def __init__(self, value: float, flops: float = 1e9):
        super().__init__()
        self.value, self.flops, self.seen = value, flops, 0
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.seen += x.shape[0]
        out = torch.full_like(x, self.value) * self.scale
        if y is not None:
            out = out + y.to(x.dtype).view(-1, 1, 1, 1)
        return out

    def forward_flops(self, batch: int = 1) -> float:
        return self.flops * batch


class SignRouter(nn.Module):
    """Sends samples whose first pixel is positive to expert 0, the others to expert 1 (almost one-hot)."""

    num_clusters = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0, 0, 0] > 0).to(x.dtype) * 2 - 1  # (B,)
        return torch.stack([20 * s, -20 * s], dim=1)  # (B, 2)

    def forward_flops(self, batch: int = 1) -> float:
        return 1e8 * batch


def test_router_cluster_count_must_match_experts():
    with pytest.raises(ConfigError, match="router has 2 clusters but 3 experts"):
        CombinedSampler([ConstExpert(0.0)] * 3, SignRouter(), "full")


def test_unknown_strategy_and_method_are_config_errors():
    with pytest.raises(ConfigError, match="'best'"):
        CombinedSampler([ConstExpert(0.0)] * 2, SignRouter(), "best")
    with pytest.raises(ConfigError, match="'rk4'"):
        CombinedSampler([ConstExpert(0.0)] * 2, SignRouter(), "full", method="rk4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top-3.*only 2"):
        CombinedSampler([ConstExpert(0.0)] * 2, SignRouter(), "top-3")


def test_top1_evaluates_each_expert_only_on_its_samples():
    experts = [ConstExpert(1.0), ConstExpert(-1.0)]
    sampler = CombinedSampler(experts, SignRouter(), "top1", steps=1)
    x = torch.tensor([1.0, -1.0, 2.0, -3.0, 0.5]).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    u = sampler.velocity(x, torch.ones(5))
    assert torch.equal(u[:, 0, 0, 0], torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]))
    assert (experts[0].seen, experts[1].seen) == (3, 2)
    stats = sampler.stats(5)
    assert stats.nfe == 1.0 and stats.router_nfe == 1.0
    assert stats.gflops_per_sample == pytest.approx(1.0 + 0.1)
    assert stats.expert_calls == {0: 3, 1: 2}


def test_full_evaluates_every_expert_on_every_sample():
    experts = [ConstExpert(1.0), ConstExpert(-1.0)]
    sampler = CombinedSampler(experts, SignRouter(), "full", steps=4, method="heun")
    sampler.sample(draw_noise(6, (1, 2, 2), seed=0))
    assert experts[0].seen == experts[1].seen == 6 * (2 * 4 - 1)  # Heun: 2 per step, the last step Euler
    assert sampler.stats(6).nfe == 2 * (2 * 4 - 1)


def test_oracle_loads_only_its_expert_lazily_and_needs_no_router():
    loaded: list[int] = []

    def loader(k: int):
        def load() -> nn.Module:
            loaded.append(k)
            return ConstExpert(float(k))
        return load

    sampler = CombinedSampler([loader(k) for k in range(3)], None, "oracle-2", steps=3)
    assert loaded == []  # nothing is loaded before sampling
    x = sampler.sample(torch.zeros(4, 1, 2, 2))
    assert loaded == [2]
    assert torch.allclose(x, torch.full_like(x, -2.0))  # dx/dt = 2 from t=1 to 0
    assert sampler.stats(4).router_nfe == 0


def test_router_loader_and_strategy_without_router():
    with pytest.raises(ConfigError, match="needs a router"):
        CombinedSampler([ConstExpert(0.0)] * 2, None, "full")
    sampler = CombinedSampler([ConstExpert(1.0), ConstExpert(-1.0)], SignRouter, "top1", steps=2)
    sampler.sample(torch.ones(2, 1, 2, 2))


def test_classifier_free_guidance_combines_cond_and_uncond():
    expert = ConstExpert(0.5)
    sampler = CombinedSampler([expert], None, "oracle-0", steps=1, cfg_scale=3.0, null_label=10)
    y = torch.tensor([1, 2])
    u = sampler.velocity(torch.zeros(2, 1, 1, 1), torch.ones(2), y)
    # cond = 0.5 + y, uncond = 0.5 + 10 -> uncond + 3 (cond - uncond)
    expected = (10.5 + 3 * ((0.5 + y) - 10.5)).to(torch.float32)
    assert torch.allclose(u.flatten(), expected)
    assert sampler.stats(2).nfe == 2  # the guided pair counts twice
    with pytest.raises(ConfigError, match="null"):
        CombinedSampler([expert], None, "oracle-0", cfg_scale=2.0).velocity(torch.zeros(1, 1, 1, 1), torch.ones(1),
                                                                         torch.tensor([0]))


def test_sample_k_is_deterministic_for_a_seed():
    class FlatRouter(nn.Module):
        num_clusters = 3

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 3)

    experts = [ConstExpert(float(k)) for k in range(3)]
    x1 = draw_noise(8, (1, 2, 2), seed=3)
    a = CombinedSampler(experts, FlatRouter(), "sample-1", steps=5).sample(x1, seed=11)
    b = CombinedSampler(experts, FlatRouter(), "sample-1", steps=5).sample(x1, seed=11)
    c = CombinedSampler(experts, FlatRouter(), "sample-1", steps=5).sample(x1, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(draw_noise(8, (1, 2, 2), seed=3), x1)


def test_experts_on_their_own_devices():
    experts = [ConstExpert(1.0), ConstExpert(-1.0)]
    sampler = CombinedSampler(experts, SignRouter(), "full", steps=2, devices=["cpu", "cpu"])
    out = sampler.sample(torch.ones(2, 1, 2, 2))
    assert out.device.type == "cpu"
    with pytest.raises(ConfigError, match="1 devices given for 2 experts"):
        CombinedSampler(experts, SignRouter(), "full", devices=["cpu"])


def test_the_mixture_oracle_keeps_one_expert_per_trajectory_drawn_from_its_class():
    experts = [ConstExpert(1.0), ConstExpert(-1.0), ConstExpert(3.0)]
    counts = torch.tensor([[5, 0], [5, 0], [0, 9]])  # class 0 in clusters 0 and 1, class 1 in cluster 2 only
    sampler = CombinedSampler(experts, None, "oracle", steps=4, mixture=counts)  # no router needed
    y = torch.tensor([0] * 64 + [1] * 8)
    x = sampler.sample(torch.zeros(72, 1, 1, 1), y, seed=3)
    # constant velocity v_k + y over t in [1, 0]: x0 = -(v_k + y); one expert per sample over all 4 steps
    end = -x.flatten()
    assert torch.all((end[64:] == 4.0))
    assert set(end[:64].tolist()) == {1.0, -1.0}  # both of class 0's clusters drawn, never mixed within a sample
    assert torch.equal(sampler.sample(torch.zeros(72, 1, 1, 1), y, seed=3), x)  # the seed fixes the draw
    stats = sampler.stats(144)
    assert stats.router_nfe == 0 and stats.nfe == 4
    with pytest.raises(ConfigError, match="sample\\(\\)"):
        sampler.velocity(torch.zeros(2, 1, 1, 1), torch.ones(2), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="class counts"):
        CombinedSampler(experts, None, "oracle")
    with pytest.raises(ConfigError, match="2 clusters given for 3 experts"):
        CombinedSampler(experts, None, "oracle", mixture=counts[:2])


def test_the_mixture_oracle_asks_a_training_captions_own_expert_where_it_is_known():
    experts = [ConstExpert(1.0), ConstExpert(-1.0), None]  # expert 2 is missing
    sampler = CombinedSampler(experts, None, "oracle", steps=2, mixture=torch.tensor([5, 5, 5]))
    end = -sampler.sample(torch.zeros(4, 1, 1, 1), experts=torch.tensor([1, 0, 2, 1])).flatten()
    assert end[[0, 1, 3]].tolist() == [-1.0, 1.0, -1.0]  # each sample's given expert, for the whole trajectory
    assert float(end[2]) in (1.0, -1.0)  # its expert is missing: drawn from the present ones
