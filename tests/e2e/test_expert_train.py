"""End to end on real Fashion-MNIST: cluster (real cluster stage), then train one expert on one cluster via the CLI.

The loss must fall (measured: mean of the last 20 steps / mean of the first 20 = 0.23 here, 16x16 DiT-T/4, 200 steps
of batch 16; 0.14 on 32x32, 300 steps of batch 32);
the expert's report holds the loss curve and a PNG grid of EMA samples.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from ddm_trainer.clustering import load_assignments
from ddm_trainer.configs.common import DataConfig
from ddm_trainer.stages.expert import load_expert
from ddm_trainer.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def ddm_train(stage: str, cfg: dict[str, Any], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("DDM_TEST_CRASH_AT", None)
    proc = subprocess.run([sys.executable, "-m", "ddm_trainer.cli", stage, "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_expert_on_one_fashion_mnist_cluster_learns(tmp_path: Path,
                                                    fashion_mnist_data_config: Callable[..., DataConfig]) -> None:
    run_uri = str(tmp_path / "run")
    data = fashion_mnist_data_config(image_size=16).model_dump(mode="json")
    ddm_train("cluster", {"run_uri": run_uri, "data": data, "num_clusters": 3, "fine_clusters": 12,
                          "encoder": "raw-pixels", "device": "cpu", "examples_per_cluster": 0}, tmp_path / "cluster.yaml")
    store = open_store(run_uri)
    assignments = load_assignments(store)
    k = 0
    assert assignments.sizes[k] >= 100

    steps = 200
    ddm_train("expert", {
        "run_uri": run_uri, "data": data, "cluster_index": k, "model": "DiT-T/4", "class_cond": True,
        "num_classes": 10, "device": "cpu",
        "train": {"steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                  "ckpt_every": 100, "log_every": 25, "precision": "fp32"},
        "sample_grid": {"count": 16, "nrow": 4, "steps": 20},
    }, tmp_path / "expert.yaml")

    curve = json.loads(store.read_committed("experts/000/report", "loss_curve.json"))
    losses = curve["loss"]
    assert len(losses) == steps and curve["step"][-1] == steps
    first, last = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)

    png = store.read_committed("experts/000/report", "samples.png")
    from PIL import Image
    import io

    grid = Image.open(io.BytesIO(png))
    assert grid.size == (4 * 18 + 2, 4 * 18 + 2) and grid.mode == "L"
    (tmp_path / "samples.png").write_bytes(png)  # kept for a person to look at

    # The committed expert reloads and predicts a velocity close to the truth on its own cluster's data.
    model = load_expert(store, "experts/000")
    assert model.num_classes == 10 and model.size.patch == 4
    from ddm_trainer.data import open_source

    batch = open_source(DataConfig(**data), store).load(assignments.keys_of(k)[:64])
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(batch.images.shape, generator=gen)
    t = torch.full((64,), 0.5)
    with torch.no_grad():
        v = model((batch.images + eps) / 2, t, batch.labels)
    err = torch.mean((v - (eps - batch.images)) ** 2).item()
    assert err < 0.5 * first, err
