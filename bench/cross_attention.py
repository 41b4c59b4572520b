"""Where a text-conditioned DiT block's time goes: the cross-attention's masked attention under each kernel, and
one whole block (compiled, forward + backward) with and without cross-attention, against its analytic FLOPs.

Why: DiT-XL/2 with cross-attention to 77 caption tokens ran at 43.5% MFU against 47.7% without text (H100,
BENCHMARKS.md), while the cross-attention adds ~17% FLOPs that are all large matmuls. The suspect is the caption
mask (True = a real token), which keeps ``scaled_dot_product_attention`` off its flash kernel.

    python bench/cross_attention.py --out /tmp/cross_attention.json   # on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from ddm_trainer.models.dit import Block  # noqa: E402


def timed(fn: Callable[[], Any], steps: int) -> float:
    """Seconds per call of ``fn`` (3 warm-up calls, then ``steps`` timed ones, CUDA synchronised)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def caption_mask(batch: int, tokens: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """(B, L) bool: captions of 5..L real tokens, the rest padding (as CLIP's tokenizer pads to 77)."""
    lengths = torch.randint(5, tokens + 1, (batch,), generator=gen, device="cpu").to(device)  # (B,)
    return torch.arange(tokens, device=device)[None, :] < lengths[:, None]  # (B, L)


def attention_variants(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The attention core alone (q: (B, H, T, Dh), k, v: (B, H, L, Dh)), forward + backward, per kernel/mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, L, Dh = args.batch, args.heads, args.tokens, args.text_tokens, args.dim // args.heads
    gen = torch.Generator().manual_seed(0)
    mask = caption_mask(B, L, device, gen)  # (B, L)
    q = torch.randn(B, H, T, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H, L, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, H, L, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(B, 1, 1, L, device=device, dtype=torch.bfloat16).masked_fill(~mask[:, None, None, :], float("-inf"))
    pad = (-L) % 8  # padded keys: a multiple of 8 keeps the mem-efficient kernel's bias aligned without a copy
    kp, vp = (F.pad(t.detach(), (0, 0, 0, pad)).requires_grad_() for t in (k, v))
    maskp = F.pad(mask, (0, pad), value=False)

    def sdpa(kk: torch.Tensor, vv: torch.Tensor, m: torch.Tensor | None, backend: Any = None) -> Callable[[], Any]:
        def run() -> None:
            if backend is None:
                out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)
            else:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)
            out.sum().backward()
        return run

    def folded() -> None:
        """The mask as one more key dimension: a constant 1 in every query against 0 (real) or a huge negative
        (padding) in every key, zeros up to a multiple of 8, so the unmasked (flash) kernel runs it."""
        extra = 8 - Dh % 8
        bias_k = torch.zeros(B, L, dtype=k.dtype, device=device).masked_fill(~mask, torch.finfo(k.dtype).min / 2)
        q1 = torch.cat([q, q.new_ones(B, H, T, 1), q.new_zeros(B, H, T, extra - 1)], dim=-1)
        k1 = torch.cat([k, bias_k[:, None, :, None].expand(B, H, L, 1), k.new_zeros(B, H, L, extra - 1)], dim=-1)
        out = F.scaled_dot_product_attention(q1, k1, F.pad(v, (0, extra)), scale=Dh ** -0.5)[..., :Dh]
        out.sum().backward()

    variants: dict[str, Callable[[], Any]] = {
        "mask folded into the keys (flash)": folded,
        "no mask (default kernel)": sdpa(k, v, None),
        "bool mask (B,1,1,L)": sdpa(k, v, mask[:, None, None, :]),
        "additive bias (B,1,1,L)": sdpa(k, v, bias),
        f"bool mask, keys padded to {L + pad}": sdpa(kp, vp, maskp[:, None, None, :]),
        "bool mask, efficient kernel": sdpa(k, v, mask[:, None, None, :], SDPBackend.EFFICIENT_ATTENTION),
        "bool mask, cuDNN kernel": sdpa(k, v, mask[:, None, None, :], SDPBackend.CUDNN_ATTENTION),
        "bool mask, math kernel": sdpa(k, v, mask[:, None, None, :], SDPBackend.MATH),
    }

    def explicit_attention(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The scores as one batched matmul (the scale on q, so inductor's attention pattern matcher leaves it as
        matmuls), mask + softmax fused by the compiler, a second matmul: (B, H, T, Dh)."""
        scores = torch.matmul(qq * Dh ** -0.5, kk.transpose(-2, -1)).masked_fill(~m[:, None, None, :], float("-inf"))
        return torch.matmul(scores.float().softmax(dim=-1).to(vv.dtype), vv)

    explicit = torch.compile(explicit_attention)

    def run_explicit() -> None:
        explicit(q, k, v, mask).sum().backward()
    variants["explicit matmul + softmax (compiled)"] = run_explicit
    try:  # FlexAttention: a key-padding block mask, compiled
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        lengths = mask.sum(1)  # (B,)
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], B, None, T, L, device=str(device))
        flex = torch.compile(flex_attention)

        def run_flex() -> None:
            flex(q, k, v, block_mask=block_mask).sum().backward()
        variants["flex_attention, key-padding block mask"] = run_flex
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        print(f"flex_attention unavailable: {type(e).__name__}: {e}", flush=True)
    records = []
    for name, fn in variants.items():
        try:
            ms = timed(fn, args.steps) * 1e3
            records.append({"variant": name, "ms": ms})
            print(f"attention  {name:42s} {ms:8.3f} ms fwd+bwd", flush=True)
        except Exception as e:  # noqa: BLE001 - a kernel that refuses these shapes is a finding, not a failure
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            records.append({"variant": name, "error": f"{type(e).__name__}: {first}"})
            print(f"attention  {name:42s} refused: {type(e).__name__}: {first}", flush=True)
    return records


def block_flops(args: argparse.Namespace, cross: bool) -> int:
    """Forward FLOPs of one block for the batch (the same count as ``DiT.forward_flops``)."""
    T, D, S = args.tokens, args.dim, args.text_tokens
    f = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D + 2 * D * 6 * D
    if cross:
        f += 2 * T * D * D + 2 * S * D * 2 * D + 2 * 2 * T * S * D + 2 * T * D * D
    return args.batch * f


def block_variants(args: argparse.Namespace, device: torch.device, peak: float) -> list[dict[str, Any]]:
    """One compiled block, forward + backward under bf16 autocast, as the trainer runs each of DiT-XL/2's 28."""
    B, T, D, L = args.batch, args.tokens, args.dim, args.text_tokens
    gen = torch.Generator().manual_seed(0)
    mask = caption_mask(B, L, device, gen)
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    c = torch.randn(B, D, device=device)
    ctx = torch.randn(B, L, D, device=device)
    cases = [("self-attention + MLP (no text)", False, None, None),
             ("+ cross-attention, no mask", True, ctx, None),
             ("+ cross-attention, caption mask", True, ctx, mask)]
    records = []
    for name, cross, cx, m in cases:
        block = Block(D, args.heads, cross=cross).to(device)
        block.compile()

        def run() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = block(x, c, cx, m)
            out.float().sum().backward()
        ms = timed(run, args.steps) * 1e3
        flops = 3 * block_flops(args, cross)  # forward + backward = 3 forwards
        tflops = flops / (ms / 1e3) / 1e12
        records.append({"variant": name, "ms": ms, "tflops": tflops, "mfu": tflops / peak if peak else None})
        print(f"block      {name:42s} {ms:8.3f} ms fwd+bwd  {tflops:6.1f} TFLOP/s"
              + (f"  {100 * tflops / peak:.1f}% of the matmul peak" if peak else ""), flush=True)
        del block
    return records


def matmul_peak(device: torch.device) -> float:
    """bf16 matmul TFLOP/s measured here (8192^3), the MFU reference."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    s = timed(lambda: a @ b, 20)
    return 2 * 8192**3 / s / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (32x32x4 latents, patch 2: 256)")
    parser.add_argument("--dim", type=int, default=1152, help="hidden width (DiT-XL: 1152)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cross_attention.py measures CUDA kernels: run it on the GPU machine")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {peak:.1f} TFLOP/s; B={args.batch} T={args.tokens} "
          f"D={args.dim} H={args.heads} L={args.text_tokens}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "matmul_tflops": peak, "args": vars(args) | {"out": None},
              "attention": attention_variants(args, device), "block": block_variants(args, device, peak)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
