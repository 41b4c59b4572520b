"""Diffusion Transformer (Peebles & Xie 2023) predicting flow-matching velocity.

adaLN-Zero blocks, fused QKV, ``F.scaled_dot_product_attention`` (flash on CUDA), tanh-GELU MLP.
Imports only torch (the GPU benchmark machine has no pydantic): errors are imported lazily.

``t`` is the flow time in [0, 1] (0 = data, 1 = noise); it is scaled by 1000 before the sinusoidal embedding so
the frequencies match DiT's integer timesteps. Class conditioning uses ``num_classes + 1`` label rows: the last
one is the "null" class used for classifier-free guidance (``null_label``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiTSize:
    hidden: int
    depth: int
    heads: int
    patch: int


# Sizes as in the DiT paper (Table 1), plus tiny CPU presets for tests and demos.
DIT_PRESETS: dict[str, DiTSize] = {
    "DiT-S/2": DiTSize(384, 12, 6, 2),
    "DiT-S/4": DiTSize(384, 12, 6, 4),
    "DiT-B/2": DiTSize(768, 12, 12, 2),
    "DiT-B/4": DiTSize(768, 12, 12, 4),
    "DiT-L/2": DiTSize(1024, 24, 16, 2),
    "DiT-L/4": DiTSize(1024, 24, 16, 4),
    "DiT-XL/2": DiTSize(1152, 28, 16, 2),
    "DiT-XL/4": DiTSize(1152, 28, 16, 4),
    "DiT-T/2": DiTSize(128, 4, 4, 2),
    "DiT-T/4": DiTSize(128, 4, 4, 4),
    "DiT-N/4": DiTSize(64, 2, 2, 4),  # nano: unit tests only
}

FREQ_DIM = 256  # sinusoidal timestep features, as in DiT


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """Sinusoidal features of 1000 * t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused: one GEMM instead of three
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens (PixArt-alpha's cross-attention between self-attention and the MLP)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, D) image tokens, ctx: (B, L, D) text tokens, mask: (B, L) bool (True = a real token)."""
        B, T, D = x.shape
        L, H = ctx.shape[1], self.heads
        q = self.q(x).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, Dh)
        kv = self.kv(ctx).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (2, B, H, L, Dh)
        # a boolean mask keeps SDPA off its flash kernel; measured on an H100 (bench/cross_attention.py) it costs
        # 1.5% of a DiT-XL/2 block, and no masked alternative (additive bias, cuDNN, flex, the mask folded into
        # one more key dimension, the scores as plain matmuls with a compiled softmax: 5% slower) was faster
        attn_mask = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        # text-conditioned: x + CrossAttn(LN(x), text) after the self-attention (no adaLN on it, as PixArt-alpha)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cross else None
        self.cross = CrossAttention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None,
                ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x (B, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, T, D)
        if self.cross is not None and ctx is not None:
            x = x + self.cross(self.norm_cross(x), ctx, ctx_mask)  # type: ignore[misc]  # (B, T, D)
        h = F.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate="tanh")  # (B, T, 4D)
        return x + gate2.unsqueeze(1) * self.fc2(h)  # (B, T, D)


def run_blocks(model: nn.Module, h: torch.Tensor, c: torch.Tensor, *ctx: torch.Tensor | None) -> torch.Tensor:
    """``model.blocks`` in order; with ``model.activation_checkpointing`` (set by the trainer) each block's
    activations are recomputed in the backward pass instead of kept: memory of one block instead of all of them,
    for about one more forward of compute. With ``model.dynamic_batch`` (set by ``compile_blocks`` for sampling)
    the compiled blocks see the batch size as dynamic from their first call: routed strategies split every batch
    by the router's choice, so each expert call has a new size, and a block compiled for one static size first
    recompiled (~5 s on an H100) at the first routed step."""
    recompute = getattr(model, "activation_checkpointing", False) and model.training and torch.is_grad_enabled()
    # ``model.residual_dtype`` (set by the trainer, train.residual_precision bf16): under autocast the stream
    # between blocks is otherwise fp32 (the fp32 position embedding is added first), so every block reads, writes
    # and saves it at twice the bytes; cast once before the first block, and back after the last.
    stream_dtype, residual = h.dtype, getattr(model, "residual_dtype", None)
    if residual is not None and torch.is_autocast_enabled(h.device.type):
        h = h.to(residual)
    if getattr(model, "dynamic_batch", False):
        for t in (h, c, *ctx):
            if t is not None and t.shape[0] > 1:  # 0 and 1 stay specialised by dynamo anyway
                torch._dynamo.mark_dynamic(t, 0)
    for block in model.blocks:
        if recompute:
            h = torch.utils.checkpoint.checkpoint(block, h, c, *ctx, use_reentrant=False)
        else:
            h = block(h, c, *ctx)
    return h.to(stream_dtype)


