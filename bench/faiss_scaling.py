"""faiss k-means throughput (GFLOP/s) at a given thread count, to tell slow cores from poor scaling.

    python bench/faiss_scaling.py --n 200000 --threads 1 2     # N x 768 -> 1024 centroids, 5 iterations

Writes bench/results/faiss_scaling.json; the ratio is against the first thread count's training rate, measured in the
same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train_points = min(args.n, args.k * 256)  # faiss subsamples 256 points per centroid for training
    base = None
    for threads in args.threads:
        faiss.omp_set_num_threads(threads)
        km = faiss.Kmeans(args.dim, args.k, niter=args.iters, seed=0, max_points_per_centroid=256)
        t0 = time.perf_counter()
        km.train(x)
        train_rate = train_points * args.k * args.dim * 2 * args.iters / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        km.index.search(x, 1)
        search_rate = args.n * args.k * args.dim * 2 / (time.perf_counter() - t0) / 1e9
        base = base or train_rate
        print(f"threads={threads}: train {train_rate:.0f} GFLOP/s, assignment {search_rate:.0f} GFLOP/s")
        record("faiss_scaling", f"kmeans_train_gflops[threads={threads}]", round(train_rate, 1), "GFLOP/s",
               reference=round(base, 1), ratio=round(train_rate / base, 3))
        record("faiss_scaling", f"kmeans_assign_gflops[threads={threads}]", round(search_rate, 1), "GFLOP/s")


if __name__ == "__main__":
    main()
