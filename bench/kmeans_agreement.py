"""How far two k-means runs of the same seed agree: faiss with one OpenBLAS kernel family, with another, and the
torch k-means on a GPU (what the cluster stage runs on CUDA), on the synthetic features of cluster_faiss_speed.py.

Each run saves its fine and coarse labels and its fine objective; ``--compare`` prints, for every pair, the share of
identical labels, the NMI of the two partitions (1: the same partition whatever the label numbers) and the ratio of
the objectives. faiss's kernels are chosen when it loads (OPENBLAS_CORETYPE), so each run is its own process:

    OPENBLAS_CORETYPE=Haswell python bench/kmeans_agreement.py --run faiss --save /tmp/haswell.npz
    OPENBLAS_CORETYPE=SkylakeX python bench/kmeans_agreement.py --run faiss --save /tmp/skylakex.npz
    python bench/kmeans_agreement.py --run cuda --save /tmp/cuda.npz
    python bench/kmeans_agreement.py --compare /tmp/haswell.npz /tmp/skylakex.npz /tmp/cuda.npz
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_faiss_speed import clustered_features  # noqa: E402
from common import record  # noqa: E402

from ddm_trainer.clustering import hierarchical_kmeans, nmi  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--fine", type=int, default=1024)
    parser.add_argument("--coarse", type=int, default=8)
    parser.add_argument("--run", help="faiss (CPU) or a torch device (cuda)")
    parser.add_argument("--save", help="where --run writes its labels and objective (.npz)")
    parser.add_argument("--compare", nargs="+", help="saved runs to compare pairwise")
    args = parser.parse_args()
    if args.compare:
        runs = {Path(p).stem: dict(np.load(p)) for p in args.compare}
        for (a, ra), (b, rb) in itertools.combinations(runs.items(), 2):
            same_fine, same = float((ra["fine"] == rb["fine"]).mean()), float((ra["cluster"] == rb["cluster"]).mean())
            nmi_fine, nmi_coarse = nmi(ra["fine"], rb["fine"]), nmi(ra["cluster"], rb["cluster"])
            ratio = float(rb["objective"] / ra["objective"])
            print(f"{b} vs {a}: identical labels fine {same_fine:.4%}, coarse {same:.4%}; NMI fine {nmi_fine:.4f}, "
                  f"coarse {nmi_coarse:.4f}; fine objective ratio {ratio:.6f}")
            tag = f"{args.n}x{args.dim}->{args.fine}->{args.coarse}, {b} vs {a}"
            record("kmeans_agreement", f"identical_fine_labels[{tag}]", round(same_fine, 6), "share")
            record("kmeans_agreement", f"nmi_fine[{tag}]", round(nmi_fine, 6), "nmi")
            record("kmeans_agreement", f"nmi_coarse[{tag}]", round(nmi_coarse, 6), "nmi")
            record("kmeans_agreement", f"fine_objective_ratio[{tag}]", round(ratio, 6), "ratio")
        return
    x, _ = clustered_features(args.n, args.dim, modes=args.coarse * 4, seed=0)
    device = None if args.run == "faiss" else args.run
    if device:
        import torch

        torch.zeros(1, device=device)
    t0 = time.perf_counter()
    result = hierarchical_kmeans(x, args.coarse, args.fine, seed=0, device=device)
    seconds = time.perf_counter() - t0
    objective = float(((x - result.fine_centroids[result.fine]) ** 2).sum(dtype=np.float64))
    print(f"{args.run} (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}): {seconds:.1f} s, "
          f"fine objective {objective:.6g}")
    np.savez(args.save, fine=result.fine, cluster=result.cluster, objective=objective)


if __name__ == "__main__":
    main()
