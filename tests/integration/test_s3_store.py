"""The artifact store against a real S3 server (SeaweedFS): commit protocol, listing, deletes, errors."""
from __future__ import annotations

import pytest

from ddm_trainer.errors import ConfigError, MissingArtifactError, StoreError
from ddm_trainer.store import S3Store, open_store

pytestmark = pytest.mark.integration


def test_commit_read_list_delete_child(s3_env):
    store = open_store(s3_env.fresh_uri("store"))
    assert isinstance(store, S3Store)
    assert store.read_manifest("clustering") is None
    store.commit("clustering", {"a.npz": b"\x00\x01payload", "sub/b.json": b"{}"}, {"num_clusters": 4})
    assert store.read_manifest("clustering")["num_clusters"] == 4
    assert store.read_committed("clustering", "a.npz") == b"\x00\x01payload"
    assert store.list("clustering") == ["clustering/MANIFEST.json", "clustering/a.npz", "clustering/sub/b.json"]
    assert store.committed_prefixes("") == ["clustering"]

    child = store.child("clustering")
    assert child.uri == store.uri + "/clustering"
    assert child.get_bytes("sub/b.json") == b"{}"
    assert child.list() == ["MANIFEST.json", "a.npz", "sub/b.json"]

    store.put_bytes("other/x", b"x")
    store.delete_prefix("clustering")
    assert store.list("clustering") == []
    assert store.list() == ["other/x"]  # a sibling prefix survives
    with pytest.raises(MissingArtifactError, match="clustering/a.npz does not exist"):
        store.get_bytes("clustering/a.npz")


def test_torn_object_is_not_trusted(s3_env):
    store = open_store(s3_env.fresh_uri("torn"))
    store.commit("ckpt", {"w": b"good"})
    store.put_bytes("ckpt/w", b"bad!")
    with pytest.raises(MissingArtifactError, match="does not match its manifest hash"):
        store.read_committed("ckpt", "w")


def test_missing_bucket_is_config_error(s3_env):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket-ddm' does not exist"):
        open_store("s3://no-such-bucket-ddm/run")


def test_missing_endpoint_is_config_error(s3_env, monkeypatch):
    for name in ("DDM_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="DDM_S3_ENDPOINT"):
        open_store(f"s3://{s3_env.bucket}/run")


def test_explicit_credentials_replace_the_environment(s3_env, monkeypatch):
    """The operator opens a run's store with its credentials Secret's data, whatever its own environment holds."""
    writer = open_store(s3_env.fresh_uri("secret"))
    writer.commit("evaluation", {"results.json": b"{}"}, {"table": []})
    secret = {k: v for k, v in s3_env.env().items() if k.startswith(("DDM_S3", "AWS_"))}
    for name in ("DDM_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    reader = open_store(writer.uri, env=secret)
    assert reader.read_manifest("evaluation")["table"] == []
    wrong = open_store(writer.uri, check_bucket=False, env={**secret, "AWS_SECRET_ACCESS_KEY": "not-the-key"})
    with pytest.raises(StoreError):  # the server refuses a wrong key: the Secret's values are really what is used
        wrong.read_manifest("evaluation")


def test_data_shards_read_from_s3(s3_env, tmp_path):
    import numpy as np

    from ddm_trainer.configs.common import DataConfig
    from ddm_trainer.data import open_source
    from ddm_trainer.datasets import Sample, write_shards
    from ddm_trainer.errors import DataError

    rng = np.random.default_rng(0)
    paths = write_shards([Sample(f"k{i:03d}", rng.integers(0, 256, (8, 8), dtype=np.uint8), i % 2) for i in range(12)],
                         tmp_path, shard_size=5, prefix="s")
    uri = s3_env.fresh_uri("data")
    store = open_store(uri)
    for p in paths:
        store.put_file(f"shards/{p.name}", p)
    local = open_source(DataConfig(uri=str(tmp_path), image_size=8))
    remote = open_source(DataConfig(uri=f"{uri}/shards/s-{{000000..000002}}.tar", image_size=8))
    assert remote.keys() == local.keys() and remote.labels() == local.labels()
    assert (remote.load(["k007"]).images == local.load(["k007"]).images).all()
    under_run = open_source(DataConfig(uri="shards", image_size=8), store=store)  # a key under the run store
    assert len(under_run.keys()) == 12
    with pytest.raises(DataError, match=f"{uri}/shards/s-000009.tar"):
        open_source(DataConfig(uri=f"{uri}/shards/s-000009.tar"))
