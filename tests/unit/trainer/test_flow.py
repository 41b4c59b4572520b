"""Flow matching: path, target, time sampling, loss, ODE samplers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ddm_trainer.errors import ConfigError
from ddm_trainer.flow import drop_labels, flow_loss, interpolate, ode_nfe, ode_sample, sample_t, velocity_target

torch.set_num_threads(1)


def test_path_endpoints_and_target() -> None:
    x0, eps = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)  # t=0 is data
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)  # t=1 is noise
    t = torch.tensor([0.25, 0.5, 0.75, 0.1])
    h = 1e-3
    numeric = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(numeric, velocity_target(x0, eps), atol=1e-3)


def test_time_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    u = sample_t(20000, g, "uniform")
    ln = sample_t(20000, g, "logit_normal")
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.mean() - 0.5) < 0.01 and ln.var() < u.var()  # mass in the middle
    with pytest.raises(ConfigError, match="cosine"):
        sample_t(2, g, "cosine")  # type: ignore[arg-type]


class Oracle(nn.Module):
    """Knows the single data point x0: the true velocity at x_t is (x_t - x0) / t = eps - x0."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise() -> None:
    x0 = torch.randn(1, 1, 4, 4).expand(8, 1, 4, 4).double()
    g = torch.Generator().manual_seed(1)
    assert flow_loss(Oracle(x0), x0, None, g).item() < 1e-8
    zero = nn.Module()
    zero.forward = lambda x, t, y: torch.zeros_like(x)  # type: ignore[method-assign]
    assert flow_loss(zero, x0, None, g).item() > 0.5  # E|eps - x0|^2 >= 1


def test_flow_loss_is_reproducible_from_the_generator() -> None:
    model = Oracle(torch.zeros(1, 1, 2, 2))
    x0 = torch.randn(4, 1, 2, 2)
    a = flow_loss(model, x0, None, torch.Generator().manual_seed(5))
    b = flow_loss(model, x0, None, torch.Generator().manual_seed(5))
    c = flow_loss(model, x0, None, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_drop_labels_rate() -> None:
    y = torch.zeros(10000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, 7, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 7}
    assert abs((dropped == 7).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, 7, torch.Generator()), y)


def test_ode_recovers_data_on_a_straight_path() -> None:
    x0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0  # constant velocity: any step count is exact

    for method in ("euler", "heun"):
        out, nfe = ode_sample(v, eps, 5, method, return_nfe=True)
        assert torch.allclose(out, x0, atol=1e-5)
        assert nfe == ode_nfe(5, method)
    assert ode_nfe(5, "euler") == 5 and ode_nfe(5, "heun") == 9


def test_heun_beats_euler_on_a_curved_field() -> None:
    # dx/dt = x  from t=1 to t=0: exact x(0) = x(1) * e^-1.
    x1 = torch.ones(1, 1, 1, 1)
    exact = torch.exp(torch.tensor(-1.0))
    euler = ode_sample(lambda x, t: x, x1, 10, "euler")
    heun = ode_sample(lambda x, t: x, x1, 10, "heun")
    assert abs(heun.item() - exact) < abs(euler.item() - exact) / 5


def test_ode_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="rk4"):
        ode_sample(lambda x, t: x, torch.ones(1), 2, "rk4")
    with pytest.raises(ConfigError, match="steps"):
        ode_sample(lambda x, t: x, torch.ones(1), 0)
