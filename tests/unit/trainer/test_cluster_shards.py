"""Per-cluster shards: written and indexed by the cluster stage, read by an expert alone (its cluster, its rank's
shards, lazily), decoded in worker processes with exact resume, and the fallback for runs clustered before them."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddm_trainer import layout
from ddm_trainer.cluster_shards import (SHARD_MULTIPLE, ClusterShards, load_shard_index, open_cluster_shards,
                                        shard_sizes, write_cluster_shards)
from ddm_trainer.clustering import Assignments, load_assignments
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.configs.common import DataConfig
from ddm_trainer.data import open_source, tar_members
from ddm_trainer.errors import DataError
from ddm_trainer.stages.cluster import run as run_cluster
from ddm_trainer.store import FileStore, open_store

K = 4


class RecordingStore(FileStore):
    """A file store that remembers which keys were read."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.reads: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get_bytes(key)


def _cluster_config(run: Path, shards: Path, **data: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "run_uri": str(run), "device": "cpu", "num_clusters": K, "method": "random", "examples_per_cluster": 0,
        "data": {"uri": str(shards), "image_size": 16, "channels": 1, **data}})


@pytest.fixture(scope="module")
def clustered(fashion_mnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose cluster stage committed a random 4-way partition of the 2000 images, and its shards."""
    run = tmp_path_factory.mktemp("clustered") / "run"
    run_cluster(_cluster_config(run, fashion_mnist_shards))
    return run


def _data(fashion_mnist_shards: Path, **overrides: Any) -> DataConfig:
    return DataConfig(**{"uri": str(fashion_mnist_shards), "image_size": 16, "channels": 1, **overrides})


def _cluster(run: Path, k: int, data: DataConfig, store: FileStore | None = None) -> ClusterShards:
    shards = open_cluster_shards(store or FileStore(run), k, data)
    assert shards is not None
    return shards


def _epoch_keys(stream: Any) -> list[str]:
    return [key for _ in range(stream.batches_per_epoch) for key in next(stream).keys]


def test_shard_sizes_are_near_equal_and_a_multiple_of_eight() -> None:
    assert shard_sizes(500, 4096) == [63] * 4 + [62] * 4
    assert shard_sizes(10_000, 1000) == [625] * 16  # 10 shards needed, rounded up to 16
    assert shard_sizes(5, 4096) == [1] * 5 and shard_sizes(0, 10) == []


def test_cluster_stage_writes_each_clusters_shards_and_indexes_them(clustered: Path,
                                                                    fashion_mnist_shards: Path) -> None:
    store = open_store(str(clustered))
    assignments = load_assignments(store)
    index = load_shard_index(store)
    assert index is not None and len(index.clusters) == K and index.labeled and index.num_classes == 10
    source = open_source(_data(fashion_mnist_shards))
    labels = source.labels()
    for k, shards in enumerate(index.clusters):
        assert len(shards) % SHARD_MULTIPLE == 0 and sum(s.samples for s in shards) == assignments.sizes[k]
        assert [s.key for s in shards] == [layout.cluster_shard(k, j) for j in range(len(shards))]
        names = [name for s in shards for name, _ in tar_members((clustered / s.key).read_bytes(), s.key)]
        keys = assignments.keys_of(k)
        assert names == [f"{key}.{ext}" for key in keys for ext in ("png", "cls")]  # the cluster's, in data order
        members = dict(tar_members((clustered / shards[0].key).read_bytes(), shards[0].key))
        assert members[f"{keys[0]}.png"] == source.encoded(keys[0])[1]  # image bytes as stored, not re-encoded
        assert members[f"{keys[0]}.cls"] == str(labels[keys[0]]).encode()


def test_rerun_with_the_same_config_is_a_noop(clustered: Path, fashion_mnist_shards: Path) -> None:
    store = open_store(str(clustered))
    before = store.read_manifest(layout.CLUSTER_SHARDS)
    again = run_cluster(_cluster_config(clustered, fashion_mnist_shards, workers=3))  # workers: not the result
    assert again["committed_at"] == store.read_manifest(layout.CLUSTERING)["committed_at"]
    assert store.read_manifest(layout.CLUSTER_SHARDS) == before


def test_clustering_from_before_shards_falls_back_then_gets_them_on_rerun(clustered: Path, tmp_path: Path,
                                                                          fashion_mnist_shards: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run_cluster(_cluster_config(run, fashion_mnist_shards))
    shutil.rmtree(run / layout.CLUSTER_SHARDS)  # what a run committed before this change looks like
    store = open_store(str(run))
    assert open_cluster_shards(store, 0, _data(fashion_mnist_shards)) is None
    assert "no per-cluster shards are committed" in capsys.readouterr().err
    clustered_at = store.read_manifest(layout.CLUSTERING)["committed_at"]
    run_cluster(_cluster_config(run, fashion_mnist_shards))  # writes only the missing shards
    assert store.read_manifest(layout.CLUSTERING)["committed_at"] == clustered_at
    assert load_shard_index(store) == load_shard_index(open_store(str(clustered)))  # deterministic bytes
    assert open_cluster_shards(store, 0, _data(fashion_mnist_shards, uri=str(tmp_path))) is None  # other data


def test_same_samples_as_the_whole_dataset_reader(clustered: Path, fashion_mnist_shards: Path) -> None:
    data = _data(fashion_mnist_shards)
    stream = _cluster(clustered, 2, data).stream(batch_size=50, seed=0, workers=0)
    batches = [next(stream) for _ in range(stream.batches_per_epoch)]
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(load_assignments(open_store(str(clustered))).keys_of(2))  # 500: all of cluster 2
    whole = open_source(data).load(batches[0].keys)
    assert torch.equal(batches[0].images, whole.images) and torch.equal(batches[0].labels, whole.labels)
    assert keys != sorted(keys)  # shuffled


def test_an_expert_reads_only_its_clusters_shards_and_lazily(clustered: Path, fashion_mnist_shards: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = RecordingStore(clustered)
    shards = _cluster(clustered, 1, _data(fashion_mnist_shards), store)
    monkeypatch.setenv("DDM_DATA_CACHE_BYTES", str(3 * max(s.bytes for s in shards.shards)))  # 1-shard windows
    stream = shards.stream(batch_size=20, seed=0, workers=0)
    store.reads.clear()
    first = next(stream)
    assert all(k.startswith(f"{layout.CLUSTER_SHARDS}/001/") for k in store.reads)
    assert 1 <= len(set(store.reads)) <= 2  # the first window and the next: not all 8 shards at start-up
    assert set(first.keys) <= set(load_assignments(open_store(str(clustered))).keys_of(1))
    for _ in range(stream.batches_per_epoch):
        next(stream)
    assert set(store.reads) == {s.key for s in shards.shards}  # an epoch later: every shard of cluster 1, only


def test_each_rank_reads_only_its_own_shards(clustered: Path, fashion_mnist_shards: Path) -> None:
    per_rank = []
    for rank in range(2):
        store = RecordingStore(clustered)
        shards = _cluster(clustered, 0, _data(fashion_mnist_shards), store)
        store.reads.clear()  # the index
        stream = shards.stream(batch_size=25, seed=4, rank=rank, world_size=2, workers=0)
        assert stream.owns_shards
        per_rank.append(_epoch_keys(stream) + _epoch_keys(stream))
        assert set(store.reads) == {s.key for s in shards.shards[rank::2]}
    assert not set(per_rank[0]) & set(per_rank[1])


@pytest.mark.parametrize("world_size", [2, 3], ids=["whole-shards", "every-3rd-sample"])
def test_ranks_are_disjoint_and_take_equal_steps(clustered: Path, fashion_mnist_shards: Path,
                                                 world_size: int) -> None:
    shards = _cluster(clustered, 3, _data(fashion_mnist_shards))
    streams = [shards.stream(batch_size=16, seed=1, rank=r, world_size=world_size, workers=0)
               for r in range(world_size)]
    assert len({s.batches_per_epoch for s in streams}) == 1 and streams[0].owns_shards == (world_size == 2)
    epochs = [set(_epoch_keys(s)) for s in streams]
    assert all(len(e) == streams[0].batches_per_epoch * 16 for e in epochs)
    assert sum(len(e) for e in epochs) == len(set().union(*epochs))  # disjoint
    assert sum(len(e) for e in epochs) >= len(shards) - world_size * 16  # only the tail that fills no batch drops


@pytest.mark.parametrize("windowed", [False, True], ids=["one-window", "one-shard-windows"])
def test_resume_with_decode_workers_continues_the_uninterrupted_order(clustered: Path, fashion_mnist_shards: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      windowed: bool) -> None:
    shards = _cluster(clustered, 2, _data(fashion_mnist_shards))
    if windowed:
        monkeypatch.setenv("DDM_DATA_CACHE_BYTES", str(3 * max(s.bytes for s in shards.shards)))
    reference = shards.stream(batch_size=32, seed=5, workers=0)
    want, want_states = [], []
    for _ in range(40):  # 15 batches an epoch: crosses two epoch boundaries
        want.append(next(reference))
        want_states.append(reference.state_dict())
    first = shards.stream(batch_size=32, seed=5, workers=2, prefetch=3)
    for i in range(20):
        assert next(first).keys == want[i].keys
        assert first.state_dict() == want_states[i]  # the last batch handed out, not the last one decoded
    state = first.state_dict()
    first.close()
    resumed = shards.stream(batch_size=32, seed=5, workers=2, prefetch=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    try:
        for i in range(20, 40):
            got = next(resumed)
            assert got.keys == want[i].keys
            assert torch.equal(got.images, want[i].images) and torch.equal(got.labels, want[i].labels)
        assert resumed.state_dict() == want_states[-1]
    finally:
        resumed.close()
    assert resumed._executor is None and resumed._thread is None


def test_state_of_another_reader_or_stream_is_refused(clustered: Path, fashion_mnist_shards: Path) -> None:
    data = _data(fashion_mnist_shards)
    shards = _cluster(clustered, 0, data)
    keys = load_assignments(open_store(str(clustered))).keys_of(0)
    whole = open_source(data).stream(batch_size=10, seed=0, keys=keys)
    stream = shards.stream(batch_size=10, seed=0, workers=0)
    with pytest.raises(DataError, match="whole-dataset reader"):
        stream.load_state_dict(whole.state_dict())
    with pytest.raises(DataError, match="seed=1"):
        stream.load_state_dict({**stream.state_dict(), "seed": 1})


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def test_a_corrupt_image_reaches_the_consumer_as_data_error(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        for i in range(16):
            data = b"\x89PNG not really" if i == 11 else _png(i)
            info = tarfile.TarInfo(f"s{i:02d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = DataConfig(uri=str(tmp_path / "bad-000000.tar"), image_size=8, channels=1, class_field=None)
    source = open_source(data)
    store = FileStore(tmp_path / "run")
    write_cluster_shards(store, source, Assignments(source.keys(), np.zeros(16, dtype=np.int64), 1, [16]))
    stream = _cluster(tmp_path / "run", 0, data, store).stream(batch_size=16, seed=0, workers=2)
    with pytest.raises(DataError, match=r"corrupt image in shard .*clustering/shards/000/000-0000\d\d.tar key s11"):
        next(stream)
    assert stream._executor is None and stream._thread is None  # workers shut down, not left running


def test_a_tampered_shard_is_data_error(clustered: Path, tmp_path: Path, fashion_mnist_shards: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(clustered, run)
    shards = _cluster(run, 0, _data(fashion_mnist_shards))
    path = run / shards.shards[3].key
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(DataError, match="000-000003.tar does not match its index"):
        shards.fetch(3)


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_reader_fast_path_matches_tarfile() -> None:
    split_name = "p" * 90 + "/" + "b" * 20 + ".png"  # > 100 characters: ustar keeps "p"*90 in its prefix field
    members = [("a/short.png", b"x" * 700), (split_name, b"split"), ("c.cls", b"3")]
    assert tar_members(_tar_bytes(members, tarfile.USTAR_FORMAT), "x.tar") == members
    long_names = members + [("q" * 150 + ".png", b"pax header")]  # too long for ustar: tarfile's path
    assert tar_members(_tar_bytes(long_names, tarfile.PAX_FORMAT), "y.tar") == long_names
    with pytest.raises(DataError, match="corrupt shard z.tar"):
        tar_members(_tar_bytes(members, tarfile.USTAR_FORMAT)[:700], "z.tar")


@pytest.mark.parametrize("has_shards", [True, False], ids=["cluster-shards", "clustered-before-shards"])
def test_expert_stage_trains_on_its_cluster_either_way(clustered: Path, tmp_path: Path, fashion_mnist_shards: Path,
                                                       capsys: pytest.CaptureFixture[str], has_shards: bool) -> None:
    from ddm_trainer.checkpoint import load_latest_checkpoint
    from ddm_trainer.configs.expert import ExpertConfig
    from ddm_trainer.stages import expert

    run = tmp_path / "run"
    shutil.copytree(clustered, run)
    if not has_shards:
        shutil.rmtree(run / layout.CLUSTER_SHARDS)
    torch.set_num_threads(1)
    expert.run(ExpertConfig.model_validate({
        "run_uri": str(run), "device": "cpu", "cluster_index": 1, "model": "DiT-T/4", "class_cond": True,
        "num_classes": 10, "data": _data(fashion_mnist_shards, workers=2).model_dump(mode="json"),
        "train": {"steps": 3, "batch_size": 8, "ckpt_every": 2, "precision": "fp32", "compile": False},
        "sample_grid": {"count": 4, "nrow": 2, "steps": 2}}))
    store = open_store(str(run))
    assert store.read_manifest(layout.final(layout.expert(1))) is not None
    _, state = load_latest_checkpoint(store, layout.expert(1))
    stream_state = state["per_rank"][0]["stream"]
    assert stream_state["pos"] == 16 and stream_state.get("reader") == ("cluster-shards" if has_shards else None)
    assert ("reading" in capsys.readouterr().err) != has_shards  # the fallback says it reads the data whole


def test_skipped_samples_are_never_handed_out_resume_is_exact_and_load_ids_reads_them(
        clustered: Path, fashion_mnist_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's held-out samples: positions over every cluster's shards that its stream never hands out, read
    back by position (one shard at a time) for its evaluation."""
    from ddm_trainer.cluster_shards import open_all_shards

    store = FileStore(clustered)
    shards = open_all_shards(store, _data(fashion_mnist_shards))
    monkeypatch.setenv("DDM_DATA_CACHE_BYTES", str(3 * max(s.bytes for s in shards.shards)))  # one-shard windows
    skip = np.random.default_rng(0).choice(len(shards), 100, replace=False)
    keys_in_order = [key for s in range(len(shards.shards)) for key, _ in shards.fetch(s)]
    held = shards.load_ids(skip)
    assert held.keys == [keys_in_order[i] for i in sorted(skip)]  # ascending positions, their own samples
    assert torch.equal(held.images, open_source(_data(fashion_mnist_shards)).load(held.keys).images)

    reference = shards.stream(batch_size=50, seed=3, workers=0, skip=skip)
    assert reference.batches_per_epoch == (len(shards) - 100) // 50
    want = [next(reference) for _ in range(2 * reference.batches_per_epoch + 3)]  # over two epoch boundaries
    seen = {k for b in want for k in b.keys}
    assert seen == set(keys_in_order) - set(held.keys)  # everything else, nothing held out
    first = shards.stream(batch_size=50, seed=3, workers=0, skip=skip)
    for i in range(20):
        assert next(first).keys == want[i].keys
    resumed = shards.stream(batch_size=50, seed=3, workers=0, skip=skip)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [next(resumed).keys for _ in range(20, len(want))] == [b.keys for b in want[20:]]
    other = shards.stream(batch_size=50, seed=3, workers=0, skip=skip[:50])  # another held-out set: refused
    with pytest.raises(DataError, match="num_samples=1900, this stream has 1950"):
        other.load_state_dict(first.state_dict())


def test_allocated_steps_split_the_equal_total_by_cluster_size() -> None:
    from ddm_trainer.clustering import allocated_steps

    assert allocated_steps(100, [250, 250, 250, 250]) == [100] * 4
    # lease G's clusters: the 51% cluster gets 51% of the 4 x 5,859 steps, and the total stays
    sizes = [6977, 8758, 25719, 8546]
    steps = allocated_steps(5859, sizes)
    assert sum(steps) == 4 * 5859 and steps[2] == 12055 and steps[0] == 3270
    assert allocated_steps(2, [100, 1500, 200, 200]) == [1, 6, 1, 1]  # a non-empty cluster still trains
    assert allocated_steps(3, [0, 10]) == [0, 6]
    with pytest.raises(ValueError, match="non-empty"):
        allocated_steps(3, [0, 0])


def test_a_proportional_expert_trains_its_clusters_share_of_the_steps(clustered: Path, tmp_path: Path,
                                                                      fashion_mnist_shards: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """steps_allocation proportional: train.steps is the experts' mean; expert 1, holding 3/4 of the (pretended)
    data, trains 6 of the 4 x 2 steps, and its manifest, committed config and progress total say so."""
    import ddm_trainer.clustering as clustering
    from ddm_trainer.configs.expert import ExpertConfig
    from ddm_trainer.stages import expert

    real = clustering.load_assignments

    def skewed(store: Any) -> Assignments:
        a = real(store)
        return Assignments(a.keys, a.cluster, a.num_clusters, [100, 1500, 200, 200], a.meta)

    monkeypatch.setattr(clustering, "load_assignments", skewed)
    run = tmp_path / "run"
    shutil.copytree(clustered, run)
    torch.set_num_threads(1)
    expert.run(ExpertConfig.model_validate({
        "run_uri": str(run), "device": "cpu", "cluster_index": 1, "model": "DiT-T/4",
        "steps_allocation": "proportional",
        "data": _data(fashion_mnist_shards).model_dump(mode="json"),
        "train": {"steps": 2, "batch_size": 8, "ckpt_every": 100, "precision": "fp32", "compile": False},
        "sample_grid": {"count": 0}}))
    store = open_store(str(run))
    final = layout.final(layout.expert(1))
    manifest = store.read_manifest(final)
    assert manifest is not None and manifest["step"] == 6
    config = json.loads(store.read_committed(final, "config.json"))
    assert (config["stage"]["train"]["steps"], config["stage"]["steps_allocation"]) == (6, "proportional")
    reported = [json.loads(line.removeprefix("DDM_PROGRESS ")) for line in capsys.readouterr().out.splitlines()
                if line.startswith("DDM_PROGRESS ")]
    assert {r["total"] for r in reported if r["stage"] == "expert"} == {6}  # the status's total_steps
