"""How router probabilities become per-expert weights: the DDM combination strategies, as pure tensor functions.

``parse_strategy("top-2")`` gives a ``Strategy``; ``expert_weights(p, strategy, generator)`` maps router
probabilities p (B, K) to weights w (B, K) whose rows sum to 1; ``routed_counts(w)`` gives how many samples
of the batch each expert gets, so only the experts some sample uses are evaluated.

Strategy strings: ``full`` | ``top1`` / ``top-1`` | ``top-K`` | ``sample-K[@T]`` | ``nucleus-P[@T]`` | ``oracle``
| ``oracle-C``, where K is an expert count, P a probability mass in (0, 1], T a temperature > 0 (default 1), C a
cluster index. ``oracle`` needs no router: each sample's expert is drawn once from the data's own p(k | y) (the
clusters' class counts; p(k), the cluster sizes, without classes; a training caption's own cluster where the sampler
is told it) and kept for the whole trajectory, which samples the mixture p(x) = sum_k p(k) p(x | k) the experts were
trained to split, as a perfect router would. ``oracle-C`` asks expert C alone.
No pydantic (the GPU benchmark machine has only torch) and no torch at import time: stage configs, which the
operator validates without torch, parse strategies with it; torch is imported inside the tensor functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

Kind = Literal["full", "top", "sample", "nucleus", "oracle", "mixture"]
STRATEGY_HELP = "full, top1, top-K, sample-K[@T], nucleus-P[@T], oracle, oracle-C"
_PATTERN = re.compile(
    r"^(?:(?P<full>full)|top-?(?P<top>\d+)|sample-(?P<sample>\d+)|nucleus-(?P<nucleus>[0-9.]+)"
    r"|(?P<mixture>oracle)|oracle-(?P<oracle>\d+))"
    r"(?:@(?P<temperature>[0-9.]+))?$"
)


@dataclass(frozen=True)
class Strategy:
    """One combination rule. ``k``: experts kept (top/sample); ``mass``: nucleus threshold; ``cluster``: oracle-C.
    Kind ``mixture`` is ``oracle``: one expert per sample drawn from the data's p(k | y) (``mixture_assignment``)."""

    kind: Kind
    k: int = 1
    mass: float = 1.0
    temperature: float = 1.0
    cluster: int = 0

    @property
    def name(self) -> str:
        """Canonical string; parse_strategy(s.name) == s. Also used as a directory name."""
        temp = "" if self.temperature == 1.0 else f"@{self.temperature:g}"
        if self.kind == "full":
            return "full"
        if self.kind == "top":
            return f"top{self.k}" if self.k == 1 else f"top-{self.k}"
        if self.kind == "sample":
            return f"sample-{self.k}{temp}"
        if self.kind == "nucleus":
            return f"nucleus-{self.mass:g}{temp}"
        if self.kind == "mixture":
            return "oracle"
        return f"oracle-{self.cluster}"

    @property
    def needs_router(self) -> bool:
        return self.kind not in ("oracle", "mixture")

    def check(self, num_experts: int) -> None:
        """Fail before sampling when the strategy cannot apply to ``num_experts`` experts."""
        if self.kind in ("top", "sample") and self.k > num_experts:
            raise ConfigError(f"strategy {self.name!r} keeps {self.k} experts but the run has only {num_experts}")
        if self.kind == "oracle" and self.cluster >= num_experts:
            raise ConfigError(f"strategy {self.name!r} names cluster {self.cluster} but the run has {num_experts} experts")


def parse_strategy(text: str | Strategy) -> Strategy:
    """``"top-2"`` -> Strategy(kind="top", k=2); anything unknown -> ConfigError naming it."""
    if isinstance(text, Strategy):
        return text
    m = _PATTERN.match(str(text).strip().lower())
    if m is None:
        raise ConfigError(f"unknown strategy {text!r} (choose from {STRATEGY_HELP})")
    temperature = float(m["temperature"]) if m["temperature"] else 1.0
    if temperature <= 0:
        raise ConfigError(f"strategy {text!r}: temperature must be > 0")
    if m["temperature"] and not (m["sample"] or m["nucleus"]):
        raise ConfigError(f"strategy {text!r}: a temperature applies only to sample-K and nucleus-P")
    if m["full"]:
        return Strategy("full")
    if m["top"]:
        k = int(m["top"])
        if k < 1:
            raise ConfigError(f"strategy {text!r}: K must be >= 1")
        return Strategy("top", k=k)
    if m["sample"]:
        k = int(m["sample"])
        if k < 1:
            raise ConfigError(f"strategy {text!r}: K must be >= 1")
        return Strategy("sample", k=k, temperature=temperature)
    if m["nucleus"]:
        try:
            mass = float(m["nucleus"])
        except ValueError:
            raise ConfigError(f"strategy {text!r}: nucleus mass is not a number") from None
        if not 0 < mass <= 1:
            raise ConfigError(f"strategy {text!r}: nucleus mass must be in (0, 1]")
        return Strategy("nucleus", mass=mass, temperature=temperature)
    if m["mixture"]:
        return Strategy("mixture")
    return Strategy("oracle", cluster=int(m["oracle"]))


