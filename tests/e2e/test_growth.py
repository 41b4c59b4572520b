"""Growing a DDM with ``ddm run`` (issue 15): a K=3 DDM on part of Fashion-MNIST, grown with the rest into K=4.

The parent (classes 0-6) trains three experts and shows its partial ensemble's FID as experts land
(spec.evaluation.partial); the grown run (classes 7-9, spec.growth) clusters only the new data into one new
cluster, trains only expert 3 and a new router over all the data, and evaluates the grown ensemble beside the
parent's on the same reference images. The parent's experts are read where it committed them: their files are
byte-for-byte unchanged, and the grown run's store holds no copy.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddm_trainer.datasets import fashion_mnist_to_shards
from ddm_trainer.store import FileStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DDM = str(Path(sys.executable).parent / "ddm")


def _spec(name: str, data: Path, store: Path, k: int, n: int, **extra: object) -> dict[str, object]:
    return {
        "apiVersion": "ddm.io/v1alpha1", "kind": "DecentralizedDiffusion", "metadata": {"name": name},
        "spec": {
            "dataset": {"uri": str(data), "imageSize": 16, "channels": 1, "limit": n},  # limit: a small router holdout
            "clustering": {"encoder": "raw-pixels", "fineClusters": 6, "numClusters": k},
            "experts": {"modelPreset": "DiT-T/4", "steps": 8, "batchSize": 16, "lr": 0.001, "precision": "fp32",
                        "checkpointEvery": 8, "gpusPerNode": 0},
            "router": {"preset": "DiT-T/4", "steps": 6, "batchSize": 16, "precision": "fp32", "gpusPerNode": 0},
            "evaluation": {"strategies": ["full"], "numSamples": 8, "steps": 2, "gpusPerNode": 0},
            "storage": {"uri": str(store)},
            **extra,
        },
    }


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(spec: dict[str, object], tmp_path: Path, name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([DDM, "run", str(path), "--parallel", "2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_grow_k3_into_k4_without_retraining(fashion_mnist_dir: Path, tmp_path: Path,
                                             parallel_run_env: dict[str, str]) -> None:
    old_data, new_data = tmp_path / "island-a", tmp_path / "island-b"
    fashion_mnist_to_shards(old_data, limit=150, shard_size=75, source_dir=fashion_mnist_dir, classes=range(7))
    fashion_mnist_to_shards(new_data, limit=60, shard_size=60, source_dir=fashion_mnist_dir, classes=(7, 8, 9))
    parent_dir, grown_dir = tmp_path / "parent", tmp_path / "grown"

    # 1. The parent, K=3, with the partial ensemble evaluated as its experts land.
    parent = _spec("parent", old_data, parent_dir, 3, 150)
    parent["spec"]["evaluation"]["partial"] = {"numSamples": 8, "steps": 2}  # type: ignore[index]
    out = _run(parent, tmp_path, "parent", parallel_run_env)
    assert "launched probe-001" in out.stderr, out.stderr[-3000:]
    pstore = FileStore(parent_dir)
    probe = pstore.read_manifest("partial/001")
    # launched when expert 0 had committed; it evaluates every expert committed when it runs
    assert probe is not None and 0 in probe["experts"] and sorted(probe["experts"] + probe["missing_experts"]) == [0, 1, 2]
    # launched while experts still trained: before the last expert's exit in the runner's log. (Which experts it
    # found committed when it ran depends on the machine's load: a slow probe can find all three.)
    log = out.stderr.splitlines()
    launched = next(i for i, ln in enumerate(log) if "launched probe-001" in ln)
    last_expert = max(i for i, ln in enumerate(log) if ln.startswith("[ddm] expert-") and " finished in " in ln)
    assert launched < last_expert, "a probe runs only while experts still train"
    status = subprocess.run([DDM, "status", str(tmp_path / "parent.yaml")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert "partial ensemble of experts [0" in status.stdout, status.stdout
    assert "Partial ensembles while experts trained" in (parent_dir / "report" / "index.md").read_text()
    before = _hashes(parent_dir / "experts")
    assert {k.split("/")[0] for k in before} == {"000", "001", "002"}

    # 2. Grown with the rest of the data into K=4: one new cluster, one new expert, a new router.
    grown = _spec("grown", new_data, grown_dir, 4, 60, growth={"parentUri": str(parent_dir)})
    out = _run(grown, tmp_path, "grown", parallel_run_env)
    assert "launched expert-003" in out.stderr
    assert not any(f"launched expert-00{k}" in out.stderr for k in range(3)), out.stderr[-3000:]
    assert _hashes(parent_dir / "experts") == before  # the old experts: untouched, byte for byte
    gstore = FileStore(grown_dir)
    clustering = gstore.read_manifest("clustering")
    assert clustering["parent"] == {"uri": str(parent_dir), "num_clusters": 3, "experts": [0, 1, 2]}
    assert clustering["sizes"][:3] == [0, 0, 0] and clustering["sizes"][3] == 60  # only the new data, all new
    assert sorted(p.name for p in (grown_dir / "experts").iterdir()) == ["003"]  # no copy of the parent's
    router = gstore.get_json("router/final/config.json")
    assert router["model"]["num_clusters"] == 4

    results = gstore.get_json("evaluation/results.json")
    rows = {r["strategy"]: r["fid"] for r in results["table"]}
    assert list(rows) == ["full", "parent:full"]  # the grown ensemble, and its parent on the same references
    assert results["experts"] == [0, 1, 2, 3] and results["parent"]["experts"] == [0, 1, 2]
    report = (grown_dir / "report" / "index.md").read_text()
    assert "Grown ensemble beside its parent" in report
    assert "### grown: K=4, experts [0, 1, 2, 3]" in report and "### parent: K=3, experts [0, 1, 2]" in report
