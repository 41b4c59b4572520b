"""Throughput of the encode step's VAE as the cluster stage runs it: ``ddm_trainer.vae.Vae.encode`` of each image and
of its horizontal flip (fp32, the posterior mean), on the Stable Diffusion VAE architecture (sd-vae-ft-mse's config:
256 px RGB -> 32x32x4 latents). The weights are random (the architecture, not the weights, sets the speed), written
to a diffusers folder and loaded through the trainer's loader. Also bf16 autocast, to show what the encoder could do.

    python bench/encode_throughput.py --batch 64 --iters 10
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name, record  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    from ddm_trainer.vae import Vae

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        AutoencoderKL(**SD_VAE).save_pretrained(tmp)
        vae = Vae(tmp, device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    print(f"{machine_name()}: latents {tuple(vae.encode(x[:1]).shape[1:])} of {args.size} px", flush=True)

    def rate(fn: object, what: str) -> float:
        for _ in range(2):
            fn()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize()
        images = args.batch * args.iters / (time.perf_counter() - start)
        print(f"{what}: {images:.1f} images/s (batch {args.batch})", flush=True)
        return images

    stage = rate(lambda: (vae.encode(x), vae.encode(x.flip(-1))), "stage (image + flip, fp32)")
    record("encode_throughput", f"sd-vae encode image+flip fp32 {args.size}px b{args.batch} images/s", stage,
           "images/s")

    def bf16() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vae.model.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean

    fast = rate(bf16, "image + flip, bf16 autocast") / 1.0
    record("encode_throughput", f"sd-vae encode image+flip bf16 {args.size}px b{args.batch} images/s", fast,
           "images/s", reference=stage)


if __name__ == "__main__":
    main()
