"""The router: a transformer classifier p(k | x_t, t[, y]) over noisy images, built from DiT's blocks.

Patch embedding + fixed 2-D sin-cos positions, a learned classification token prepended to the patches, the flow
time (and, for class-conditional experts, the class label) conditioning every block through adaLN-Zero (as in
DiT), and a linear head on the final classification token giving K logits. A conditional router has
``num_classes + 1`` label rows, the last one the null label: trained with label dropout, the same network gives
p(k | x_t, t, y) and the marginal p(k | x_t, t). Without the label, near pure noise the router can only guess the
largest cluster, and sends a class to experts that never saw it. A text-conditioned router (``text_dim``) gets
the caption's pooled embedding the same way, through an MLP added to the time embedding, with a learned null
caption: p(k | x_t, t, c). Imports only torch (the GPU benchmark machine has
no pydantic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dit import FREQ_DIM, Block, DiTSize, init_backbone, modulate, run_blocks, sincos_2d, timestep_features


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to rebuild a router: stored in its final weights' config as ``model``."""

    preset: str
    image_size: int
    channels: int
    num_clusters: int
    num_classes: int | None = None  # class-conditional: p(k | x_t, t, y)
    text_dim: int | None = None  # caption-conditional: p(k | x_t, t, c), c the pooled caption embedding

    def as_dict(self) -> dict[str, object]:
        return {"arch": "router", "preset": self.preset, "image_size": self.image_size, "channels": self.channels,
                "num_clusters": self.num_clusters, "num_classes": self.num_classes, "text_dim": self.text_dim}


# Router-B/2 has DiT-B/2's backbone; T and N are CPU sizes for tests and demos.
ROUTER_PRESETS: dict[str, DiTSize] = {
    "Router-B/2": DiTSize(768, 12, 12, 2),
    "Router-B/4": DiTSize(768, 12, 12, 4),
    "Router-S/2": DiTSize(384, 12, 6, 2),
    "Router-S/4": DiTSize(384, 12, 6, 4),
    "Router-T/2": DiTSize(128, 4, 4, 2),
    "Router-T/4": DiTSize(128, 4, 4, 4),
    "Router-N/4": DiTSize(64, 2, 2, 4),  # nano: unit tests only
}


class Router(nn.Module):
    def __init__(self, image_size: int, channels: int, size: DiTSize, num_clusters: int,
                 num_classes: int | None = None, text_dim: int | None = None):
        super().__init__()
        self.image_size, self.channels, self.size, self.num_clusters = image_size, channels, size, num_clusters
        self.num_classes, self.text_dim = num_classes, text_dim
        p, D = size.patch, size.hidden
        self.grid = image_size // p
        self.num_tokens = self.grid * self.grid + 1  # patches + the classification token
        self.patch_embed = nn.Conv2d(channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(D, self.grid), persistent=False)  # (1, T-1, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(num_classes + 1, D) if num_classes else None  # last row: the null label
        self.text_embed = nn.Sequential(nn.Linear(text_dim, D), nn.SiLU(), nn.Linear(D, D)) if text_dim else None
        self.null_text = nn.Parameter(torch.zeros(1, text_dim)) if text_dim else None  # "no caption"
        self.blocks = nn.ModuleList([Block(D, size.heads) for _ in range(size.depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.head = nn.Linear(D, num_clusters)
        self._init_weights()

    def _init_weights(self) -> None:
        init_backbone(self)  # DiT's scheme: every block starts as the identity
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)  # small: initial logits are ~uniform
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        if self.null_text is not None:
            nn.init.normal_(self.null_text, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy images x_t, t: (B,) in [0, 1], y: (B,) class labels (a conditional router; None or
        ``num_classes`` = the null label: the marginal over classes), text: (B, text_dim) pooled caption
        embeddings (a text-conditioned router; None: the null caption), text_drop: (B,) bool, these samples get the
        null caption -> logits (B, K)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T-1, D)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)  # (B, T, D)
        c = self.t_embed(timestep_features(t).to(h.dtype))  # (B, D)
        if self.y_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), int(self.num_classes or 0), dtype=torch.long, device=x.device)
            c = c + self.y_embed(y).to(c.dtype)
        elif y is not None:
            raise ValueError("this router is unconditional (num_classes=None): it takes no labels")
        if self.text_embed is not None and self.null_text is not None:
            null = self.null_text.expand(x.shape[0], -1)  # (B, text_dim)
            if text is None:
                text = null
            elif text_drop is not None:
                text = torch.where(text_drop[:, None], null.to(text.dtype), text)
            c = c + self.text_embed(text.to(c.dtype))
        elif text is not None:
            raise ValueError("this router is not text-conditioned (text_dim=None): it takes no caption")
        h = run_blocks(self, h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)  # 2 x (B, D)
        cls = modulate(self.final_norm(h[:, :1]), shift, scale)[:, 0]  # (B, D)
        return self.head(cls)  # (B, K)

    def forward_flops(self, batch: int = 1) -> int:
        """Analytic forward FLOPs (a multiply-add counts 2), as DiT.forward_flops."""
        D, L, p = self.size.hidden, self.size.depth, self.size.patch
        T = self.num_tokens
        per_image = 2 * (T - 1) * (self.channels * p * p) * D  # patch embedding
        per_image += 2 * (FREQ_DIM * D + D * D)  # timestep MLP
        per_block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D + 2 * D * 6 * D
        per_image += L * per_block
        if self.text_dim:  # the caption MLP
            per_image += 2 * (self.text_dim * D + D * D)
        per_image += 2 * D * 2 * D + 2 * D * self.num_clusters  # final adaLN + head
        return batch * per_image


def build_router(preset: str, image_size: int, channels: int, num_clusters: int,
                 num_classes: int | None = None, text_dim: int | None = None) -> Router:
    from ..errors import ConfigError

    if preset not in ROUTER_PRESETS:
        raise ConfigError(f"unknown router preset {preset!r} (choose from {', '.join(ROUTER_PRESETS)})")
    size = ROUTER_PRESETS[preset]
    if image_size % size.patch:
        raise ConfigError(f"image_size {image_size} is not a multiple of {preset}'s patch size {size.patch}")
    if num_clusters < 2:
        raise ConfigError(f"a router needs num_clusters >= 2, got {num_clusters}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"a conditional router needs num_classes >= 1, got {num_classes}")
    if text_dim is not None and text_dim < 1:
        raise ConfigError(f"a text-conditioned router needs text_dim >= 1, got {text_dim}")
    return Router(image_size, channels, size, num_clusters, num_classes, text_dim)


def build_router_from_spec(spec: RouterSpec) -> Router:
    return build_router(spec.preset, spec.image_size, spec.channels, spec.num_clusters, spec.num_classes,
                        spec.text_dim)
