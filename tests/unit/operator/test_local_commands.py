"""``ddm status`` / run-directory resolution, from a real file store (no training)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ddm_operator.local.commands import load_spec, resolve_run, stage_rows
from ddm_trainer.errors import ConfigError
from ddm_trainer.store import FileStore

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "local-fashion-mnist.yaml"


def test_status_rows_come_from_manifests_and_progress(tmp_path: Path) -> None:
    obj = load_spec(EXAMPLE)
    store = FileStore(tmp_path)
    store.commit("clustering", {"sizes.json": b"[1, 2, 3]"})
    store.put_json("progress/expert-001.json", {"event": "progress", "step": 40, "total": 800, "loss": 0.25})
    rows = {r[0]: r for r in stage_rows(obj, store)}
    assert rows["cluster"][1] == "done"
    assert rows["expert-001"][1:3] == ("started", "40/800") and "loss 0.25" in rows["expert-001"][3]
    assert rows["expert-000"][1] == "pending" and rows["distill"][1] == "pending"


def test_run_dir_is_resolved_through_its_spec_copy(tmp_path: Path) -> None:
    run = tmp_path / "elsewhere"
    run.mkdir()
    shutil.copy(EXAMPLE, run / "spec.yaml")
    obj, _, run_dir, uri = resolve_run(str(run))
    assert obj.metadata.name == "fashion-mnist" and run_dir == run.resolve() and uri == str(run.resolve())
    with pytest.raises(ConfigError, match="not a run directory"):
        resolve_run(str(tmp_path))
    with pytest.raises(ConfigError, match="neither a spec file nor a run directory"):
        resolve_run(str(tmp_path / "missing.yaml"))


def test_bad_spec_error_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("numClusters: 3", "numClusters: 0"))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*clustering\.numClusters"):
        load_spec(bad)
