"""The DDM identity on a Gaussian mixture, in float64: the global flow velocity equals sum_k p(k|x_t) u_k(x_t).

Cluster k is N(mu_k, s_k^2 I) with prior pi_k; x_t = (1-t) x0 + t eps. Given k, x_t ~ N(a mu_k, sigma_k^2 I) with
a = 1 - t, sigma_k^2 = a^2 s_k^2 + t^2, and Gaussian conditioning gives
    E[x0 | x_t, k]  = mu_k + (a s_k^2 / sigma_k^2) (x_t - a mu_k)
    E[eps | x_t, k] = (t / sigma_k^2) (x_t - a mu_k)
so u_k = E[eps | x_t, k] - E[x0 | x_t, k]. The independent route differentiates the log-density of the marginal
p_t with autograd: E[eps | x_t] = -t * score(x_t), E[x0 | x_t] = (x_t - t E[eps | x_t]) / (1 - t).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddm_trainer.flow import ode_nfe, time_grid
from ddm_trainer.sampler import CombinedSampler, draw_noise

torch.set_num_threads(1)
D = 3  # data dimension; "images" are (B, D, 1, 1)
MU = torch.tensor([[2.0, 0.0, -1.0], [-1.5, 1.0, 0.5], [0.0, -2.5, 1.5], [1.0, 2.0, 2.0]], dtype=torch.float64)
S = torch.tensor([0.3, 0.6, 0.45, 0.2], dtype=torch.float64)
PI = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
K = MU.shape[0]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], D)  # (B, D)


def cluster_velocity(x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """u_k(x_t, t) in closed form; x (B, D), t (B,)."""
    a, tt = (1 - t)[:, None], t[:, None]  # (B, 1)
    var = a**2 * S[k] ** 2 + tt**2  # (B, 1)
    resid = x - a * MU[k]  # (B, D)
    e_x0 = MU[k] + (a * S[k] ** 2 / var) * resid
    e_eps = (tt / var) * resid
    return e_eps - e_x0


def log_joint(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log pi_k + log N(x; a mu_k, sigma_k^2 I), (B, K)."""
    a = (1 - t)[:, None, None]  # (B, 1, 1)
    var = a[..., 0] ** 2 * S**2 + t[:, None] ** 2  # (B, K)
    sq = ((x[:, None, :] - a * MU[None]) ** 2).sum(-1)  # (B, K)
    return PI.log() - 0.5 * D * torch.log(2 * math.pi * var) - 0.5 * sq / var


def posterior(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(log_joint(x, t), dim=1)  # (B, K)


def global_velocity_by_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t] from the autograd score of the marginal log-density (no per-cluster velocities)."""
    x = x.detach().clone().requires_grad_(True)
    log_p = torch.logsumexp(log_joint(x, t), dim=1).sum()
    (score,) = torch.autograd.grad(log_p, x)  # (B, D)
    tt = t[:, None]
    e_eps = -tt * score
    e_x0 = (x.detach() - tt * e_eps) / (1 - tt)
    return e_eps - e_x0


class ClosedFormExpert(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return cluster_velocity(_flat(x), t, self.k).reshape(x.shape)


class ClosedFormRouter(nn.Module):
    num_clusters = K

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return log_joint(_flat(x), t)  # logits = log joint; softmax gives the posterior


def _points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.multinomial(PI, n, replacement=True, generator=gen)
    x0 = MU[k] + S[k, None] * torch.randn(n, D, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01  # (0.01, 0.99): the score route divides by 1-t
    eps = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return (1 - t)[:, None] * x0 + t[:, None] * eps, t


def test_cluster_velocity_matches_single_gaussian_score_route():
    # With one cluster the marginal is that Gaussian, so the score route must give u_k exactly.
    x, t = _points(64, 1)
    for k in range(K):
        a = (1 - t)[:, None]
        var = a**2 * S[k] ** 2 + t[:, None] ** 2
        score = -(x - a * MU[k]) / var
        e_eps = -t[:, None] * score
        expected = e_eps - (x - t[:, None] * e_eps) / a
        assert (cluster_velocity(x, t, k) - expected).abs().max() <= 1e-10


def test_mixture_velocity_is_posterior_weighted_sum_of_cluster_velocities():
    x, t = _points(512, 2)
    p = posterior(x, t)  # (B, K)
    combined = sum(p[:, k, None] * cluster_velocity(x, t, k) for k in range(K))
    reference = global_velocity_by_score(x, t)
    assert (combined - reference).abs().max() <= 1e-5
    # Not trivially true: a uniform mixture of the same experts is far from the global field.
    uniform = sum(cluster_velocity(x, t, k) / K for k in range(K))
    assert (uniform - reference).abs().max() > 0.1


def test_full_strategy_sampler_reproduces_the_global_velocity():
    x, t = _points(256, 3)
    sampler = CombinedSampler([ClosedFormExpert(k) for k in range(K)], ClosedFormRouter(), "full", steps=10,
                              dtype=torch.float64)
    u = sampler.velocity(x.reshape(-1, D, 1, 1), t)
    assert (_flat(u) - global_velocity_by_score(x, t)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_full_strategy_ode_samples_match_integrating_the_global_field(method: str):
    steps, n = 40, 128
    sampler = CombinedSampler([ClosedFormExpert(k) for k in range(K)], ClosedFormRouter(), "full", steps=steps,
                              method=method, dtype=torch.float64)
    x1 = draw_noise(n, (D, 1, 1), seed=7, dtype=torch.float64)
    ours = _flat(sampler.sample(x1))
    # Reference: integrate the score-route field. Its formula divides by 1-t, so the endpoints use their limits.
    grid = time_grid(steps).tolist()  # the float32 grid the sampler integrates on
    x = _flat(x1).clone()

    def field(x: torch.Tensor, t_val: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), t_val, dtype=torch.float64)
        if t_val >= 1.0:
            return x - (PI[:, None] * MU).sum(0)  # at t=1: E[eps|x]=x, E[x0|x]=E[x0]
        if t_val <= 0.0:
            return -x  # at t=0: E[eps|x0]=E[eps]=0 and E[x0|x0]=x0
        return global_velocity_by_score(x, t)

    for i, (t_now, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = field(x, t_now)
        if method == "heun" and i < steps - 1:  # Heun's last step is Euler (t=0 is never evaluated)
            v2 = field(x + (t_next - t_now) * v, t_next)
            x = x + (t_next - t_now) * 0.5 * (v + v2)
        else:
            x = x + (t_next - t_now) * v
    assert (ours - x).abs().max() <= 1e-5
    stats = sampler.stats(n)
    assert stats.router_nfe == ode_nfe(steps, method)
    assert stats.nfe == K * stats.router_nfe  # full: every expert on every sample at every evaluation
    # And the samples land on the clusters: every sample is near some mean (within 5 std).
    dist = ((ours[:, None, :] - MU[None]) ** 2).sum(-1).sqrt() / S[None]  # (n, K)
    assert (dist.min(dim=1).values < 5 * math.sqrt(D)).all()
