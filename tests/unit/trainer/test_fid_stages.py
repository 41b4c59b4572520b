"""Evaluation, distillation and the monolith baseline on a real file store with tiny DiTs and real Fashion-MNIST."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from ddm_trainer import fid, layout
from ddm_trainer.checkpoint import latest_checkpoint, load_checkpoint, load_final, save_final
from ddm_trainer.cli import load_config
from ddm_trainer.clustering import ASSIGNMENTS
from ddm_trainer.configs.distill import DistillConfig
from ddm_trainer.configs.evaluate import EvaluateConfig
from ddm_trainer.configs.expert import ExpertConfig
from ddm_trainer.data import open_source
from ddm_trainer.errors import ConfigError, DataError, MissingArtifactError
from ddm_trainer.models.dit import build_dit
from ddm_trainer.models.router import RouterSpec, build_router_from_spec
from ddm_trainer.stages import distill, evaluate, expert
from ddm_trainer.store import FileStore

torch.set_num_threads(1)
SIZE, CHANNELS, N_DATA = 8, 1, 64
TINY_TRAIN = dict(batch_size=8, lr=2e-3, precision="fp32", ema_decay=0.5, warmup_steps=0, log_every=1,
                  deterministic=True)


def _spec(preset: str = "DiT-N/4") -> dict[str, Any]:
    return {"arch": "dit", "preset": preset, "image_size": SIZE, "channels": CHANNELS, "num_classes": None}


def _commit_dit(store: FileStore, stage_dir: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_dit("DiT-N/4", SIZE, CHANNELS)
    for p in model.parameters():  # DiT starts with zero output layers: perturb so the velocity is not zero
        p.data.add_(0.05 * torch.randn_like(p))
    save_final(store, stage_dir, model.state_dict(), model.state_dict(), {"model": _spec(), "stage": {}})


@pytest.fixture
def data(fashion_mnist_data_config: Callable[..., Any]) -> Any:
    return fashion_mnist_data_config(image_size=SIZE, channels=CHANNELS, limit=N_DATA)


@pytest.fixture
def run_store(tmp_path: Path, data: Any) -> FileStore:
    """Two random-init experts, a K=2 router, a monolith and a committed 2-way clustering of the data."""
    store = FileStore(tmp_path / "run")
    for k in range(2):
        _commit_dit(store, layout.expert(k), 100 + k)
    _commit_dit(store, expert.MONOLITH, 200)
    spec = RouterSpec("Router-N/4", SIZE, CHANNELS, 2)
    torch.manual_seed(7)
    router = build_router_from_spec(spec)
    save_final(store, layout.ROUTER, router.state_dict(), router.state_dict(), {"model": spec.as_dict(), "stage": {}})
    keys = open_source(data).keys()
    cluster = np.arange(len(keys)) % 2  # (N,) a fixed 2-way split
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(keys), cluster=cluster.astype(np.int64), fine=np.full(len(keys), -1))
    store.commit(layout.CLUSTERING, {ASSIGNMENTS: buf.getvalue()}, meta={"num_clusters": 2})
    return store


def _eval_cfg(store: FileStore, data: Any, **kw: Any) -> EvaluateConfig:
    fields: dict[str, Any] = dict(run_uri=store.uri, data=data.model_dump(), device="cpu", n_samples=10,
                                  reference_n=20, batch_size=10, steps=2, kid_subsets=5, grid_count=4)
    fields.update(kw)
    return EvaluateConfig(**fields)


# -- evaluation ----------------------------------------------------------------------------------------------------
def test_evaluate_rejects_bad_input_before_sampling(run_store: FileStore, data: Any, tmp_path: Path) -> None:
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(json.dumps({"run_uri": run_store.uri, "data": {"uri": data.uri}, "strategies": ["best"]}))
    with pytest.raises(ConfigError, match="unknown strategy 'best'"):
        load_config("evaluate", str(cfg_file))
    with pytest.raises(ConfigError, match="keeps 3 experts but the run has only 2"):
        evaluate.validate(_eval_cfg(run_store, data, strategies=["top-3"]), run_store)
    with pytest.raises(ConfigError, match="1x8px images but data .* is 1x16px"):
        evaluate.validate(_eval_cfg(run_store, data.model_copy(update={"image_size": 16})), run_store)
    with pytest.raises(ValueError, match="reference_n=65 exceeds data.limit=64"):
        _eval_cfg(run_store, data, reference_n=N_DATA + 1)
    unlimited = data.model_copy(update={"limit": None})
    total = len(open_source(unlimited))
    with pytest.raises(DataError, match=f"reference_n={total + 1} but data.uri .* holds {total} images"):
        evaluate.validate(_eval_cfg(run_store, unlimited, reference_n=total + 1), run_store)
    run_store.delete_prefix(layout.final(expert.MONOLITH))
    with pytest.raises(MissingArtifactError, match="experts/monolith/final"):
        evaluate.validate(_eval_cfg(run_store, data, strategies=["full", "monolith"]), run_store)
    run_store.delete_prefix(layout.final(layout.expert(1)))
    with pytest.raises(MissingArtifactError, match="experts/001/final"):
        evaluate.run(_eval_cfg(run_store, data, strategies=["full"]))
    assert run_store.read_manifest(layout.EVALUATION) is None  # nothing sampled, nothing committed


@pytest.mark.slow
def test_evaluate_writes_table_grids_and_reuses_reference(run_store: FileStore, data: Any) -> None:
    try:
        fid.inception_weights_path()
    except fid.FIDSetupError as e:
        pytest.skip(str(e))
    cfg = _eval_cfg(run_store, data, strategies=["full", "top1", "monolith"])
    result = evaluate.run(cfg)
    rows = {r["strategy"]: r for r in result["table"]}
    assert list(rows) == ["full", "top1", "monolith"]
    for r in rows.values():
        assert math.isfinite(r["fid"]) and r["fid"] > 0 and math.isfinite(r["kid_mean"]) and r["n"] == 10
    assert rows["full"]["nfe"] == 2 * 2 and rows["top1"]["nfe"] == 2 and rows["monolith"]["nfe"] == 2
    manifest = run_store.read_manifest(layout.EVALUATION)
    assert manifest is not None and [r["strategy"] for r in manifest["table"]] == ["full", "top1", "monolith"]
    for name in ("results.json", "results.md", "grids/full.png", "grids/top1.png", "grids/monolith.png"):
        assert name in manifest["files"]
    assert "| monolith |" in run_store.read_committed(layout.EVALUATION, "results.md").decode()
    # The reference features are committed once and reused (not recomputed) by the next run.
    [ref] = run_store.committed_prefixes(evaluate.REFERENCE)
    first = run_store.read_manifest(ref)
    again = evaluate.run(cfg.model_copy(update={"strategies": ["top1"]}))
    assert run_store.read_manifest(ref) == first
    assert again["table"][0]["fid"] == pytest.approx(rows["top1"]["fid"], rel=1e-6)  # same seed, same samples
