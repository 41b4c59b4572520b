"""Data input: shards, folders, IDX; deterministic, rank-disjoint, exactly resumable streams; clear errors."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from ddm_trainer.configs.common import DataConfig
from ddm_trainer.data import expand_braces, open_source
from ddm_trainer.datasets import Sample, write_shards
from ddm_trainer.errors import DataError
from ddm_trainer.store import FileStore


def _tiny_samples(n: int, size: int = 10) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(key=f"s{i:04d}", image=rng.integers(0, 256, (size, size), dtype=np.uint8), cls=i % 3)
            for i in range(n)]


def test_fashion_mnist_shards_read_back(fashion_mnist_data_config):
    src = open_source(fashion_mnist_data_config(channels=3, image_size=16))
    keys = src.keys()
    assert len(keys) == 2000 and keys[0] == "train-000000" and keys == sorted(keys)
    assert src.num_classes == 10
    labels = src.labels()
    assert set(labels.values()) == set(range(10))
    batch = src.load(keys[:5])
    assert batch.images.shape == (5, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1 and batch.images.min() < -0.9
    assert torch.equal(batch.images[:, 0], batch.images[:, 1])  # gray -> RGB replicates the channel
    assert batch.labels.tolist() == [labels[k] for k in keys[:5]]


def test_idx_matches_shards_and_split_fragment(fashion_mnist_dir, fashion_mnist_data_config):
    idx = open_source(DataConfig(uri=str(fashion_mnist_dir), image_size=32, channels=1, limit=50))
    shards = open_source(fashion_mnist_data_config())
    assert idx.keys() == shards.keys()[:50]
    assert torch.equal(idx.load(idx.keys()[:8]).images, shards.load(idx.keys()[:8]).images)  # PNG is lossless
    test = open_source(DataConfig(uri=f"{fashion_mnist_dir}#t10k", image_size=32, channels=1))
    assert len(test.keys()) == 10000 and test.keys()[0] == "t10k-000000"


def test_stream_resumes_bitwise(fashion_mnist_data_config):
    src = open_source(fashion_mnist_data_config())
    stream = src.stream(batch_size=64, seed=7)
    for _ in range(40):  # 31 batches per epoch: crosses an epoch boundary
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(3)]
    resumed = open_source(fashion_mnist_data_config()).stream(batch_size=64, seed=7)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert got.keys == want.keys
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


def test_epochs_are_permutations_and_seed_matters(fashion_mnist_data_config):
    src = open_source(fashion_mnist_data_config(limit=300))
    stream = src.stream(batch_size=50, seed=1)
    epoch0 = [k for _ in range(6) for k in next(stream).keys]
    epoch1 = [k for _ in range(6) for k in next(stream).keys]
    assert sorted(epoch0) == sorted(epoch1) == src.keys()
    assert epoch0 != epoch1 and epoch0 != src.keys()
    other = [k for _ in range(6) for k in next(src.stream(batch_size=50, seed=2)).keys]
    assert other[:50] != epoch0[:50]


def test_ranks_are_disjoint_and_cover(fashion_mnist_data_config):
    src = open_source(fashion_mnist_data_config(limit=301))
    per_rank = []
    for rank in range(3):
        stream = src.stream(batch_size=25, seed=3, rank=rank, world_size=3)
        per_rank.append([k for _ in range(stream.batches_per_epoch) for k in next(stream).keys])
    sets = [set(keys) for keys in per_rank]
    assert all(len(s) == 100 for s in sets)  # 301 // 3 each, the remainder dropped so ranks take equal steps
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_key_selection(fashion_mnist_data_config):
    src = open_source(fashion_mnist_data_config())
    chosen = src.keys()[100:140]
    stream = src.stream(batch_size=10, seed=0, keys=chosen)
    seen = {k for _ in range(4) for k in next(stream).keys}
    assert seen == set(chosen)
    with pytest.raises(DataError, match="empty key selection"):
        src.stream(batch_size=10, seed=0, keys=[])
    with pytest.raises(DataError, match="not in"):
        src.stream(batch_size=10, seed=0, keys=["nope"])


def test_braces_globs_and_gzip(tmp_path):
    write_shards(_tiny_samples(30), tmp_path, shard_size=10, prefix="d", gzip=True)
    assert expand_braces("d-{000000..000002}.tar.gz") == [f"d-00000{i}.tar.gz" for i in range(3)]
    braces = open_source(DataConfig(uri=str(tmp_path / "d-{000000..000001}.tar.gz"), image_size=8, channels=3))
    assert braces.keys() == [f"s{i:04d}" for i in range(20)]
    globbed = open_source(DataConfig(uri=str(tmp_path / "d-*.tar.gz"), image_size=8))
    assert len(globbed.keys()) == 30 and globbed.num_classes == 3


def test_image_folder_with_classes_and_flat(tmp_path):
    from PIL import Image

    for cls in ("cat", "ant"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 12), (i * 40, 0, 0)).save(tmp_path / "tree" / cls / f"{i}.png")
    src = open_source(DataConfig(uri=str(tmp_path / "tree"), image_size=8, channels=3))
    assert src.keys()[:2] == ["ant/0", "ant/1"] and src.num_classes == 2
    assert src.labels()["cat/2"] == 1  # sorted folder names: ant=0, cat=1
    assert src.load(["cat/2"]).images.shape == (1, 3, 8, 8)  # 20x12 center-cropped to square, resized
    flat = open_source(DataConfig(uri=str(tmp_path / "tree" / "cat"), image_size=8, channels=1))
    assert flat.keys() == ["0", "1", "2"] and flat.labels() is None


def test_shards_under_run_store(tmp_path):
    write_shards(_tiny_samples(12), tmp_path / "run" / "data", shard_size=5)
    store = FileStore(tmp_path / "run")
    src = open_source(DataConfig(uri="data", image_size=8), store=store)
    assert len(src.keys()) == 12


def test_missing_shard_names_path(tmp_path):
    write_shards(_tiny_samples(10), tmp_path, shard_size=5, prefix="d")
    with pytest.raises(DataError, match=f"data path {tmp_path}/d-000002.tar does not exist"):
        open_source(DataConfig(uri=str(tmp_path / "d-{000000..000007}.tar")))
    with pytest.raises(DataError, match="nowhere"):
        open_source(DataConfig(uri=str(tmp_path / "nowhere")))


def test_corrupt_image_names_shard_and_key(tmp_path):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("good.png", _png()), ("broken.png", b"\x89PNG not really")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = open_source(DataConfig(uri=str(shard), image_size=8))
    assert src.load(["good"]).images.shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"bad-000000.tar key broken"):
        src.load(["broken"])


def test_truncated_shard_is_data_error(tmp_path):
    write_shards(_tiny_samples(5), tmp_path, shard_size=5, prefix="t", gzip=True)
    path = tmp_path / "t-000000.tar.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt shard .*t-000000.tar.gz"):
        open_source(DataConfig(uri=str(path)))


def test_grouped_shuffle_when_over_budget(tmp_path, monkeypatch):
    write_shards(_tiny_samples(40), tmp_path, shard_size=10)
    monkeypatch.setenv("DDM_DATA_CACHE_BYTES", "2000")  # smaller than the data: shard-at-a-time order
    src = open_source(DataConfig(uri=str(tmp_path), image_size=8))
    stream = src.stream(batch_size=10, seed=0)
    batches = [next(stream).keys for _ in range(4)]
    assert sorted(k for b in batches for k in b) == src.keys()
    assert all(len({int(k[1:]) // 10 for k in b}) == 1 for b in batches)  # each batch from one shard


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("grouped", [False, True], ids=["in-memory", "shard-at-a-time"])
def test_prefetch_gives_the_same_batches_and_states(tmp_path, monkeypatch, grouped):
    write_shards(_tiny_samples(60), tmp_path, shard_size=10)
    if grouped:
        monkeypatch.setenv("DDM_DATA_CACHE_BYTES", "2000")
    plain = open_source(DataConfig(uri=str(tmp_path), image_size=8)).stream(batch_size=7, seed=3)
    ahead = open_source(DataConfig(uri=str(tmp_path), image_size=8)).stream(batch_size=7, seed=3, prefetch=3)
    for _ in range(20):  # 8 batches per epoch: crosses two epoch boundaries
        want, got = next(plain), next(ahead)
        assert got.keys == want.keys and torch.equal(got.images, want.images)
        assert ahead.state_dict() == plain.state_dict()  # the last batch handed out, not the last one decoded
    state = ahead.state_dict()
    expected = [next(plain).keys for _ in range(5)]
    ahead.load_state_dict(state)  # drops what was decoded ahead, continues from the state
    assert [next(ahead).keys for _ in range(5)] == expected
    ahead.close()
    assert ahead._thread is None and ahead.state_dict() == plain.state_dict()


def test_prefetch_hands_a_decode_error_to_the_consumer(tmp_path):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.png", _png()), ("b.png", _png()), ("broken.png", b"\x89PNG not really")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = open_source(DataConfig(uri=str(shard), image_size=8)).stream(batch_size=3, seed=0, prefetch=2)
    with pytest.raises(DataError, match=r"bad-000000.tar key broken"):
        next(stream)
    assert stream._thread is None  # the failed thread is gone, not left spinning
