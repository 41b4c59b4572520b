"""Sampling throughput (images/s) of a DDM ensemble per combination strategy, against a single DiT (the monolith).

8 DiT experts (random init: throughput does not depend on the weights) + a router, 32x32 RGB, ``--steps`` Euler
steps. The reference for every strategy is one DiT of the same preset sampled with the same steps, so ``ratio``
is the ensemble's speed relative to a monolith of one expert's size. A random router is near-uniform, so
``nucleus-0.9`` keeps most experts here; ``top1`` / ``top-2`` / ``sample-2`` cost what they cost with a trained one.

Imports only torch + the torch-only trainer modules (no pydantic/minio/faiss): runs on the GPU box as is.

    python bench/sampling_throughput.py                                   # CUDA, DiT-S/2 experts, Router-B/2
    python bench/sampling_throughput.py --device cpu --preset DiT-T/4 --n 16   # CPU smoke run (Router-T/4)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))  # works without installing the project
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import RESULTS, record  # noqa: E402

from ddm_trainer.flow import ode_sample  # noqa: E402
from ddm_trainer.models.dit import build_dit  # noqa: E402
from ddm_trainer.models.router import build_router  # noqa: E402
from ddm_trainer.sampler import CombinedSampler, draw_noise  # noqa: E402

STRATEGIES = ["top1", "top-2", "sample-2", "nucleus-0.9", "full"]
BENCHMARK = "sampling_throughput"


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def images_per_s(sample_batch: Callable[[torch.Tensor], Any], x1: torch.Tensor, batch_size: int,
                 device: torch.device) -> float:
    """Warm up on one batch, then time all of x1 in batches."""
    sample_batch(x1[:batch_size])

    def all_batches() -> None:
        for start in range(0, x1.shape[0], batch_size):
            sample_batch(x1[start : start + batch_size])

    return x1.shape[0] / timed(all_batches, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="DiT-S/2", help="expert DiT preset")
    ap.add_argument("--router-preset", default=None, help="default: Router-B/2 on CUDA, Router-T/4 on CPU")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--n", type=int, default=1024, help="images timed per strategy")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="Euler steps; default 50 on CUDA, 10 on CPU")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--spread", action="store_true", help="put expert k on cuda:(k mod device count)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    steps = args.steps or (50 if on_cuda else 10)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_cuda else "fp32")]
    router_preset = args.router_preset or ("Router-B/2" if on_cuda else "Router-T/4")
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    batch_size = min(args.batch_size, args.n)
    shape = (args.channels, args.image_size, args.image_size)

    torch.manual_seed(0)
    experts = [build_dit(args.preset, args.image_size, args.channels).to(device, dtype).eval()
               for _ in range(args.experts)]
    router = build_router(router_preset, args.image_size, args.channels, args.experts).to(device, dtype).eval()
    devices = ([torch.device("cuda", k % torch.cuda.device_count()) for k in range(args.experts)]
               if args.spread and on_cuda else None)
    x1 = draw_noise(args.n, shape, seed=0).to(device, dtype)

    mono = experts[0]

    @torch.no_grad()
    def monolith(x: torch.Tensor) -> torch.Tensor:
        return ode_sample(lambda x, t: mono(x, t.to(dtype)), x, steps)  # type: ignore[return-value]

    setup = (f"{args.experts}x {args.preset} + {router_preset}, {args.image_size}px, {steps} Euler steps, "
             f"{str(dtype).removeprefix('torch.')}, batch {batch_size}")
    print(setup)
    reference = images_per_s(monolith, x1, batch_size, device)
    record(BENCHMARK, f"images/s monolith {args.preset} ({setup})", round(reference, 3), "images/s",
           results_dir=args.results_dir)
    for name in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        sampler = CombinedSampler(experts, router, name, steps=steps, device=device, devices=devices, dtype=dtype)
        ips = images_per_s(lambda x: sampler.sample(x, seed=0), x1, batch_size, device)
        stats = sampler.stats(args.n + batch_size)  # the warm-up batch is counted too
        # reference: the monolith (one expert-sized DiT, same steps); ratio = ensemble speed / monolith speed
        record(BENCHMARK, f"images/s {name} ({setup})", round(ips, 3), "images/s", reference=round(reference, 3),
               results_dir=args.results_dir)
        record(BENCHMARK, f"expert NFE/image {name} ({setup})", round(stats.nfe, 3), "NFE", reference=steps,
               results_dir=args.results_dir)
        record(BENCHMARK, f"GFLOPs/image {name} ({setup})", round(stats.gflops_per_sample, 3), "GFLOP",
               results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
