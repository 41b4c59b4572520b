"""Sampling from a DDM ensemble: integrate u(x_t, t) = sum_k w_k(x_t, t) u_k(x_t, t) from noise (t=1) to data (t=0).

``CombinedSampler`` evaluates the router once per velocity evaluation, turns its probabilities into expert weights
with a ``combine`` strategy, and runs each expert only on the samples that give it a nonzero weight (gather,
forward on the expert's own device, scatter back). Experts may be modules or zero-argument loaders, called on
first use. Kept free of pydantic/minio: the GPU benchmark imports it on a machine that has only torch.

Conventions: x_t = (1 - t) x0 + t eps, velocity v = eps - x0, dx/dt = v integrated from t=1 to t=0.
An expert is called as ``expert(x, t, y)`` with x (B, C, H, W), t (B,), y (B,) long or None; the router as
``router(x, t)`` returning logits (B, K), or ``router(x, t, y)`` when it is class-conditional (``num_classes``),
``router(x, t, y, text=pooled)`` when it is text-conditioned (``text_dim``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence, Union, cast

import torch
from torch import nn

from .combine import Strategy, expert_weights, mixture_assignment, parse_strategy, routed_counts
from .errors import ConfigError
from .flow import ode_sample

ExpertSource = Union[nn.Module, Callable[[], nn.Module]]
Method = Literal["euler", "heun"]


@dataclass
class SampleStats:
    """Costs per drawn image: ``CombinedSampler.stats(n)`` divides what its calls accumulated by n."""

    nfe: float = 0.0  # expert forward evaluations per sample (a CFG pair counts 2)
    router_nfe: float = 0.0  # router evaluations per sample
    gflops_per_sample: float = 0.0  # experts + router, from each model's forward_flops(batch=1)
    expert_calls: dict[int, int] = field(default_factory=dict)  # expert -> sample-evaluations, for load balance

    def as_dict(self) -> dict[str, Any]:
        return {"nfe": self.nfe, "router_nfe": self.router_nfe, "gflops_per_sample": self.gflops_per_sample,
                "expert_calls": {str(k): v for k, v in sorted(self.expert_calls.items())}}


def _flops(model: nn.Module) -> float:
    fn = getattr(model, "forward_flops", None)
    return float(fn(batch=1)) if callable(fn) else 0.0


class CombinedSampler:
    """Sample from K experts combined by a router.

    experts: one module or loader per cluster, index = cluster id; None for an expert that is missing (a partial
    ensemble: the router's probabilities are renormalised over the others). router: module (x, t) -> logits
    (B, K), or a loader, or None for ``oracle-C``. devices: one device per expert (default: ``device``). cfg_scale: classifier-free
    guidance scale for class-conditional experts; 1 means no guidance; ``null_label`` is the unconditional class id.
    dtype: the ODE state's dtype; precision="bf16" runs the networks under bf16 autocast (the state stays ``dtype``).
    mixture: for ``oracle``, the clusters' class counts (K, C), or their sizes (K,) (``clustering.mixture_counts``).
    """

    def __init__(self, experts: Sequence[ExpertSource | None], router: ExpertSource | None, strategy: Strategy | str,
                 steps: int = 50, method: Method = "euler", cfg_scale: float = 1.0, device: str | torch.device = "cpu",
                 devices: Sequence[str | torch.device] | None = None, router_num_clusters: int | None = None,
                 null_label: int | None = None, dtype: torch.dtype = torch.float32,
                 precision: Literal["fp32", "bf16"] = "fp32", mixture: torch.Tensor | None = None):
        self.strategy = parse_strategy(strategy)
        self.num_experts = len(experts)
        if self.num_experts == 0:
            raise ConfigError("no experts given to the sampler")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"unknown precision {precision!r} (choose fp32 or bf16)")
        if method not in ("euler", "heun"):
            raise ConfigError(f"unknown ODE method {method!r} (choose euler or heun)")
        if devices is not None and len(devices) != self.num_experts:
            raise ConfigError(f"{len(devices)} devices given for {self.num_experts} experts")
        self.strategy.check(self.num_experts)
        self.present = [k for k, e in enumerate(experts) if e is not None]
        if not self.present:
            raise ConfigError("every expert is missing: nothing to sample with")
        if self.strategy.kind in ("top", "sample") and self.strategy.k > len(self.present):
            raise ConfigError(f"strategy {self.strategy.name!r} keeps {self.strategy.k} experts but only "
                              f"{len(self.present)} are present ({self.present})")
        if self.strategy.kind == "oracle" and self.strategy.cluster not in self.present:
            raise ConfigError(f"strategy {self.strategy.name!r} needs expert {self.strategy.cluster}, which is missing")
        if self.strategy.kind == "mixture":
            if mixture is None:
                raise ConfigError("strategy 'oracle' needs the clusters' class counts (the cluster stage's manifest)")
            if mixture.shape[0] != self.num_experts:
                raise ConfigError(f"strategy 'oracle': class counts of {mixture.shape[0]} clusters given for "
                                  f"{self.num_experts} experts")
        self.mixture = mixture
        self._assigned: torch.Tensor | None = None  # oracle: each sample's expert during one sample() call
        if self.strategy.needs_router and router is None:
            raise ConfigError(f"strategy {self.strategy.name!r} needs a router, none given")
        k_router = router_num_clusters if router_num_clusters is not None else getattr(router, "num_clusters", None)
        if k_router is not None and router is not None and int(k_router) != self.num_experts:
            raise ConfigError(f"router has {k_router} clusters but {self.num_experts} experts were given")
        self._sources = list(experts)
        self._loaded: dict[int, nn.Module] = {}
        self._router_source = router
        self._router: nn.Module | None = None
        self.steps, self.method, self.cfg_scale = steps, method, float(cfg_scale)
        self.device = torch.device(device)
        self.devices = [torch.device(d) for d in devices] if devices is not None else [self.device] * self.num_experts
        self.null_label = null_label
        self.dtype = dtype
        self.precision = precision
        self._stats = SampleStats()

    def _autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- lazy loading --------------------------------------------------------------------------------------------
    def expert(self, k: int) -> nn.Module:
        if k not in self._loaded:
            src = self._sources[k]
            if src is None:
                raise ConfigError(f"expert {k} is missing from this ensemble")
            model = src if isinstance(src, nn.Module) else src()
            self._loaded[k] = model.to(self.devices[k]).eval()
        return self._loaded[k]

    def router(self) -> nn.Module:
        if self._router is None:
            src = self._router_source
            if src is None:
                raise ConfigError(f"strategy {self.strategy.name!r} needs a router, none given")
            model = src if isinstance(src, nn.Module) else src()
            self._router = model.to(self.device).eval()
        return self._router

    # -- one velocity evaluation ---------------------------------------------------------------------------------
    def weights(self, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                y: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Expert weights w (B, K) at (x_t, t); a class-conditional router also sees the labels y (B,), a
        text-conditioned one the captions' pooled embeddings (B, D)."""
        if self.strategy.kind == "mixture":
            if self._assigned is None or self._assigned.shape[0] != x.shape[0]:
                raise ConfigError("strategy 'oracle' draws each sample's expert when its trajectory starts: use "
                                  "sample(), not velocity() alone")
            return torch.nn.functional.one_hot(self._assigned, self.num_experts).to(x.dtype)  # (B, K)
        if not self.strategy.needs_router:
            return expert_weights(torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device),
                                  self.strategy)
        router = self.router()
        with self._autocast(self.device):
            conditional = getattr(router, "num_classes", None) is not None and y is not None
            captioned = getattr(router, "text_dim", None) is not None and pooled is not None
            kwargs = {"text": pooled} if captioned else {}
            logits = router(x, t, y if conditional else None, **kwargs) if conditional or captioned \
                else router(x, t)  # (B, K)
        if logits.shape[-1] != self.num_experts:
            raise ConfigError(f"router gives {logits.shape[-1]} logits but {self.num_experts} experts were given")
        self._stats.router_nfe += x.shape[0]
        self._stats.gflops_per_sample += x.shape[0] * _flops(router) / 1e9
        logits = logits.to(x.dtype)
        if len(self.present) < self.num_experts:  # p(k | x_t, t, k present): the router renormalised over them
            absent = torch.ones(self.num_experts, dtype=torch.bool, device=logits.device)
            absent[self.present] = False
            logits = logits.masked_fill(absent, float("-inf"))
        p = torch.softmax(logits, dim=-1)  # (B, K)
        return expert_weights(p, self.strategy, generator)

    def _expert_velocity(self, k: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                         text: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        model = self.expert(k)
        dev = self.devices[k]
        xk, tk, yk = x.to(dev), t.to(dev), (y.to(dev) if y is not None else None)
        if text is not None:  # text-conditioned experts: the caption against the null caption (two passes)
            tokens, mask = text[0].to(dev), text[1].to(dev)
            guided = self.cfg_scale != 1.0
            with self._autocast(dev):
                v = model(xk, tk, yk, tokens, mask).to(self.dtype)
                if guided:
                    uncond = model(xk, tk, yk).to(self.dtype)  # text None: the model's null caption
                    v = uncond + self.cfg_scale * (v - uncond)
            return self._counted(k, model, x.shape[0] * (2 if guided else 1), v)
        guided = yk is not None and self.cfg_scale != 1.0
        with self._autocast(dev):
            if guided:
                if self.null_label is None:
                    raise ConfigError(f"cfg_scale={self.cfg_scale} needs the experts' null (unconditional) label")
                y_null = torch.full_like(yk, self.null_label)
                both = model(torch.cat([xk, xk]), torch.cat([tk, tk]), torch.cat([yk, y_null]))  # (2b, C, H, W)
                cond, uncond = both.to(self.dtype).chunk(2)
                v = uncond + self.cfg_scale * (cond - uncond)  # (b, C, H, W)
            else:
                v = model(xk, tk, yk)  # (b, C, H, W)
        return self._counted(k, model, x.shape[0] * (2 if guided else 1), v)

    def _counted(self, k: int, model: nn.Module, evals: int, v: torch.Tensor) -> torch.Tensor:
        """Account ``evals`` sample-evaluations of expert k (a guided pair counts 2); v on the sampler's device."""
        self._stats.nfe += evals
        self._stats.expert_calls[k] = self._stats.expert_calls.get(k, 0) + evals
        self._stats.gflops_per_sample += evals * _flops(model) / 1e9
        return v.to(self.device, self.dtype)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None,
                 text: tuple[torch.Tensor, torch.Tensor] | None = None,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        """u(x_t, t) = sum_k w_k u_k, evaluating each expert only on the samples that weight it. ``text``:
        (token embeddings (B, L, D), mask (B, L)) of the captions, for text-conditioned experts; ``pooled`` (B, D):
        their sentence embeddings, for a text-conditioned router."""
        w = self.weights(x, t, generator, y, pooled)  # (B, K)
        u = torch.zeros_like(x)
        shape = (-1, *([1] * (x.dim() - 1)))
        routed = w > 0  # (B, K)
        for k, n in enumerate(routed_counts(w)):  # one host sync per step, not one per expert
            if n == 0:
                continue
            if n == x.shape[0]:  # the whole batch: no gather/scatter copies
                u += w[:, k].view(shape) * self._expert_velocity(k, x, t, y, text)
                continue
            # the n routed sample ids, ascending (a stable sort puts them first): nonzero without another sync
            idx = torch.argsort(routed[:, k].to(torch.uint8), descending=True, stable=True)[:n]  # (n,)
            tk = (text[0][idx], text[1][idx]) if text is not None else None
            vk = self._expert_velocity(k, x[idx], t[idx], y[idx] if y is not None else None, tk)  # (b, C, H, W)
            u.index_add_(0, idx, w[idx, k].view(shape) * vk)
        return u

    # -- the ODE -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x1: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0,
               text: tuple[torch.Tensor, torch.Tensor] | None = None,
               pooled: torch.Tensor | None = None, experts: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate from x1 ~ N(0, I) at t=1 to t=0 with ``flow.ode_sample``; deterministic for (x1, y, text,
        seed) (the seed drives sample-K's and oracle's draws). ``experts`` (B,): for ``oracle``, each sample's
        expert where it is known (a training caption's own cluster); a missing one is drawn as without it."""
        x = x1.to(self.device, self.dtype)
        y = y.to(self.device) if y is not None else None
        text = (text[0].to(self.device), text[1].to(self.device)) if text is not None else None
        pooled = pooled.to(self.device) if pooled is not None else None
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if self.strategy.kind == "mixture":  # one expert per trajectory (the constructor checked the counts)
            assert self.mixture is not None
            drawn = mixture_assignment(self.mixture, y, x.shape[0], self.present, gen)  # (B,)
            if experts is not None:
                known = torch.isin(experts.cpu(), torch.tensor(self.present))  # (B,)
                drawn = torch.where(known, experts.cpu(), drawn)
            self._assigned = drawn.to(self.device)

        def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.velocity(x, t.to(self.dtype), y, gen, text, pooled)

        try:
            return cast(torch.Tensor, ode_sample(velocity_fn, x, self.steps, self.method))
        finally:
            self._assigned = None

    def stats(self, num_samples: int) -> SampleStats:
        """Accumulated costs so far divided by ``num_samples`` (the number of images drawn)."""
        n = max(num_samples, 1)
        s = self._stats
        return SampleStats(nfe=s.nfe / n, router_nfe=s.router_nfe / n, gflops_per_sample=s.gflops_per_sample / n,
                           expert_calls=dict(s.expert_calls))

    def reset_stats(self) -> None:
        self._stats = SampleStats()


def draw_noise(n: int, shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x1 ~ N(0, I) of shape (n, *shape), the same for a seed on any device (drawn on the CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=dtype)


NOISE_BLOCK = 1024  # samples per independently seeded block of noise


def noise_range(start: int, stop: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Samples [start, stop) of an endless, seeded stream of x1 ~ N(0, I): sample i is the same whatever range,
    batch size or number of ranks asks for it, and no process draws more than the blocks it needs."""
    out = []
    for block in range(start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)):
        lo, hi = max(start - block * NOISE_BLOCK, 0), min(stop - block * NOISE_BLOCK, NOISE_BLOCK)
        out.append(draw_noise(NOISE_BLOCK, shape, seed * 1_000_003 + block)[lo:hi])
    return torch.cat(out) if out else torch.zeros(0, *shape)


def labels_range(start: int, stop: int, num_classes: int, seed: int) -> torch.Tensor:
    """Uniform class labels for samples [start, stop), per sample as stable as ``noise_range``."""
    out = []
    for block in range(start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)):
        lo, hi = max(start - block * NOISE_BLOCK, 0), min(stop - block * NOISE_BLOCK, NOISE_BLOCK)
        gen = torch.Generator().manual_seed((seed + 1) * 1_000_003 + block)
        out.append(torch.randint(0, num_classes, (NOISE_BLOCK,), generator=gen)[lo:hi])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
