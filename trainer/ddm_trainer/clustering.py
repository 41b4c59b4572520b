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
from typing import TYPE_CHECKING

import numpy as np

from . import layout
from .errors import DataError, MissingArtifactError
from .store import Store

if TYPE_CHECKING:
    import torch

    from .configs.common import DataConfig

ASSIGNMENTS = "assignments.npz"  # keys (N,) str, cluster (N,) int64, fine (N,) int64 (-1 for method=random)
CENTROIDS = "centroids.npz"  # fine (F, D), coarse (K, D), fine_to_coarse (F,), fine_counts (F,)
CONFIG = "config.json"
EXAMPLES = "examples.png"
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this; fewer points make centroids noise
MAX_POINTS_PER_CENTROID = 256  # k-means trains on a seeded sample of at most this many points per centroid

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


def allocated_steps(steps: int, sizes: list[int]) -> list[int]:
    """``experts.stepsAllocation: proportional``: each expert's steps in proportion to its cluster's size, summing to
    K x ``steps`` (largest remainders), so the experts together still do the equal split's work and every image is
    seen about as often as in the monolith; an expert of a non-empty cluster makes at least one step."""
    total, k = sum(sizes), len(sizes)
    if total <= 0 or steps <= 0:
        raise ValueError(f"allocated_steps needs steps > 0 and a non-empty clustering, got {steps} and {sizes}")
    quotas = [steps * k * n / total for n in sizes]
    out = [int(q) for q in quotas]
    for i in sorted(range(k), key=lambda i: quotas[i] - out[i], reverse=True)[:steps * k - sum(out)]:
        out[i] += 1
    return [max(s, 1) if n else 0 for s, n in zip(out, sizes)]


def class_counts(cluster: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """(K, C) int64: how many samples of each class each cluster holds."""
    out = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(out, (cluster, labels), 1)
    return out


def mixture_counts(store: Store, data: "DataConfig | None" = None) -> np.ndarray:
    """What the ``oracle`` strategy draws each sample's expert from: the clusters' class counts (K, C) when the data
    has classes, else the cluster sizes (K,). Read from the cluster stage's manifest (``class_counts``); a run
    clustered before the manifest carried them has them counted from ``data``'s labels (sizes without ``data``)."""
    assignments = load_assignments(store)
    if assignments.meta.get("class_counts") is not None:
        return np.asarray(assignments.meta["class_counts"], dtype=np.int64)
    if data is not None:
        from .data import open_source

        source = open_source(data, store)
        by_key = source.labels()
        if by_key is not None:
            absent = [k for k in assignments.keys if k not in by_key]
            if absent:
                raise DataError(f"data.uri {data.uri} has no label for clustered sample {absent[0]!r} "
                                f"({len(absent)} in all): is it the data the run was clustered on?")
            labels = np.asarray([by_key[k] for k in assignments.keys], dtype=np.int64)
            return class_counts(assignments.cluster, labels, assignments.num_clusters,
                                source.num_classes or int(labels.max()) + 1)
    return np.asarray(assignments.sizes, dtype=np.int64)


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
            device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-means -> (centroids (k, D), assignment (N,) int64): faiss on the CPU (``device`` None), else
    ``kmeans_torch`` on that torch device (e.g. "cuda"). Deterministic for a seed on one device.

    With ``weights`` (the coarse merge) seeding is weighted k-means++; without, faiss samples seeds uniformly. The
    torch path trains on the points faiss would (its seeded sample of MAX_POINTS_PER_CENTROID per centroid) from
    the seeds faiss would take (``faiss_perm_prefix``), so both give the same clusters up to float rounding.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)  # (N, D)
    w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    init = None if w is None else kmeans_pp_init(x, k, w, seed)
    if device is not None:
        train = x
        if len(x) > k * MAX_POINTS_PER_CENTROID:  # faiss's subsample_training_set: rand_perm(n, seed)'s first points
            rows = faiss_perm_prefix(len(x), k * MAX_POINTS_PER_CENTROID, seed)
            train, w = x[rows], None if w is None else w[rows]
        if init is None:  # faiss's seeds: rand_perm(n, seed + 1)'s first k training points
            init = train[faiss_perm_prefix(len(train), k, seed + 1)]
        centroids = kmeans_torch(train, k, iters, init, w, device)
        return centroids, nearest_centroid(x, centroids, device)
    faiss = import_faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False,
                      max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1)
    if w is None:
        km.train(x)
    else:
        km.train(x, weights=w, init_centroids=init)
    _, assign = km.index.search(x, 1)  # (N, 1)
    return km.centroids.copy(), assign[:, 0].astype(np.int64)


