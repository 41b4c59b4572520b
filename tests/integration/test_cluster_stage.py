"""The cluster stage on real data (Fashion-MNIST shards): clustering finds classes, random does not; the CLI's
errors and exit codes; an s3:// run against the real S3 server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddm_trainer import layout
from ddm_trainer.clustering import load_assignments, mixture_counts
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.data import open_source
from ddm_trainer.errors import ConfigError, MissingArtifactError
from ddm_trainer.stages.cluster import run
from ddm_trainer.store import open_store


def _config(run_uri: str, shards: Path, **overrides) -> ClusterConfig:
    fields = {"run_uri": run_uri, "device": "cpu", "data": {"uri": str(shards), "image_size": 32, "channels": 1},
              "num_clusters": 10, "encoder": "raw-pixels", "seed": 0}
    fields.update(overrides)
    return ClusterConfig.model_validate(fields)


def test_kmeans_finds_classes_random_does_not(tmp_path, fashion_mnist_shards):
    # measured on these 2000 images: raw-pixels k-means NMI 0.51-0.63 over seeds, random ~0.01
    kmeans = run(_config(str(tmp_path / "km"), fashion_mnist_shards))
    random = run(_config(str(tmp_path / "rnd"), fashion_mnist_shards, method="random"))
    assert kmeans["nmi"] > 0.4 and random["nmi"] < 0.05
    assert sum(kmeans["sizes"]) == 2000 and min(kmeans["sizes"]) > 0
    assert kmeans["fine_clusters_used"] == 2000 // 39  # 1024 requested, clamped to the data

    a = load_assignments(open_store(str(tmp_path / "km")))
    assert a.num_clusters == 10 and a.sizes == kmeans["sizes"] and len(a.keys) == 2000
    # p(k | y) for the oracle strategy: each cluster's class counts, in the manifest and as recounted from the data
    counts = np.asarray(kmeans["class_counts"])
    assert counts.shape == (10, 10) and counts.sum(axis=1).tolist() == kmeans["sizes"]
    assert np.array_equal(mixture_counts(open_store(str(tmp_path / "km"))), counts)
    labels = open_source(_config("x", fashion_mnist_shards).data).labels()
    by_hand = np.zeros((10, 10), dtype=np.int64)
    for key, c in zip(a.keys, a.cluster.tolist()):
        by_hand[c, labels[key]] += 1
    assert np.array_equal(counts, by_hand)
    assert sorted(k for c in range(10) for k in a.keys_of(c)) == sorted(a.keys)
    files = os.listdir(tmp_path / "km" / layout.CLUSTERING)
    assert {"MANIFEST.json", "assignments.npz", "centroids.npz", "config.json", "examples.png"} <= set(files)
    from PIL import Image

    with Image.open(tmp_path / "km" / layout.CLUSTERING / "examples.png") as grid:
        assert grid.size[1] > 10 * 32  # one row of examples per cluster


def test_deterministic_for_a_seed_and_rerun_is_noop(tmp_path, fashion_mnist_shards):
    first = run(_config(str(tmp_path / "a"), fashion_mnist_shards, num_clusters=4, seed=5))
    second = run(_config(str(tmp_path / "b"), fashion_mnist_shards, num_clusters=4, seed=5))
    a, b = (load_assignments(open_store(str(tmp_path / d))) for d in ("a", "b"))
    assert a.keys == b.keys and np.array_equal(a.cluster, b.cluster) and first["sizes"] == second["sizes"]
    again = run(_config(str(tmp_path / "a"), fashion_mnist_shards, num_clusters=4, seed=5))
    assert again["committed_at"] == first["committed_at"]  # same config already committed: kept as is


def test_balance_bound_on_real_data(tmp_path, fashion_mnist_shards):
    result = run(_config(str(tmp_path), fashion_mnist_shards, max_cluster_fraction=0.13, examples_per_cluster=0))
    assert max(result["sizes"]) <= 0.13 * 2000 + 2000 // (2000 // 39)  # up to one fine cluster over the bound
    assert result["nmi"] > 0.3


def test_unknown_encoder_writes_nothing(tmp_path, fashion_mnist_shards):
    with pytest.raises(ConfigError, match="unknown encoder 'nope'"):
        run(_config(str(tmp_path), fashion_mnist_shards, encoder="nope"))
    assert open_store(str(tmp_path)).read_manifest(layout.CLUSTERING) is None
    with pytest.raises(MissingArtifactError, match="no committed clustering"):
        load_assignments(open_store(str(tmp_path)))


def _cli(config: dict, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "ddm_trainer.cli", "cluster", "--config", str(path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_errors_exit_codes(tmp_path, fashion_mnist_shards):
    good = {"run_uri": str(tmp_path / "run"), "device": "cpu", "num_clusters": 4, "encoder": "raw-pixels",
            "data": {"uri": str(fashion_mnist_shards), "image_size": 16, "channels": 1}}
    bad_key = _cli({**good, "num_clusterz": 3}, tmp_path)
    assert bad_key.returncode == 2 and "num_clusterz: unknown key" in bad_key.stderr
    assert len(bad_key.stderr.strip().splitlines()) == 1
    bad_encoder = _cli({**good, "encoder": "dinov9"}, tmp_path)
    assert bad_encoder.returncode == 2 and "unknown encoder 'dinov9'" in bad_encoder.stderr
    assert len(bad_encoder.stderr.strip().splitlines()) == 1
    missing = _cli({**good, "data": {**good["data"], "uri": str(tmp_path / "no-such-shards")}}, tmp_path)
    assert missing.returncode == 3 and "no-such-shards does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / layout.CLUSTERING / "MANIFEST.json").exists()


@pytest.mark.integration
def test_cli_on_s3_run(tmp_path, fashion_mnist_shards, s3_env):
    run_uri = s3_env.fresh_uri("cluster")
    config = {"run_uri": run_uri, "device": "cpu", "num_clusters": 4, "encoder": "raw-pixels", "seed": 1,
              "data": {"uri": str(fashion_mnist_shards), "image_size": 16, "channels": 1, "limit": 600}}
    done = _cli(config, tmp_path, s3_env.env())
    assert done.returncode == 0, done.stderr
    assert any('"event": "done"' in line for line in done.stdout.splitlines())
    store = open_store(run_uri)
    a = load_assignments(store)
    assert len(a.keys) == 600 and sum(a.sizes) == 600 and a.num_clusters == 4
    assert store.exists(f"{layout.PROGRESS}/cluster.json")
    missing_bucket = _cli({**config, "run_uri": "s3://no-such-bucket-x/run"}, tmp_path, s3_env.env())
    assert missing_bucket.returncode == 2 and "bucket 'no-such-bucket-x' does not exist" in missing_bucket.stderr
