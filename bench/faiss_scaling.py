"""faiss k-means throughput (GFLOP/s) per thread count and per OpenBLAS kernel family.

    python bench/faiss_scaling.py --n 200000 --threads 1 2     # N x 768 -> 1024 centroids, 5 iterations
    python bench/faiss_scaling.py --threads 16 --openblas library   # OpenBLAS's own kernel choice only

By default each thread count is measured twice, in two processes (OpenBLAS picks its kernels once, at load): with the
kernels the trainer picks (``ddm_trainer.clustering.import_faiss``) and with OpenBLAS's own CPU detection, which is
the reference of the ratio. Writes bench/results/faiss_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_openblas_arg, import_faiss_for, record, this_command  # noqa: E402


def measure(args: argparse.Namespace) -> tuple[str, dict[int, tuple[float, float]]]:
    """-> (kernel tag, {threads: (train GFLOP/s, assignment GFLOP/s)})."""
    faiss, kernels = import_faiss_for(args.openblas)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train_points = min(args.n, args.k * 256)  # faiss subsamples 256 points per centroid for training
    rates = {}
    for threads in args.threads:
        faiss.omp_set_num_threads(threads)
        km = faiss.Kmeans(args.dim, args.k, niter=args.iters, seed=0, max_points_per_centroid=256)
        t0 = time.perf_counter()
        km.train(x)
        train_rate = train_points * args.k * args.dim * 2 * args.iters / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        km.index.search(x, 1)
        search_rate = args.n * args.k * args.dim * 2 / (time.perf_counter() - t0) / 1e9
        rates[threads] = (train_rate, search_rate)
        print(f"threads={threads} {kernels}: train {train_rate:.0f} GFLOP/s, assignment {search_rate:.0f} GFLOP/s",
              file=sys.stderr)
    return kernels, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    add_openblas_arg(parser)
    parser.add_argument("--print-only", action="store_true", help=argparse.SUPPRESS)  # the reference's child process
    args = parser.parse_args()

    kernels, rates = measure(args)
    if args.print_only:
        print(json.dumps({"kernels": kernels, "rates": rates}))
        return
    reference: dict[str, tuple[float, float]] = {}
    if args.openblas != "library":
        child = [sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim), "--k", str(args.k),
                 "--iters", str(args.iters), "--threads", *map(str, args.threads), "--openblas", "library",
                 "--print-only"]
        reference = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)["rates"]
    command = this_command()
    for threads, (train_rate, search_rate) in rates.items():
        ref_train, ref_search = reference.get(str(threads), (None, None))
        for what, rate, ref in (("train", train_rate, ref_train), ("assign", search_rate, ref_search)):
            record("faiss_scaling", f"kmeans_{what}_gflops[threads={threads}, {kernels}]", round(rate, 1), "GFLOP/s",
                   reference=round(ref, 1) if ref else None, ratio=round(rate / ref, 3) if ref else None,
                   command=command + (" (reference: --openblas library)" if ref else ""))


if __name__ == "__main__":
    main()
