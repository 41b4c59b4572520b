"""Rectified-flow (flow matching) pieces: the path, its velocity target, time sampling, the loss and ODE samplers.

Convention everywhere: ``x_t = (1 - t) * x0 + t * eps``; t in [0, 1], t = 0 is data, t = 1 is noise;
the velocity is ``dx_t/dt = eps - x0``; sampling integrates dx/dt = v from t = 1 down to t = 0.
All randomness comes from an explicit ``torch.Generator`` so a training run can be resumed bit for bit.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

TimeDist = Literal["uniform", "logit_normal"]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,...), t (B,)) -> v (B,...)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)  # (B, 1, 1, 1)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t of shape (B,)."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def sample_t(batch: int, generator: torch.Generator, dist: TimeDist = "uniform", logit_mean: float = 0.0,
             logit_std: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) flow times in [0, 1]: uniform, or logit-normal (SD3) which favours the middle of the path."""
    gen_device = generator.device
    if dist == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device)
    elif dist == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=gen_device))
    else:
        from .errors import ConfigError

        raise ConfigError(f"unknown time distribution {dist!r} (choose from uniform, logit_normal)")
    return t.to(device) if device is not None else t


def dropped(n: int, p: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """(n,) bool on ``device``, each True with probability p: the samples whose condition guidance training drops."""
    return torch.rand(n, generator=generator, device=generator.device).to(device) < p


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if p <= 0:
        return y
    return torch.where(dropped(y.shape[0], p, generator, y.device), torch.full_like(y, null_label), y)


def flow_loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
              t_dist: TimeDist = "uniform", label_dropout: float = 0.0, logit_mean: float = 0.0,
              logit_std: float = 1.0, text: tuple[torch.Tensor, torch.Tensor] | None = None,
              caption_dropout: float = 0.0) -> torch.Tensor:
    """MSE(model(x_t, t, y[, text]), eps - x0) averaged over all pixels; t ~ t_dist, eps ~ N(0, I), both from
    ``generator``. ``text``: the captions' (token embeddings (B, L, D), mask (B, L)), each replaced by the null
    caption with probability ``caption_dropout`` (classifier-free guidance training)."""
    B = x0.shape[0]
    t = sample_t(B, generator, t_dist, logit_mean, logit_std, device=x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)  # (B, C, H, W)
    if y is not None and label_dropout > 0:
        null = getattr(model, "null_label", None)
        if null is None:  # a wrapped model (DDP, compiled): look inside
            inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
            null = getattr(inner, "null_label")
        y = drop_labels(y, label_dropout, int(null), generator)
    x_t = interpolate(x0, eps, t)  # (B, C, H, W)
    if text is not None:
        v = model(x_t, t, y, text[0], text[1], text_drop=dropped(B, caption_dropout, generator, x0.device))
    else:
        v = model(x_t, t, y)  # (B, C, H, W)
    return F.mse_loss(v.float(), velocity_target(x0, eps).float())


def time_grid(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), evenly spaced."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def ode_nfe(steps: int, method: str) -> int:
    """Model evaluations ``ode_sample`` makes: Euler 1 per step; Heun 2 per step except the last (Euler to t=0)."""
    return steps if method == "euler" else 2 * steps - 1


@torch.no_grad()
def ode_sample(velocity_fn: VelocityFn, x1: torch.Tensor, steps: int, method: str = "euler",
               return_nfe: bool = False) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Integrate dx/dt = v(x, t) from t = 1 (x1, noise) to t = 0; returns x0 (and the NFE when asked).

    ``velocity_fn(x, t)`` gets t as a (B,) tensor. Heun's last step is Euler, as in EDM (t = 0 is not evaluated).
    """
    from .errors import ConfigError

    if steps < 1:
        raise ConfigError(f"ode steps must be >= 1, got {steps}")
    if method not in ("euler", "heun"):
        raise ConfigError(f"unknown ODE method {method!r} (choose from euler, heun)")
    nfe = 0
    ts = time_grid(steps, x1.device)
    x = x1
    B = x.shape[0]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative: we go from noise to data
        v = velocity_fn(x, t.expand(B))
        nfe += 1
        x_euler = x + dt * v
        if method == "heun" and i < steps - 1:
            v_next = velocity_fn(x_euler, t_next.expand(B))
            nfe += 1
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_euler
    return (x, nfe) if return_nfe else x