def _sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised per row; T=1 is the identity."""
    if temperature == 1.0:
        return p
    q = p.clamp_min(0).pow(1.0 / temperature)  # (B, K)
    return q / q.sum(dim=1, keepdim=True)


def _renormalise_on(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """p restricted to ``keep`` (bool (B, K)), rows summing to 1; a row whose kept mass underflowed is uniform on it."""
    import torch

    w = torch.where(keep, p, torch.zeros_like(p))  # (B, K)
    total = w.sum(dim=1, keepdim=True)  # (B, 1)
    uniform = keep.to(p.dtype) / keep.sum(dim=1, keepdim=True).to(p.dtype)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(p.dtype).tiny), uniform)


def top_k_weights(p: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    idx = p.topk(k, dim=1).indices  # (B, k)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
    return _renormalise_on(p, keep)


def sample_k_weights(p: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Draw k distinct experts per row with probability ∝ p^(1/T); weights are p renormalised over the draw."""
    import torch

    q = _sharpen(p, temperature).clamp_min(1e-30)  # zeros would make multinomial refuse k > nonzero count
    gen_device = generator.device if generator is not None else q.device
    idx = torch.multinomial(q.to(gen_device), k, replacement=False, generator=generator).to(p.device)  # (B, k)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
    return _renormalise_on(p, keep)


def nucleus_weights(p: torch.Tensor, mass: float, temperature: float) -> torch.Tensor:
    """The smallest set of experts (largest first) whose sharpened mass reaches ``mass``, renormalised."""
    import torch

    q = _sharpen(p, temperature)  # (B, K)
    sorted_q, order = q.sort(dim=1, descending=True)
    mass_before = sorted_q.cumsum(dim=1) - sorted_q  # (B, K): mass of strictly larger experts
    keep_sorted = mass_before < mass - 1e-12  # the first one always qualifies (mass_before = 0 < mass)
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return _renormalise_on(q, keep)


def oracle_weights(batch: int, num_experts: int, cluster: int, like: torch.Tensor | None = None) -> torch.Tensor:
    import torch

    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else None
    w = torch.zeros(batch, num_experts, dtype=dtype, device=device)
    w[:, cluster] = 1.0
    return w


def mixture_assignment(counts: torch.Tensor, y: torch.Tensor | None, batch: int, present: list[int],
                       generator: torch.Generator | None) -> torch.Tensor:
    """``oracle``'s experts, one per sample ((batch,) long, on the CPU), drawn from p(k | y_i) ∝ counts[k, y_i]
    (counts (K, C): the clusters' class counts) or from p(k) ∝ the cluster sizes (counts (K,), or y None), over the
    ``present`` experts. A class none of them holds falls back to p(k) over them."""
    import torch

    counts = counts.to(torch.float64)
    sizes = counts if counts.dim() == 1 else counts.sum(dim=1)  # (K,)
    keep = torch.zeros_like(sizes, dtype=torch.bool)
    keep[present] = True
    sizes = torch.where(keep, sizes, torch.zeros_like(sizes))
    if float(sizes.sum()) <= 0:
        raise ConfigError("strategy 'oracle': the present experts' clusters hold no samples")
    if y is None or counts.dim() == 1:
        probs = sizes.expand(batch, -1)  # (B, K)
    else:
        if int(y.max()) >= counts.shape[1]:
            raise ConfigError(f"strategy 'oracle': label {int(y.max())} is outside the clusters' "
                              f"{counts.shape[1]} classes")
        probs = torch.where(keep, counts[:, y.cpu()].T, torch.zeros((), dtype=counts.dtype))  # (B, K)
        empty = probs.sum(dim=1) <= 0
        probs = torch.where(empty[:, None], sizes.expand_as(probs), probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


def expert_weights(p: torch.Tensor, strategy: Strategy, generator: torch.Generator | None = None) -> torch.Tensor:
    """Router probabilities p (B, K) -> expert weights w (B, K), rows summing to 1."""
    if strategy.kind == "mixture":
        raise ConfigError("strategy 'oracle' draws its experts per sample (mixture_assignment), not from a router")
    if p.dim() != 2:
        raise ValueError(f"router probabilities must be (B, K), got shape {tuple(p.shape)}")
    if strategy.kind == "full":
        return p / p.sum(dim=1, keepdim=True)
    if strategy.kind == "top":
        return top_k_weights(p, strategy.k)
    if strategy.kind == "sample":
        return sample_k_weights(p, strategy.k, strategy.temperature, generator)
    if strategy.kind == "nucleus":
        return nucleus_weights(p, strategy.mass, strategy.temperature)
    return oracle_weights(p.shape[0], p.shape[1], strategy.cluster, like=p)


def routed_counts(w: torch.Tensor) -> list[int]:
    """Samples of the batch with a nonzero weight on each expert, (K,) on the host: one device sync for the whole
    split (the sampler sizes every expert's batch from it instead of syncing on a nonzero per expert)."""
    return [int(n) for n in (w > 0).sum(dim=0).tolist()]