def init_backbone(model: nn.Module) -> None:
    """DiT's initialisation, shared by the DiT and the router: xavier linears, zero adaLN modulation (every block
    and the final layer start as the identity), small timestep-MLP weights. Needs ``patch_embed``, ``t_embed``,
    ``blocks`` and ``final_adaLN`` on the model."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.patch_embed.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.bias)
    nn.init.normal_(model.t_embed[0].weight, std=0.02)
    nn.init.normal_(model.t_embed[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN[-1].weight)
        nn.init.zeros_(block.adaLN[-1].bias)
        if getattr(block, "cross", None) is not None:  # text enters through a zero path: blocks start as identity
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)
    nn.init.zeros_(model.final_adaLN[-1].weight)
    nn.init.zeros_(model.final_adaLN[-1].bias)


class DiT(nn.Module):
    def __init__(self, image_size: int, channels: int, size: DiTSize, num_classes: int | None = None,
                 learn_sigma: bool = False, text_dim: int | None = None, text_tokens: int = 16):
        super().__init__()
        self.image_size, self.channels, self.size = image_size, channels, size
        self.num_classes = num_classes
        self.text_dim, self.text_tokens = text_dim, text_tokens  # text_tokens: for forward_flops only
        self.out_channels = channels * 2 if learn_sigma else channels
        p, D = size.patch, size.hidden
        self.grid = image_size // p
        self.num_tokens = self.grid * self.grid
        self.patch_embed = nn.Conv2d(channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(D, self.grid), persistent=False)  # (1, T, D)
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(num_classes + 1, D) if num_classes else None  # last row: null class
        # Text: the encoder's token embeddings, projected to the model width (PixArt-alpha's caption projection);
        # ``null_text`` stands for "no caption" (caption dropout in training, the unconditional branch of CFG).
        self.text_proj = nn.Sequential(nn.Linear(text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D)) \
            if text_dim else None
        self.null_text = nn.Parameter(torch.zeros(1, 1, text_dim)) if text_dim else None
        self.blocks = nn.ModuleList([Block(D, size.heads, cross=bool(text_dim)) for _ in range(size.depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, p * p * self.out_channels)
        self._init_weights()

    @property
    def null_label(self) -> int:
        """Label index meaning "no class" (classifier-free guidance)."""
        if not self.num_classes:
            from ..errors import ConfigError

            raise ConfigError("this DiT is unconditional (num_classes=None): it has no null label")
        return self.num_classes

    def _init_weights(self) -> None:
        init_backbone(self)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        if self.null_text is not None:
            nn.init.normal_(self.null_text, std=0.02)
        nn.init.zeros_(self.final_linear.weight)  # the output starts at zero velocity
        nn.init.zeros_(self.final_linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, p, g, C = x.shape[0], self.size.patch, self.grid, self.out_channels
        x = x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(B, C, g * p, g * p)

    def null_text_like(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (B, 1, text_dim), mask (B, 1)) meaning "no caption"."""
        if self.null_text is None:
            from ..errors import ConfigError

            raise ConfigError("this DiT is not text-conditioned (text_dim=None)")
        null = self.null_text.expand(batch, 1, -1)
        return null, torch.ones(batch, 1, dtype=torch.bool, device=null.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                text_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) long or None, text: (B, L, text_dim) token embeddings of
        the captions (None: the null caption) with text_mask (B, L) bool; text_drop (B,) bool: these samples get
        the null caption (caption dropout) -> velocity (B, C_out, H, W)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embed(timestep_features(t).to(h.dtype))  # (B, D)
        if self.y_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes or 0, device=x.device, dtype=torch.long)
            c = c + self.y_embed(y)  # (B, D)
        if self.text_proj is not None:
            if text is None:
                text, text_mask = self.null_text_like(x.shape[0])
            elif text_drop is not None:  # L copies of the null token attend exactly as one null token
                null = self.null_text.to(text.dtype).expand(text.shape[0], text.shape[1], -1)  # type: ignore[union-attr]
                text = torch.where(text_drop[:, None, None], null, text)
                if text_mask is not None:  # no mask stays no mask: the unmasked attention runs the flash kernel
                    text_mask = text_drop[:, None] | text_mask
            ctx = self.text_proj(text.to(h.dtype))  # (B, L, D)
            h = run_blocks(self, h, c, ctx, text_mask)
        elif text is not None:
            raise ValueError("this DiT is not text-conditioned (text_dim=None): it takes no text")
        else:
            h = run_blocks(self, h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)  # 2 x (B, D)
        h = self.final_linear(modulate(self.final_norm(h), shift, scale))  # (B, T, p*p*C_out)
        return self.unpatchify(h)  # (B, C_out, H, W)

    def forward_flops(self, batch: int = 1) -> int:
        """Analytic forward FLOPs (a multiply-add counts 2): every matmul, attention scores and values included."""
        D, L, p = self.size.hidden, self.size.depth, self.size.patch
        T = self.num_tokens
        per_image = 2 * T * (self.channels * p * p) * D  # patch embedding
        per_image += 2 * (FREQ_DIM * D + D * D)  # timestep MLP
        per_block = 2 * T * D * 3 * D  # fused qkv
        per_block += 2 * 2 * T * T * D  # q @ k^T and attn @ v
        per_block += 2 * T * D * D  # output projection
        per_block += 2 * 2 * T * D * 4 * D  # MLP
        per_block += 2 * D * 6 * D  # adaLN modulation
        if self.text_dim:  # cross-attention over text_tokens text tokens: q, kv, scores and values, projection
            S = self.text_tokens
            per_block += 2 * T * D * D + 2 * S * D * 2 * D + 2 * 2 * T * S * D + 2 * T * D * D
            per_image += 2 * S * (self.text_dim * D + D * D)  # caption projection
        per_image += L * per_block
        per_image += 2 * D * 2 * D + 2 * T * D * p * p * self.out_channels  # final layer
        return batch * per_image


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding: (1, grid*grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]  # (T, d/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (T, d)

    emb = torch.cat([one_axis(gy, dim // 2), one_axis(gx, dim // 2)], dim=1)  # (T, dim)
    return emb.float().unsqueeze(0)


def build_dit(preset: str, image_size: int, channels: int, num_classes: int | None = None,
              learn_sigma: bool = False, text_dim: int | None = None, text_tokens: int = 16) -> DiT:
    """A DiT from a preset name; the image side must be a multiple of the patch size."""
    from ..errors import ConfigError

    if preset not in DIT_PRESETS:
        raise ConfigError(f"unknown DiT preset {preset!r} (choose from {', '.join(DIT_PRESETS)})")
    size = DIT_PRESETS[preset]
    if image_size % size.patch:
        raise ConfigError(f"image_size {image_size} is not a multiple of {preset}'s patch size {size.patch}")
    if size.hidden % size.heads or (size.hidden // 2) % 2:
        raise ConfigError(f"{preset}: hidden size {size.hidden} does not split into {size.heads} heads")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 or None, got {num_classes}")
    if text_dim is not None and text_dim < 1:
        raise ConfigError(f"text_dim must be >= 1 or None, got {text_dim}")
    return DiT(image_size, channels, size, num_classes=num_classes, learn_sigma=learn_sigma, text_dim=text_dim,
               text_tokens=text_tokens)
