"""The file store's commit protocol: readers trust only what a manifest names."""
from __future__ import annotations

import pytest

from ddm_trainer.errors import ConfigError, MissingArtifactError
from ddm_trainer.store import FileStore, open_store


def test_commit_then_read(tmp_path):
    store = open_store(str(tmp_path))
    assert store.read_manifest("a") is None
    store.commit("a", {"x.bin": b"123"}, {"step": 3})
    assert store.read_manifest("a")["step"] == 3
    assert store.read_committed("a", "x.bin") == b"123"
    assert store.committed_prefixes("") == ["a"]


def test_data_without_manifest_is_not_committed(tmp_path):
    store = FileStore(tmp_path)
    store.put_bytes("ckpt/step-1/state.pt", b"half")
    assert store.committed_prefixes("ckpt") == []
    with pytest.raises(MissingArtifactError, match="no committed manifest"):
        store.read_committed("ckpt/step-1", "state.pt")


def test_torn_file_detected_by_hash(tmp_path):
    store = FileStore(tmp_path)
    store.commit("c", {"w": b"good"})
    (tmp_path / "c" / "w").write_bytes(b"bad!")
    with pytest.raises(MissingArtifactError, match="hash"):
        store.read_committed("c", "w")


@pytest.mark.parametrize("uri", ["ftp://x/y", "s3://", "file://host/x"])
def test_bad_uris_are_config_errors(uri):
    with pytest.raises(ConfigError):
        open_store(uri)
