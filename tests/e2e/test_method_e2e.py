"""The whole method on 600 real Fashion-MNIST images, on the CPU, through the real stages (cluster and evaluate
through the ``ddm-train`` CLI): cluster (raw pixels, K=2) -> 2 experts -> router -> FID/KID of every strategy and
the monolith -> distillation. The trained ensemble must beat the same ensemble with untrained experts.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ddm_trainer import fid, layout
from ddm_trainer.clustering import load_assignments
from ddm_trainer.configs.distill import DistillConfig
from ddm_trainer.configs.expert import ExpertConfig
from ddm_trainer.configs.router import RouterConfig
from ddm_trainer.stages import distill, expert, router
from ddm_trainer.store import FileStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

SIZE, CHANNELS, N_DATA = 16, 1, 600
STRATEGIES = ["full", "top1", "top-2", "sample-1", "nucleus-0.9", "monolith"]
EVAL = dict(n_samples=64, reference_n=128, batch_size=64, steps=10, kid_subset_size=32, kid_subsets=20,
            grid_count=16, grid_nrow=4)
TRAIN = dict(batch_size=32, lr=2e-3, precision="fp32", ema_decay=0.9, warmup_steps=10, log_every=25,
             ckpt_every=1000, grad_clip=1.0)


def _ddm_train(stage: str, config: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    path = tmp / f"{stage}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "ddm_trainer.cli", stage, "--config", str(path)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"ddm-train {stage} failed:\n{out.stderr[-3000:]}"
    return out


def _rows(store: FileStore) -> dict[str, dict[str, Any]]:
    results = json.loads(store.read_committed(layout.EVALUATION, "results.json"))
    return {r["strategy"]: r for r in results["table"]}


def test_method_end_to_end(fashion_mnist_data_config: Callable[..., Any], tmp_path: Path) -> None:
    try:
        fid.inception_weights_path()
    except fid.FIDSetupError as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)  # 2 OMP threads on shared, oversubscribed cores spin and crawl
    data = fashion_mnist_data_config(image_size=SIZE, channels=CHANNELS, limit=N_DATA, class_field=None)
    store = FileStore(tmp_path / "run")
    base = {"run_uri": store.uri, "device": "cpu", "seed": 0}

    _ddm_train("cluster", {**base, "data": data.model_dump(), "num_clusters": 2, "fine_clusters": 8,
                           "encoder": "raw-pixels", "examples_per_cluster": 0}, tmp_path)
    assignments = load_assignments(store)
    assert assignments.num_clusters == 2 and min(assignments.sizes) > 50

    expert_common = {**base, "data": data.model_dump(), "model": "DiT-N/4", "t_dist": "logit_normal",
                     "sample_grid": {"count": 0}}
    for k in (0, 1):
        expert.run(ExpertConfig(cluster_index=k, train={**TRAIN, "steps": 200}, **expert_common))
    expert.run(ExpertConfig(cluster_index=None, train={**TRAIN, "steps": 200}, **expert_common))  # monolith
    router.run(RouterConfig(**base, data=data, num_clusters=2, preset="Router-N/4",
                            train={**TRAIN, "steps": 100}, eval={"holdout": 64, "bins": 4}))

    # Untrained baseline: the same run layout with random-init experts (DiT's zero output layers: v = 0).
    untrained = FileStore(tmp_path / "untrained")
    shutil.copytree(store.root, untrained.root)
    for stage_dir in (layout.expert(0), layout.expert(1), expert.MONOLITH):
        final = layout.final(stage_dir)
        weights = torch.load(untrained.root / final / "ema.pt", weights_only=True)
        fresh = {k: torch.zeros_like(v) if ("final_linear" in k or "adaLN" in k) else v for k, v in weights.items()}
        untrained.delete_prefix(final)
        config = json.loads(store.read_committed(final, "config.json"))
        from ddm_trainer.checkpoint import save_final

        save_final(untrained, stage_dir, fresh, fresh, config)

    eval_cfg = {**base, "data": data.model_dump(), **EVAL}
    out = _ddm_train("evaluate", {**eval_cfg, "strategies": STRATEGIES}, tmp_path)
    assert "| monolith |" in out.stdout
    rows = _rows(store)
    assert list(rows) == STRATEGIES
    for name, r in rows.items():
        assert math.isfinite(r["fid"]) and math.isfinite(r["kid_mean"]) and r["n"] == 64, (name, r)
        assert store.exists(f"{layout.EVALUATION}/grids/{name}.png")
    assert rows["full"]["nfe"] == pytest.approx(2 * 10) and rows["top1"]["nfe"] == pytest.approx(10)

    # The reference statistics are reused from the first run (copied with the store), so only sampling differs.
    shutil.copytree(store.root / evaluate_reference(), untrained.root / evaluate_reference(), dirs_exist_ok=True)
    _ddm_train("evaluate", {**eval_cfg, "run_uri": untrained.uri, "strategies": ["full"]}, tmp_path)
    baseline = _rows(untrained)
    print("trained:", {k: round(v["fid"], 1) for k, v in rows.items()},
          "untrained:", {k: round(v["fid"], 1) for k, v in baseline.items()})
    for name in STRATEGIES:  # every trained row beats the untrained ensemble
        assert rows[name]["fid"] < 0.8 * baseline["full"]["fid"], (name, rows[name]["fid"], baseline["full"]["fid"])

    losses = distill.run(DistillConfig(**base, data=data, model="DiT-N/4", train={**TRAIN, "steps": 20},
                                       sample_grid={"count": 4, "nrow": 2, "steps": 4}))
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert store.read_manifest(layout.final(layout.DISTILLATION)) is not None


def evaluate_reference() -> str:
    from ddm_trainer.stages.evaluate import REFERENCE

    return REFERENCE
