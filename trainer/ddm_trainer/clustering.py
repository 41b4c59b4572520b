"""Clustering library: fine k-means on features, merged into K coarse clusters, optional balance bound.

DDM (McAllister et al. 2025) clusters encoder features into many fine centroids, then merges them into K coarse
clusters by k-means over the fine centroids weighted by their sizes; each coarse cluster trains one expert.
``load_assignments(store)`` is how the expert and router stages read the result.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from . import layout
from .errors import DataError, MissingArtifactError
from .store import Store

ASSIGNMENTS = "assignments.npz"  # keys (N,) str, cluster (N,) int64, fine (N,) int64 (-1 for method=random)
CENTROIDS = "centroids.npz"  # fine (F, D), coarse (K, D), fine_to_coarse (F,), fine_counts (F,)
CONFIG = "config.json"
EXAMPLES = "examples.png"
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this; fewer points make centroids noise

# OpenBLAS kernel families, widest first, with the CPU flags each needs.
OPENBLAS_CORETYPES: tuple[tuple[str, frozenset[str]], ...] = (
    ("SkylakeX", frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags the OS enabled (Linux); empty where there is no /proc/cpuinfo."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def openblas_coretype(flags: frozenset[str]) -> str | None:
    """The widest OpenBLAS kernel family these CPU flags run, or None (leave OpenBLAS to decide)."""
    return next((name for name, needs in OPENBLAS_CORETYPES if needs <= flags), None)


def import_faiss(cpuinfo: str = "/proc/cpuinfo"):  # noqa: ANN201
    """``import faiss``, with the OpenBLAS bundled in the faiss-cpu wheel told which kernels to run.

    That OpenBLAS (0.3.15, 2021) picks its kernels by CPU model, and on the H200 machine (a recent Xeon seen through
    a VM) it picked kernels that ran k-means at 189 GFLOP/s on 16 cores against 756 GFLOP/s with
    OPENBLAS_CORETYPE=SkylakeX (bench/faiss_scaling.py). The CPU flags say what the cores can run, so the kernel
    family is chosen from them. OpenBLAS reads the variable once, when faiss first loads; a value already set wins.
    """
    if "faiss" not in sys.modules and not os.environ.get("OPENBLAS_CORETYPE"):
        coretype = openblas_coretype(cpu_flags(cpuinfo))
        if coretype:
            os.environ["OPENBLAS_CORETYPE"] = coretype
    import faiss

    return faiss


@dataclass
class Assignments:
    keys: list[str]
    cluster: np.ndarray  # (N,) int64 in [0, num_clusters)
    num_clusters: int
    sizes: list[int]
    meta: dict = field(default_factory=dict)

    def keys_of(self, k: int) -> list[str]:
        if not 0 <= k < self.num_clusters:
            raise DataError(f"cluster {k} is outside 0..{self.num_clusters - 1}")
        return [key for key, c in zip(self.keys, self.cluster.tolist()) if c == k]


def load_assignments(store: Store) -> Assignments:
    """The committed clustering of the run at ``store``; MissingArtifactError when the stage has not committed."""
    manifest = store.read_manifest(layout.CLUSTERING)
    if manifest is None:
        raise MissingArtifactError(f"no committed clustering at {store.url(layout.CLUSTERING)} (run the cluster stage)")
    with np.load(io.BytesIO(store.read_committed(layout.CLUSTERING, ASSIGNMENTS)), allow_pickle=False) as z:
        keys = [str(k) for k in z["keys"].tolist()]
        cluster = z["cluster"].astype(np.int64)
    num = int(manifest["num_clusters"])
    return Assignments(keys, cluster, num, np.bincount(cluster, minlength=num).tolist(), manifest)


# -- k-means -------------------------------------------------------------------------------------------------------
def kmeans_pp_init(x: np.ndarray, k: int, weights: np.ndarray, seed: int) -> np.ndarray:
    """Weighted k-means++ seeding (k, D): a fine centroid holding one outlier is rarely a coarse seed."""
    rng = np.random.default_rng(seed)
    w = weights.astype(np.float64)
    chosen = [int(rng.choice(len(x), p=w / w.sum()))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)  # (F,)
    for _ in range(1, k):
        p = w * d2
        nxt = int(rng.choice(len(x), p=p / p.sum())) if p.sum() > 0 else int(rng.integers(len(x)))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[chosen].astype(np.float32)


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int, weights: np.ndarray | None = None,
            use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means -> (centroids (k, D), assignment (N,) int64). Deterministic for a seed on one device.

    With ``weights`` (the coarse merge) seeding is weighted k-means++; without, faiss samples seeds uniformly.
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)  # (N, D)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, gpu=use_gpu, verbose=False,
                      max_points_per_centroid=256, min_points_per_centroid=1)
    if weights is None:
        km.train(x)
    else:
        km.train(x, weights=np.ascontiguousarray(weights, dtype=np.float32),
                 init_centroids=kmeans_pp_init(x, k, weights, seed))
    _, assign = km.index.search(x, 1)  # (N, 1)
    return km.centroids.copy(), assign[:, 0].astype(np.int64)


def effective_fine_clusters(requested: int, num_samples: int, num_clusters: int) -> int:
    """Fine centroids actually used: at most one per MIN_POINTS_PER_CENTROID samples, never below K."""
    if num_samples < num_clusters:
        raise DataError(f"{num_samples} samples cannot fill num_clusters={num_clusters} clusters")
    return max(num_clusters, min(requested, num_samples // MIN_POINTS_PER_CENTROID))


@dataclass
class Clustering:
    cluster: np.ndarray  # (N,) int64 coarse id per sample
    fine: np.ndarray  # (N,) int64 fine id per sample (-1 when random)
    fine_centroids: np.ndarray  # (F, D)
    coarse_centroids: np.ndarray  # (K, D)
    fine_to_coarse: np.ndarray  # (F,) int64
    fine_counts: np.ndarray  # (F,) int64
    fine_used: int


def hierarchical_kmeans(features: np.ndarray, num_clusters: int, fine_clusters: int, seed: int, iters: int = 20,
                        max_cluster_fraction: float | None = None, use_gpu: bool = False) -> Clustering:
    """features (N, D) -> fine k-means -> coarse k-means over fine centroids weighted by counts -> balance."""
    n = len(features)
    fine_used = effective_fine_clusters(fine_clusters, n, num_clusters)
    if fine_used < fine_clusters:
        print(f"cluster: {n} samples support {fine_used} fine clusters, not {fine_clusters} "
              f"(>= {MIN_POINTS_PER_CENTROID} samples per centroid)", file=sys.stderr)
    fine_centroids, fine = _kmeans(features, fine_used, iters, seed, use_gpu=use_gpu)
    counts = np.bincount(fine, minlength=fine_used).astype(np.int64)  # (F,)
    live = counts > 0  # faiss can leave a centroid empty; it must not pull a coarse centroid
    if fine_used == num_clusters:
        fine_to_coarse = np.arange(fine_used, dtype=np.int64)
        coarse = fine_centroids.copy()
    else:
        coarse, _ = _kmeans(fine_centroids[live], num_clusters, iters * 2, seed + 1, weights=counts[live],
                            use_gpu=use_gpu)
        dists = ((fine_centroids[:, None, :] - coarse[None]) ** 2).sum(-1)  # (F, K)
        fine_to_coarse = dists.argmin(1).astype(np.int64)
        if max_cluster_fraction is not None:
            fine_to_coarse = balance(dists, counts, max_cluster_fraction)
    coarse = _weighted_means(fine_centroids, counts, fine_to_coarse, num_clusters, fallback=coarse)
    return Clustering(fine_to_coarse[fine], fine, fine_centroids, coarse, fine_to_coarse, counts, fine_used)


def balance(dists: np.ndarray, counts: np.ndarray, max_fraction: float) -> np.ndarray:
    """Assign fine clusters (indivisible, ``counts``) to coarse ones so none exceeds ``max_fraction`` of all samples.

    Greedy, largest fine cluster first, each to its nearest coarse cluster that still has room; a fine cluster that
    fits nowhere goes to the emptiest one (the bound can then be exceeded by at most that cluster's size).
    """
    num_fine, k = dists.shape
    cap = int(np.floor(max_fraction * counts.sum()))
    load = np.zeros(k, dtype=np.int64)
    out = np.empty(num_fine, dtype=np.int64)
    for f in np.argsort(-counts, kind="stable"):
        choice = next((int(c) for c in np.argsort(dists[f], kind="stable") if load[c] + counts[f] <= cap), None)
        if choice is None:
            choice = int(load.argmin())
        out[f] = choice
        load[choice] += counts[f]
    return out


def _weighted_means(points: np.ndarray, weights: np.ndarray, group: np.ndarray, k: int,
                    fallback: np.ndarray) -> np.ndarray:
    out = fallback.astype(np.float32).copy()
    for c in range(k):
        w = weights[group == c].astype(np.float64)
        if w.sum() > 0:
            out[c] = (points[group == c] * w[:, None]).sum(0) / w.sum()
    return out


def random_partition(n: int, num_clusters: int, seed: int) -> np.ndarray:
    """The ablation: a uniform random partition into K clusters of near-equal size. (N,) int64."""
    if n < num_clusters:
        raise DataError(f"{n} samples cannot fill num_clusters={num_clusters} clusters")
    perm = np.random.default_rng(seed).permutation(n)
    cluster = np.empty(n, dtype=np.int64)
    cluster[perm] = np.arange(n) % num_clusters
    return cluster


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (sklearn's default)."""
    _, a = np.unique(labels, return_inverse=True)
    _, b = np.unique(clusters, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1), dtype=np.float64)
    np.add.at(joint, (a, b), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pa[:, None] * pb[None])[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    denom = (ha + hb) / 2
    return 1.0 if denom == 0 else max(0.0, mi / denom)


def examples_grid(rows: list[list[np.ndarray]], pad: int = 2) -> bytes:
    """One row of uint8 images ((C, H, W) each) per cluster -> PNG bytes; short rows stay blank on the right."""
    from PIL import Image

    c, h, w = next(img for row in rows for img in row).shape
    per_row = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, per_row * (w + pad) + pad, c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for col, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            canvas[y : y + h, x : x + w] = img.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(buf, format="PNG")
    return buf.getvalue()
