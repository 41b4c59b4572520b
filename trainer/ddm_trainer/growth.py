"""Growing a DDM: the new data's clusters beside a parent run's (spec.growth), for the cluster stage.

The parent's committed clustering is checked against this one (the same encoder, so the new features compare
with its centroids; the same image size, so its experts fit) and the new data is either assigned to the parent's
clusters (``nearest``: nearest fine centroid, then the coarse cluster that centroid was merged into, as the
parent's own samples were assigned) or clustered into new clusters numbered after the parent's K
(``new-clusters``). The centroids kept are the parent's and the new ones together, so a grown run grows again.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import layout
from .clustering import CENTROIDS, Clustering, hierarchical_kmeans, import_faiss, random_partition
from .configs.cluster import ClusterConfig
from .errors import ConfigError, DataError
from .lineage import committed_experts
from .store import Store, open_store


@dataclass
class Parent:
    """The clustering a grown run extends."""

    store: Store
    num_clusters: int
    experts: list[int]  # its committed experts (its own and those it inherited): the grown run's, by reference
    centroids: dict[str, np.ndarray]  # fine (F, D), coarse (K, D), fine_to_coarse (F,), fine_counts (F,)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def open_parent(cfg: ClusterConfig) -> Parent:
    """The parent run's committed clustering, checked against ``cfg`` (errors name the spec field)."""
    assert cfg.growth is not None
    pstore = open_store(cfg.growth.parent_uri)
    manifest = pstore.read_manifest(layout.CLUSTERING)
    if manifest is None:
        raise ConfigError(f"spec.growth.parentUri {cfg.growth.parent_uri}: no committed clustering there "
                          f"({pstore.url(layout.CLUSTERING)}/MANIFEST.json)")
    pcfg = manifest.get("config") or {}
    for name in ("method", "encoder", "encoder_weights", "encoder_resolution"):
        if name != "method" and cfg.method != "kmeans":
            continue
        if pcfg.get(name) != getattr(cfg, name):
            raise ConfigError(f"spec.clustering.{_camel(name)} is {getattr(cfg, name)!r} but the parent run "
                              f"{cfg.growth.parent_uri} clustered with {pcfg.get(name)!r}: the new data must be embedded "
                              "as the parent's was")
    pdata = pcfg.get("data") or {}
    for name in ("image_size", "channels"):
        if pdata.get(name) != getattr(cfg.data, name):
            raise ConfigError(f"spec.dataset.{_camel(name)} is {getattr(cfg.data, name)} but the parent run "
                              f"{cfg.growth.parent_uri} has {pdata.get(name)}: its experts make images of that size")
    k_parent = int(manifest["num_clusters"])
    if cfg.growth.assignment == "nearest" and cfg.num_clusters != k_parent:
        raise ConfigError(f"spec.clustering.numClusters is {cfg.num_clusters} but growth.assignment nearest keeps "
                          f"the parent's {k_parent} clusters: set it to {k_parent}")
    if cfg.growth.assignment == "new-clusters" and cfg.num_clusters <= k_parent:
        raise ConfigError(f"spec.clustering.numClusters is {cfg.num_clusters}: with growth.assignment newClusters "
                          f"it counts the parent's {k_parent} clusters and the new ones, so it must exceed {k_parent}")
    centroids: dict[str, np.ndarray] = {}
    if cfg.method == "kmeans":
        with np.load(io.BytesIO(pstore.read_committed(layout.CLUSTERING, CENTROIDS)), allow_pickle=False) as z:
            centroids = {name: z[name] for name in z.files}
    return Parent(pstore, k_parent, committed_experts(pstore), centroids)


def grow_kmeans(features: np.ndarray, parent: Parent, cfg: ClusterConfig, device: str | None = None) -> Clustering:
    """features (N, D) of the new data -> its clusters in the grown run's ids, and the centroids of both."""
    assert cfg.growth is not None
    fine_p, coarse_p = parent.centroids["fine"], parent.centroids["coarse"]
    f2c_p, counts_p = parent.centroids["fine_to_coarse"], parent.centroids["fine_counts"]
    if features.shape[1] != fine_p.shape[1]:
        raise DataError(f"the encoder gives {features.shape[1]}-d features but the parent's centroids are "
                        f"{fine_p.shape[1]}-d ({parent.store.url(layout.CLUSTERING)})")
    if cfg.growth.assignment == "nearest":
        index = import_faiss().IndexFlatL2(fine_p.shape[1])
        index.add(np.ascontiguousarray(fine_p, dtype=np.float32))
        _, nearest = index.search(np.ascontiguousarray(features, dtype=np.float32), 1)  # (N, 1)
        fine = nearest[:, 0].astype(np.int64)
        counts = counts_p + np.bincount(fine, minlength=len(fine_p))
        return Clustering(f2c_p[fine], fine, fine_p, coarse_p, f2c_p, counts, len(fine_p))
    new = hierarchical_kmeans(features, cfg.num_clusters - parent.num_clusters, cfg.fine_clusters, cfg.seed,
                              cfg.kmeans_iters, cfg.max_cluster_fraction, device)
    k, f = parent.num_clusters, len(fine_p)
    return Clustering(new.cluster + k, new.fine + f, np.concatenate([fine_p, new.fine_centroids]),
                      np.concatenate([coarse_p, new.coarse_centroids]),
                      np.concatenate([f2c_p, new.fine_to_coarse + k]), np.concatenate([counts_p, new.fine_counts]),
                      new.fine_used)


def grow_random(n: int, parent: Parent, cfg: ClusterConfig) -> np.ndarray:
    """The ablation's growth: a random share of the parent's clusters, or random new clusters. (N,) int64."""
    assert cfg.growth is not None
    if cfg.growth.assignment == "nearest":
        return random_partition(n, parent.num_clusters, cfg.seed)
    return random_partition(n, cfg.num_clusters - parent.num_clusters, cfg.seed) + parent.num_clusters


def growth_meta(parent: Parent, cfg: ClusterConfig, sizes: list[int]) -> dict[str, Any]:
    """What the clustering manifest says of the growth: the planner and the sampler read ``parent``."""
    assert cfg.growth is not None
    return {"parent": {"uri": cfg.growth.parent_uri, "num_clusters": parent.num_clusters, "experts": parent.experts},
            "assignment": cfg.growth.assignment,
            "grown": [k for k in range(parent.num_clusters) if sizes[k] > 0],
            "new_clusters": list(range(parent.num_clusters, cfg.num_clusters))}
