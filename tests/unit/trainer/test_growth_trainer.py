"""Growing a DDM, the trainer's side: the new data's clusters beside the parent's, where a grown run's experts
live (by reference), its data as one union source; and the small-N FID the partial ensembles use."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddm_trainer import fid, layout
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.errors import ConfigError
from ddm_trainer.growth import Parent, grow_kmeans, open_parent
from ddm_trainer.lineage import committed_experts, expert_home
from ddm_trainer.store import FileStore


def _cfg(tmp_path: Path, k: int, assignment: str = "new-clusters", **extra: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "run_uri": str(tmp_path / "grown"), "data": {"uri": "/new", "image_size": 16, "channels": 1},
        "num_clusters": k, "fine_clusters": 4, "encoder": "raw-pixels",
        "growth": {"parent_uri": str(tmp_path / "parent"), "assignment": assignment}, **extra})


def _parent(k: int = 2) -> Parent:
    fine = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [11.0, 10.0]], dtype=np.float32)
    centroids = {"fine": fine, "coarse": np.array([[0.5, 0.0], [10.5, 10.0]], dtype=np.float32),
                 "fine_to_coarse": np.array([0, 0, 1, 1]), "fine_counts": np.array([40, 40, 40, 40])}
    return Parent(FileStore("/nonexistent"), k, [0, 1], centroids)


def test_nearest_assigns_through_the_parents_fine_centroids(tmp_path: Path) -> None:
    features = np.array([[0.9, 0.1], [10.2, 9.9], [0.1, -0.2]], dtype=np.float32)
    got = grow_kmeans(features, _parent(), _cfg(tmp_path, 2, "nearest"))
    assert got.cluster.tolist() == [0, 1, 0] and got.fine.tolist() == [1, 2, 0]
    assert got.fine_counts.tolist() == [41, 41, 41, 40]  # the parent's counts and the new samples


def test_new_clusters_are_numbered_after_the_parents(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(-20, 0.1, (60, 2)), rng.normal(30, 0.1, (60, 2))]).astype(np.float32)
    got = grow_kmeans(features, _parent(), _cfg(tmp_path, 4))
    assert set(got.cluster.tolist()) == {2, 3}  # two new clusters, after the parent's 0 and 1
    assert got.cluster[:60].tolist() == [got.cluster[0]] * 60  # each blob one cluster
    assert len(got.coarse_centroids) == 4 and got.fine_to_coarse[:4].tolist() == [0, 0, 1, 1]


def test_the_parent_is_checked_before_any_data_is_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spec.growth.parentUri .*: no committed clustering"):
        open_parent(_cfg(tmp_path, 3))
    parent = FileStore(tmp_path / "parent")
    config = {"method": "kmeans", "encoder": "raw-pixels", "encoder_weights": None, "encoder_resolution": None,
              "data": {"image_size": 16, "channels": 1}}
    parent.commit(layout.CLUSTERING, {}, {"num_clusters": 2, "config": config})
    with pytest.raises(ConfigError, match="spec.clustering.numClusters is 2: .* must exceed 2"):
        open_parent(_cfg(tmp_path, 2))
    with pytest.raises(ConfigError, match="spec.clustering.numClusters is 3 but growth.assignment nearest"):
        open_parent(_cfg(tmp_path, 3, "nearest"))
    with pytest.raises(ConfigError, match="spec.clustering.encoder is 'efficientnet_lite0' but the parent"):
        open_parent(_cfg(tmp_path, 3, encoder="efficientnet_lite0"))
    with pytest.raises(ConfigError, match="spec.dataset.imageSize is 32"):
        open_parent(_cfg(tmp_path, 3).model_copy(update={"data": _cfg(tmp_path, 3).data.model_copy(
            update={"image_size": 32})}))


def test_a_grown_runs_experts_are_read_where_they_were_committed(tmp_path: Path) -> None:
    grandparent, parent, child = (FileStore(tmp_path / n) for n in ("gp", "p", "c"))
    for k in (0, 1):
        grandparent.commit(layout.final(layout.expert(k)), {})
    parent.commit(layout.CLUSTERING, {}, {"parent": {"uri": grandparent.uri, "num_clusters": 2, "experts": [0, 1]}})
    parent.commit(layout.final(layout.expert(2)), {})
    child.commit(layout.CLUSTERING, {}, {"parent": {"uri": parent.uri, "num_clusters": 3, "experts": [0, 1, 2]}})
    child.commit(layout.final(layout.expert(3)), {})
    assert committed_experts(child) == [0, 1, 2, 3]
    assert [expert_home(child, k).uri for k in range(4)] == [grandparent.uri, grandparent.uri, parent.uri, child.uri]
    assert expert_home(child, 7).uri == child.uri  # nobody has it: named at the run's own store


def test_low_rank_fid_is_torchmetrics_fid() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(12, 48, generator=gen, dtype=torch.float64) * 2 + 0.5
    fake = torch.randn(9, 48, generator=gen, dtype=torch.float64)
    metric = FrechetInceptionDistance(feature=fid._Features(48), sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid.low_rank_fid(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)
    assert fid.fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)


def test_retrain_grown_starts_from_the_parents_weights_on_old_and_new_data(fashion_mnist_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Three generations in process: a K=2 parent, a child that assigns new data to the parent's clusters
    (nearest) and retrains the experts whose clusters grew, from the parent's weights, on both generations' shards
    (read where each generation committed them); the parent's files are never written."""
    from ddm_trainer.checkpoint import load_final
    from ddm_trainer.configs.expert import ExpertConfig
    from ddm_trainer.datasets import fashion_mnist_to_shards
    from ddm_trainer.grown_data import grown_cluster_shards
    from ddm_trainer.stages import expert
    from ddm_trainer.stages.cluster import run as run_cluster

    old, new = tmp_path / "old", tmp_path / "new"
    fashion_mnist_to_shards(old, limit=80, shard_size=80, source_dir=fashion_mnist_dir, classes=(1, 7))
    fashion_mnist_to_shards(new, limit=20, shard_size=20, source_dir=fashion_mnist_dir, classes=(7,))
    data = {"image_size": 16, "channels": 1, "workers": 0}
    parent, child = tmp_path / "parent", tmp_path / "child"
    common = {"num_clusters": 2, "fine_clusters": 2, "encoder": "raw-pixels", "examples_per_cluster": 0}
    run_cluster(ClusterConfig.model_validate({"run_uri": str(parent), "data": {"uri": str(old), **data}, **common}))
    torch.set_num_threads(1)
    train = {"steps": 2, "batch_size": 8, "ckpt_every": 2, "precision": "fp32", "compile": False}
    for k in (0, 1):
        expert.run(ExpertConfig.model_validate({"run_uri": str(parent), "device": "cpu", "cluster_index": k,
                                                "model": "DiT-T/4", "data": {"uri": str(old), **data},
                                                "train": train, "sample_grid": {"count": 0}}))
    before = {str(p): p.read_bytes() for p in sorted(parent.rglob("*")) if p.is_file()}
    run_cluster(ClusterConfig.model_validate({"run_uri": str(child), "data": {"uri": str(new), **data}, **common,
                                              "growth": {"parent_uri": str(parent), "assignment": "nearest"}}))
    pstore, cstore = FileStore(parent), FileStore(child)
    grown = cstore.read_manifest(layout.CLUSTERING)["grown"]
    assert grown, "the new sneakers land in one of the parent's clusters"
    k = grown[0]
    own = cstore.read_manifest(layout.CLUSTERING)["sizes"][k]
    old_k = pstore.read_manifest(layout.CLUSTERING)["sizes"][k]
    from ddm_trainer.cluster_shards import open_cluster_shards
    from ddm_trainer.configs.common import DataConfig

    cfg_data = DataConfig(uri=str(new), **data)
    both = grown_cluster_shards(cstore, k, cfg_data, open_cluster_shards(cstore, k, cfg_data))
    assert len(both) == own + old_k  # the cluster's old samples (the parent's shards) and its new ones
    assert both.shards[0].key.startswith("g0/") and both.fetch(0)  # the parent's shard, read from its store

    expert.run(ExpertConfig.model_validate({"run_uri": str(child), "device": "cpu", "cluster_index": k,
                                            "model": "DiT-T/4", "data": {"uri": str(new), **data},
                                            "train": {**train, "steps": 1}, "sample_grid": {"count": 0},
                                            "init_from_parent": True}))
    theirs = load_final(pstore, layout.expert(k))
    mine = load_final(cstore, layout.expert(k))
    # one AdamW step (lr 1e-4) from the parent's weights, not from a fresh initialisation
    drift = max((mine.model[n] - theirs.model[n]).abs().max().item() for n in theirs.model)
    assert 0 < drift < 1e-3
    assert committed_experts(cstore) == [0, 1] and expert_home(cstore, k).uri == cstore.uri
    assert expert_home(cstore, 1 - k).uri == pstore.uri  # the other one is still the parent's, by reference
    assert {str(p): p.read_bytes() for p in sorted(parent.rglob("*")) if p.is_file()} == before
