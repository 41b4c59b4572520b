"""Clustering speed: N x D random-but-clustered float32 features -> 1024 fine + 8 coarse clusters (faiss).

The full figure is 1,000,000 x 768; ``--n`` runs it smaller. faiss on the CPU with all cores, or with ``--device
cuda`` the torch k-means the cluster stage runs on its GPU; ``--compare-faiss`` then also runs faiss on the CPU
and reports the share of identical labels and the objectives of both (kmeans_torch's tolerance: >= 99%, 0.1%).
Writes bench/results/cluster_faiss_speed.json via bench/common.py.

    python bench/cluster_faiss_speed.py                 # 1M x 768
    python bench/cluster_faiss_speed.py --n 200000      # smaller, e.g. on a laptop
    python bench/cluster_faiss_speed.py --device cuda --compare-faiss
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_openblas_arg, import_faiss_for, record  # noqa: E402

from ddm_trainer.clustering import hierarchical_kmeans, nmi  # noqa: E402


def clustered_features(n: int, dim: int, modes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features around ``modes`` random directions (like encoder features), in place to save RAM."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((modes, dim), dtype=np.float32)
    labels = rng.integers(0, modes, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        x[start:stop] = centers[labels[start:stop]] + 0.7 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--fine", type=int, default=1024)
    parser.add_argument("--coarse", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all cores)")
    parser.add_argument("--target", type=float, default=30.0, help="seconds the issue asks for (the ratio's reference)")
    parser.add_argument("--device", default="faiss",
                        help="faiss (faiss on the CPU, the cluster stage without a GPU) or a torch device such as "
                             "cuda (the torch k-means the cluster stage runs on its GPU)")
    parser.add_argument("--compare-faiss", action="store_true",
                        help="with a torch --device: also run faiss on the CPU and compare labels and objectives")
    add_openblas_arg(parser)
    args = parser.parse_args()

    faiss, kernels = import_faiss_for(args.openblas)

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    device = None if args.device == "faiss" else args.device
    if device:
        import torch

        torch.zeros(1, device=device)  # the CUDA context is not k-means time
    t0 = time.perf_counter()
    x, labels = clustered_features(args.n, args.dim, modes=args.coarse * 4, seed=0)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = hierarchical_kmeans(x, args.coarse, args.fine, seed=0, iters=args.iters, device=device)
    seconds = time.perf_counter() - t0
    score = nmi(labels, result.fine)
    print(f"n={args.n} dim={args.dim} fine={result.fine_used} coarse={args.coarse} {args.device}: "
          f"{seconds:.1f} s (features generated in {gen_s:.1f} s), fine NMI vs generating modes {score:.3f}")
    tag = f"{args.n}x{args.dim}->{result.fine_used}->{args.coarse}" + (f" torch {device}" if device else f" cpu, {kernels}")
    if args.iters != 20:
        tag += f", {args.iters} iterations"
    record("cluster_faiss_speed", f"cluster_seconds[{tag}]", round(seconds, 2), "s", reference=args.target)
    record("cluster_faiss_speed", f"cluster_throughput[{tag}]", round(args.n / seconds, 1), "samples/s")
    if device and args.compare_faiss:
        t0 = time.perf_counter()
        cpu = hierarchical_kmeans(x, args.coarse, args.fine, seed=0, iters=args.iters)
        cpu_s = time.perf_counter() - t0
        same_fine, same = float((cpu.fine == result.fine).mean()), float((cpu.cluster == result.cluster).mean())
        objectives = [float(((x - r.fine_centroids[r.fine]) ** 2).sum(dtype=np.float64)) for r in (cpu, result)]
        print(f"faiss on the CPU ({kernels}): {cpu_s:.1f} s; identical labels: fine {same_fine:.4%}, coarse "
              f"{same:.4%}; fine objective faiss {objectives[0]:.6g}, torch {objectives[1]:.6g} "
              f"({objectives[1] / objectives[0] - 1:+.4%})")
        record("cluster_faiss_speed", f"identical_fine_labels[{tag} vs faiss cpu]", round(same_fine, 6), "share",
               reference=0.99)
        record("cluster_faiss_speed", f"fine_objective_ratio[{tag} vs faiss cpu]",
               round(objectives[1] / objectives[0], 6), "ratio", reference=1.0)


if __name__ == "__main__":
    main()
