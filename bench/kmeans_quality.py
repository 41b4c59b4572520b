"""What fewer k-means iterations or fewer training points per centroid cost: objective and time (faiss, 1024 centroids).

    python bench/kmeans_quality.py --threads 2

Data: 300k x 768 clustered synthetic features (as bench/cluster_faiss_speed.py) and Fashion-MNIST's 60k training
images as raw pixels (Debian package dataset-fashion-mnist). The reference of each row is the default setting
(256 points per centroid, 20 iterations) on the same data in the same run. Writes bench/results/kmeans_quality.json.
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_faiss_speed import clustered_features  # noqa: E402
from common import record  # noqa: E402

SETTINGS = ((256, 20), (128, 20), (256, 10))  # (max points per centroid, iterations); the first is the default


def fashion_mnist(path: str = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") -> np.ndarray:
    x = np.frombuffer(gzip.open(path).read()[16:], np.uint8).reshape(-1, 784).astype(np.float32) / 255
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from ddm_trainer.clustering import import_faiss

    faiss = import_faiss()

    faiss.omp_set_num_threads(args.threads)
    datasets = {"synthetic-300k-x768": clustered_features(300_000, 768, modes=32, seed=0)[0],
                "fashion-mnist-60k-pixels": fashion_mnist()}
    for name, x in datasets.items():
        base = None
        for mppc, iters in SETTINGS:
            km = faiss.Kmeans(x.shape[1], 1024, niter=iters, seed=0, max_points_per_centroid=mppc,
                              min_points_per_centroid=1)
            t0 = time.perf_counter()
            km.train(x)
            dist, _ = km.index.search(x, 1)
            seconds = time.perf_counter() - t0
            objective = float(dist.mean())
            base = base or objective
            label = f"{name}, {mppc} pts/centroid, {iters} iterations"
            print(f"{label}: objective {objective:.5f} ({objective / base - 1:+.2%}), {seconds:.1f} s", flush=True)
            record("kmeans_quality", f"objective[{label}]", round(objective, 6), "mean squared distance",
                   reference=round(base, 6), ratio=round(objective / base, 5))
            record("kmeans_quality", f"seconds[{label}]", round(seconds, 2), "s")


if __name__ == "__main__":
    main()