def faiss_perm_prefix(n: int, m: int, seed: int) -> np.ndarray:
    """The first ``m`` entries (m, ) int64 of faiss's ``rand_perm(n, seed)`` (faiss/utils/random.cpp): a
    Fisher-Yates shuffle of 0..n-1 whose step i swaps i with i + mt() % (n - i), mt a std::mt19937 seeded with
    (unsigned) seed. Position i is final after step i, so m steps give the prefix; the swaps are kept sparse."""
    rng = np.random.RandomState(seed & 0xFFFFFFFF)  # numpy's legacy seeding of an int is std::mt19937's
    steps = np.arange(m, dtype=np.uint64)
    partner = (steps + rng.randint(0, 2**32, size=m, dtype=np.uint64) % (np.uint64(n) - steps)).astype(np.int64)
    moved: dict[int, int] = {}  # position -> the value there, where it is not the identity's
    out = np.empty(m, dtype=np.int64)
    for i, j in enumerate(partner.tolist()):
        here, there = moved.get(i, i), moved.get(j, j)
        moved[j] = here
        out[i] = there
    return out


SPLIT_EPS = 1 / 1024  # faiss's perturbation of a split centroid
CHUNK_BYTES = 256 << 20  # of a (rows, k) distance block in nearest_centroid


def kmeans_torch(x: np.ndarray, k: int, iters: int, init: np.ndarray, weights: np.ndarray | None,
                 device: str | torch.device) -> np.ndarray:
    """Lloyd's k-means in torch on ``device`` (a GPU when there is one): the iterations of faiss's
    ``Clustering::train`` (faiss/Clustering.cpp, 1.x) from the same initial centroids (k, D), so that for the same
    seed it gives faiss's result: assign each point to its nearest centroid (||x||^2 + ||c||^2 - 2 x.c, clamped at
    0, the first of ties, as faiss's IndexFlatL2 search), move each centroid to its points' (weighted) mean, and
    split a large cluster for each empty one with faiss's rule and random stream (``split_empty``); ``iters``
    times. Returns the centroids (k, D) float32.

    Tolerance against faiss on the CPU: the sums run in float64 here and in another order than faiss's float32
    BLAS, so a point almost equidistant from two centroids may go the other way and move a centroid by about float
    rounding. Stated: the k-means objective within 0.1%, always; at least 99% identical labels where the optimum is
    well separated (tested on Fashion-MNIST pixels; 99.4-100% on the benchmark's 300k x 64 and 50k x 768 features).
    Where many centroids share a mode (the benchmark's 1M x 768 features: 32 modes, 1024 centroids) those rounding
    differences grow over the iterations into another optimum of the same objective: on an H100, 84% identical fine
    labels at an objective ratio of 0.999999 (BENCHMARKS.md). TF32 is off while it runs: its 10-bit mantissa would
    move far more points than float32 rounding does.
    """
    import torch

    n = len(x)
    if n < k:
        raise DataError(f"{n} points cannot fill {k} k-means centroids")
    if n == k:  # faiss's corner case: the points are the centroids
        return x.astype(np.float32, copy=True)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)  # (N, D)
        W = torch.from_numpy(np.asarray(weights, dtype=np.float32)).to(device) if weights is not None else \
            torch.ones(n, dtype=torch.float32, device=X.device)  # (N,)
        C = torch.from_numpy(np.ascontiguousarray(init, dtype=np.float32)).to(device)  # (k, D)
        x_norms = (X * X).sum(1)  # (N,)
        Wd = W.double()  # (N,)
        Xw = X.double() * Wd[:, None]  # (N, D) float64
        for _ in range(iters):
            assign = _nearest(X, x_norms, C)  # (N,)
            mass = torch.zeros(k, dtype=torch.float64, device=X.device).index_add_(0, assign, Wd)  # (k,)
            sums = torch.zeros(C.shape, dtype=torch.float64, device=X.device).index_add_(0, assign, Xw)  # (k, D)
            C = (sums.float() * torch.where(mass > 0, 1 / mass.float(), torch.zeros_like(mass.float()))[:, None])
            if bool((mass == 0).any()):
                C = torch.from_numpy(split_empty(C.cpu().numpy(), mass.float().cpu().numpy(), n)).to(X.device)
        return C.cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def _nearest(X: torch.Tensor, x_norms: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(N,) int64: the nearest centroid of each row of X, in blocks of rows of CHUNK_BYTES distances."""
    import torch

    c_norms = (C * C).sum(1)  # (k,)
    rows = max(1, CHUNK_BYTES // (4 * len(C)))
    out = []
    for i in range(0, len(X), rows):
        d = x_norms[i : i + rows, None] + c_norms[None] - 2 * (X[i : i + rows] @ C.T)  # (rows, k)
        out.append(d.clamp_min_(0).argmin(1))
    return torch.cat(out)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, device: str | torch.device) -> np.ndarray:
    """(N,) int64: each point's nearest centroid, computed on ``device`` block by block (x stays where it is)."""
    import torch

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        C = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)  # (k, D)
        rows = max(1, CHUNK_BYTES // (4 * max(len(C), x.shape[1])))
        out = []
        for i in range(0, len(x), rows):
            X = torch.from_numpy(np.ascontiguousarray(x[i : i + rows], dtype=np.float32)).to(device)
            out.append(_nearest(X, (X * X).sum(1), C).cpu())
        return torch.cat(out).numpy().astype(np.int64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def split_empty(centroids: np.ndarray, mass: np.ndarray, n: int) -> np.ndarray:
    """faiss's ``split_clusters`` (faiss/Clustering.cpp): for each empty centroid in order, walk the clusters
    cyclically, drawing from a Mersenne Twister seeded 1234 at every call (faiss's RandomGenerator), until one is
    picked with probability (mass - 1) / (n - k); the empty centroid becomes a copy of it, the two pushed apart by
    SPLIT_EPS in alternating coordinates, and they share its mass. Returns new centroids (k, D) float32."""
    c, h = centroids.astype(np.float32, copy=True), mass.astype(np.float32, copy=True)
    k = len(c)
    rng = np.random.RandomState(1234)  # the legacy seeding is std::mt19937's

    def rand_float() -> np.float32:  # mt() / float(mt.max()), in float as faiss computes it
        return np.float32(rng.randint(0, 2**32, dtype=np.uint64)) / np.float32(2**32 - 1)

    up = np.where(np.arange(c.shape[1]) % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS)  # (D,) the new centroid's factors
    for ci in range(k):
        if h[ci] != 0:
            continue
        cj = 0
        while not rand_float() < np.float32((float(h[cj]) - 1.0) / np.float32(n - k)):
            cj = (cj + 1) % k
        c[ci] = (c[cj].astype(np.float64) * up).astype(np.float32)
        c[cj] = (c[cj].astype(np.float64) * (2 - up)).astype(np.float32)
        h[ci] = h[cj] / np.float32(2)
        h[cj] -= h[ci]
    return c


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
                        max_cluster_fraction: float | None = None, device: str | None = None) -> Clustering:
    """features (N, D) -> fine k-means -> coarse k-means over fine centroids weighted by counts -> balance.
    ``device``: a torch device to run k-means on (the cluster stage's GPU); None: faiss on the CPU."""
    n = len(features)
    fine_used = effective_fine_clusters(fine_clusters, n, num_clusters)
    if fine_used < fine_clusters:
        print(f"cluster: {n} samples support {fine_used} fine clusters, not {fine_clusters} "
              f"(>= {MIN_POINTS_PER_CENTROID} samples per centroid)", file=sys.stderr)
    fine_centroids, fine = _kmeans(features, fine_used, iters, seed, device=device)
    counts = np.bincount(fine, minlength=fine_used).astype(np.int64)  # (F,)
    live = counts > 0  # faiss can leave a centroid empty; it must not pull a coarse centroid
    if fine_used == num_clusters:
        fine_to_coarse = np.arange(fine_used, dtype=np.int64)
        coarse = fine_centroids.copy()
    else:
        coarse, _ = _kmeans(fine_centroids[live], num_clusters, iters * 2, seed + 1, weights=counts[live],
                            device=device)
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
