"""Expert training throughput (images/s) and MFU of DiT presets at 32x32x3, batch 256, bf16 autocast, torch.compile.

One training step is what ``ddm_trainer.train_loop.Trainer`` does: flow-matching loss on random data, backward,
grad-norm clip, fused AdamW, EMA lerp; no host syncs inside the timed loop.
MFU = 3 * forward FLOPs per image (``DiT.forward_flops``, analytic) * images/s / the bf16 dense matmul rate
measured in the same process (8192^3 products). Imports only torch and ddm_trainer's torch-only modules.

    python bench/expert_throughput.py                                   # CUDA: DiT-S/2, DiT-B/2, DiT-XL/2
    python bench/expert_throughput.py --device cpu --presets DiT-T/4 --batch 8 --steps 2 --compile none
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))  # works without installing the project

import torch  # noqa: E402

from ddm_trainer.flow import flow_loss  # noqa: E402
from ddm_trainer.models.dit import build_dit  # noqa: E402
from ddm_trainer.train_loop import compile_model as trainer_compile  # noqa: E402

OUT = ROOT / "bench" / "results" / "expert_throughput.json"
TARGET_MFU = {"DiT-XL/2": 0.50, "DiT-B/2": 0.45}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({torch.get_num_threads()} threads), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int, reps: int = 10) -> float:
    """Dense bf16 (fp32 on CPU) matmul FLOP/s on random n x n x n products: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def compile_model(model: torch.nn.Module, how: str, mode: str | None,
                  coordinate_descent: bool = False) -> torch.nn.Module:
    """``regional``: the trainer's own compile (one compiled block reused by every identical block); otherwise the
    whole model (``full``), which the trainer does not offer, for comparison."""
    if how == "none":
        return model
    if how == "regional":
        return trainer_compile(model, model, mode or "default", coordinate_descent=coordinate_descent)
    if coordinate_descent:  # read by inductor when it compiles (the first step)
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    return torch.compile(model, mode=mode)  # type: ignore[return-value]


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    text_dim = args.text_dim or None  # text-to-image experts: cross-attention to text_tokens caption tokens
    model = build_dit(preset, args.image_size, args.channels, num_classes=None if text_dim else 10,
                      text_dim=text_dim, text_tokens=args.text_tokens).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    if args.residual == "bf16":  # the trainer's train.residual_precision bf16 (read by models.dit.run_blocks)
        model.residual_dtype = torch.bfloat16
    train_model = compile_model(model, args.compile, args.compile_mode, args.coordinate_descent)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)  # (B, C, H, W)
    y = None if text_dim else torch.randint(0, 10, (args.batch,), device=device)  # (B,)
    text = None
    if text_dim:  # (B, L, D) caption tokens and their mask: every token real, or captions of 5..L tokens + padding
        lengths = (torch.full((args.batch,), args.text_tokens) if args.text_mask == "full"
                   else torch.randint(5, args.text_tokens + 1, (args.batch,), generator=torch.Generator().manual_seed(0)))
        text = (torch.randn(args.batch, args.text_tokens, text_dim, device=device),
                (torch.arange(args.text_tokens)[None, :] < lengths[:, None]).to(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> torch.Tensor:
        if args.compile_mode == "reduce-overhead":  # CUDA graphs: a new iteration (as the trainer marks it)
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = flow_loss(train_model, x0, y, gen, "logit_normal", label_dropout=0.0 if text_dim else 0.1,
                             text=text, caption_dropout=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1e-4)
        return loss.detach()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync(device)
    elapsed = time.perf_counter() - start
    if not all(math.isfinite(v) for v in torch.stack(losses).tolist()):
        raise RuntimeError(f"{preset}: non-finite loss in the benchmark")
    ips = args.batch * args.steps / elapsed
    flops = model.forward_flops(1)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del model, ema, opt, train_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"preset": preset, "images_per_s": ips, "step_s": elapsed / args.steps, "fwd_gflops": flops / 1e9,
            "warmup_s": warmup_s, "peak_mem_gib": peak_mem}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This benchmark's options; bench/stage_throughput.py takes its model-only settings from here too."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="DiT-S/2,DiT-B/2,DiT-XL/2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3, help="4: SD-VAE latents (32x32x4 for 256 px images)")
    parser.add_argument("--text-dim", type=int, default=0,
                        help="text-to-image experts: cross-attention to captions of this width (768: CLIP ViT-L/14)")
    parser.add_argument("--text-tokens", type=int, default=77, help="caption tokens per image with --text-dim")
    parser.add_argument("--text-mask", choices=("full", "captions"), default="full",
                        help="full: every caption token real; captions: 5..text-tokens real tokens, the rest padding "
                             "masked out (as CLIP's tokenizer pads to 77)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation happens here)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", choices=["none", "regional", "full"], default="regional")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--residual", choices=("fp32", "bf16"), default="fp32",
                        help="the residual stream between blocks under autocast (the trainer's train.residual_precision, "
                             "experts.residualPrecision in the spec): fp32 (the default) or bf16")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="inductor's coordinate-descent tuning of its own kernels' block sizes (pointwise, norms, "
                             "reductions; the GEMMs stay cuBLAS's), as train.coordinate_descent_tuning "
                             "(experts.coordinateDescentTuning) sets it")
    parser.add_argument("--sdpa", choices=("default", "flash", "cudnn", "efficient"), default="default",
                        help="the only attention kernel scaled_dot_product_attention may pick (global flags, set "
                             "before compiling); default: PyTorch's own priority order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak rate (8192 on CUDA)")
    parser.add_argument("--out", default=str(OUT))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        if args.sdpa != "default":  # e.g. cuDNN's attention against flash for DiT-XL's head size 72
            torch.backends.cuda.enable_flash_sdp(args.sdpa == "flash")
            torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "cudnn")
            torch.backends.cuda.enable_mem_efficient_sdp(args.sdpa == "efficient")
            torch.backends.cuda.enable_math_sdp(False)
    peak = matmul_rate(device, args.matmul_n or (8192 if device.type == "cuda" else 1024))
    print(f"measured matmul peak: {peak / 1e12:.1f} TFLOP/s", flush=True)
    where, now = machine(device), datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = "python bench/expert_throughput.py " + " ".join(sys.argv[1:])
    setup = f"{args.image_size}x{args.image_size}x{args.channels}" + (
        f", cross-attention to {args.text_tokens} x {args.text_dim} caption tokens ({args.text_mask} mask)"
        if args.text_dim else "") + f", batch {args.batch}, {args.precision}, compile={args.compile}" + (
        f" ({args.compile_mode})" if args.compile_mode else "") + (
        ", residual stream bf16" if args.residual == "bf16" else "") + (
        ", coordinate-descent tuning" if args.coordinate_descent else "") + (
        f", attention kernel {args.sdpa}" if args.sdpa != "default" else "")
    records: list[dict[str, Any]] = [{
        "metric": "expert_throughput/matmul_peak_bf16" if device.type == "cuda" else "expert_throughput/matmul_peak",
        "value": round(peak / 1e12, 2), "unit": "TFLOP/s", "reference": None, "ratio": None, "command": command,
        "machine": where, "date": now}]
    rows = []
    for preset in args.presets.split(","):
        r = bench_preset(preset, args, device)
        mfu = 3 * r["fwd_gflops"] * 1e9 * r["images_per_s"] / peak
        rows.append((preset, r, mfu))
        print(f"{preset}: {r['images_per_s']:.0f} images/s, {r['step_s'] * 1e3:.1f} ms/step, MFU {mfu:.1%} "
              f"(warm-up {r['warmup_s']:.0f} s, peak mem {r['peak_mem_gib']:.1f} GiB)", flush=True)
        target = TARGET_MFU.get(preset)
        extra = {"setup": setup, "fwd_gflops_per_image": round(r["fwd_gflops"], 3),
                 "peak_mem_gib": round(r["peak_mem_gib"], 2), "warmup_s": round(r["warmup_s"], 1)}
        name = preset + (f"+text{args.text_dim}" if args.text_dim else "") + (
            "-captions" if args.text_dim and args.text_mask == "captions" else "") + (
            f"@{args.image_size}x{args.image_size}x{args.channels}" if args.channels != 3 else "") + (
            f" sdpa={args.sdpa}" if args.sdpa != "default" else "") + (
            " residual=bf16" if args.residual == "bf16" else "") + (
            " coordinate-descent" if args.coordinate_descent else "")
        records.append({"metric": f"expert_throughput/{name}", "value": round(r["images_per_s"], 1),
                        "unit": "images/s", "reference": None, "ratio": None, "command": command, "machine": where,
                        "date": now, **extra})
        records.append({"metric": f"expert_mfu/{name}", "value": round(mfu, 4), "unit": "fraction of measured "
                        "matmul peak", "reference": target, "ratio": round(mfu / target, 3) if target else None,
                        "command": command, "machine": where, "date": now, **extra})
        write(Path(args.out), records)  # after each preset: a run cut short keeps what it measured
    print(f"\n{'preset':<10} {'images/s':>10} {'ms/step':>9} {'GFLOP/img':>10} {'MFU':>7} {'target':>7}")
    for preset, r, mfu in rows:
        target = TARGET_MFU.get(preset)
        print(f"{preset:<10} {r['images_per_s']:>10.0f} {r['step_s'] * 1e3:>9.1f} {r['fwd_gflops']:>10.1f} "
              f"{mfu:>7.1%} {f'{target:.0%}' if target else '-':>7}")
    print(f"matmul peak {peak / 1e12:.1f} TFLOP/s on {where}; wrote {args.out}")


def write(out: Path, records: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    fresh = {(r["metric"], r["machine"]) for r in records}
    kept = [r for r in old if (r.get("metric"), r.get("machine")) not in fresh]
    out.write_text(json.dumps(kept + records, indent=2) + "\n")


if __name__ == "__main__":
    main()
