"""The router stage on real data: Fashion-MNIST clustered by the real cluster stage, a short CPU router run whose
held-out accuracy is high near the data (t -> 0) and falls to chance near the noise (t -> 1)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ddm_trainer import layout
from ddm_trainer.cli import main
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.configs.router import RouterConfig
from ddm_trainer.errors import ConfigError, MissingArtifactError
from ddm_trainer.stages.cluster import run as run_cluster
from ddm_trainer.stages.router import EVAL_DIR, load_router
from ddm_trainer.stages.router import run as run_router
from ddm_trainer.stages.sample import generate
from ddm_trainer.store import open_store

K = 4
SIZE = 16  # 16x16 keeps the CPU run short; the clustering keys do not depend on it


def _data(shards: Path) -> dict[str, Any]:
    return {"uri": str(shards), "image_size": SIZE, "channels": 1}


def _router_config(run_uri: str, shards: Path, **overrides: Any) -> RouterConfig:
    fields: dict[str, Any] = {
        "run_uri": run_uri, "device": "cpu", "data": _data(shards), "num_clusters": K, "preset": "Router-N/4",
        # measured on a loaded 2-core machine: 80 steps give ~0.91 accuracy at t < 0.1 and ~0.38 (the majority
        # share 0.37) at t > 0.9
        "train": {"steps": 80, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.9, "precision": "fp32",
                  "log_every": 40, "ckpt_every": 1000},
        "eval": {"holdout": 300, "bins": 10},
    }
    fields.update(overrides)
    return RouterConfig.model_validate(fields)


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_shards: Path) -> str:
    run_uri = str(tmp_path_factory.mktemp("router-run"))
    run_cluster(ClusterConfig.model_validate({"run_uri": run_uri, "device": "cpu", "data": _data(fashion_mnist_shards),
                                              "num_clusters": K, "encoder": "raw-pixels", "seed": 0,
                                              "examples_per_cluster": 0}))
    return run_uri


def test_router_accuracy_falls_from_data_to_noise(clustered_run: str, fashion_mnist_shards: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    torch.set_num_threads(2)
    result = run_router(_router_config(clustered_run, fashion_mnist_shards))
    assert result is not None
    acc = [b["accuracy"] for b in result["bins"]]
    near_data = (acc[0] + acc[1]) / 2  # t < 0.2
    near_noise = acc[-1]  # t >= 0.9
    assert near_data >= 0.7, acc
    assert near_data > near_noise + 0.3, acc
    # At t ~ 1 x_t is almost pure noise: the best guess is the largest cluster (chance 1/K for balanced clusters).
    assert near_noise <= result["majority"] + 0.12, (acc, result["majority"])
    assert result["chance"] == 1 / K and result["holdout"] == 300

    store = open_store(clustered_run)
    manifest = store.read_manifest(EVAL_DIR)
    assert manifest is not None and set(manifest["files"]) == {"accuracy.json", "accuracy_vs_t.png"}
    assert json.loads(store.read_committed(EVAL_DIR, "accuracy.json"))["bins"] == result["bins"]
    assert store.read_committed(EVAL_DIR, "accuracy_vs_t.png")[:4] == b"\x89PNG"
    assert "router held-out top-1 accuracy vs t" in capsys.readouterr().out

    router = load_router(store)
    assert router.num_clusters == K
    logits = router(torch.zeros(2, 1, SIZE, SIZE), torch.tensor([0.0, 1.0]))
    assert logits.shape == (2, K)
    # The sampler validates the ensemble before any sampling: no expert is trained in this run.
    with pytest.raises(MissingArtifactError, match="experts/000/final"):
        generate(store, "top1", n=2, steps=1)


def test_num_clusters_must_match_the_clustering(clustered_run: str, fashion_mnist_shards: Path):
    with pytest.raises(ConfigError, match=f"num_clusters=3 but the clustering .* has {K} clusters"):
        run_router(_router_config(clustered_run, fashion_mnist_shards, num_clusters=3))


def test_cli_exit_codes(tmp_path: Path, clustered_run: str, fashion_mnist_shards: Path):
    cfg = tmp_path / "router.json"
    cfg.write_text(_router_config(str(tmp_path / "empty-run"), fashion_mnist_shards).model_dump_json())
    assert main(["router", "--config", str(cfg)]) == 5  # no clustering committed yet: missing artifact
    cfg.write_text(_router_config(clustered_run, fashion_mnist_shards, num_clusters=7).model_dump_json())
    assert main(["router", "--config", str(cfg)]) == 2
    cfg.write_text(json.dumps({"run_uri": clustered_run, "data": _data(fashion_mnist_shards), "num_clusters": K,
                               "preset": "Router-XXL/1"}))
    assert main(["router", "--config", str(cfg)]) == 2


def _fresh_copy(clustered_run: str, tmp_path: Path) -> str:
    """The clustered run without any router (another test's router would be resumed)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(clustered_run, run, ignore=lambda d, names: [n for n in names if n == layout.ROUTER])
    return str(run)


def test_class_conditional_router_uses_the_label_near_the_noise(clustered_run: str, fashion_mnist_shards: Path,
                                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path):
    """p(k | x_t, t, y): at t >= 0.9 the image says almost nothing, the class label says which clusters it can be
    in (raw-pixel clusters of Fashion-MNIST follow the classes). One router, trained with label dropout, is scored
    with its label and with the null label on the same noisy held-out images."""
    torch.set_num_threads(2)
    clustered_run = _fresh_copy(clustered_run, tmp_path)
    cfg = _router_config(clustered_run, fashion_mnist_shards, num_classes=10,
                         data={**_data(fashion_mnist_shards), "class_field": "cls"},
                         train={"steps": 150, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.9, "precision": "fp32",
                                "log_every": 50, "ckpt_every": 1000})
    result = run_router(cfg)
    assert result is not None and result["steps"] == 150
    last = result["bins"][-1]
    # measured on the 2-core machine: 0.84 with the label vs 0.27 without (majority share 0.37)
    assert last["accuracy"] > last["accuracy_unconditional"] + 0.15, result["bins"]
    assert last["accuracy_unconditional"] <= result["majority"] + 0.12, result["bins"]
    assert "with the condition (label / caption) / without" in capsys.readouterr().out

    router = load_router(open_store(clustered_run))
    assert router.num_classes == 10
    x, t = torch.zeros(2, 1, SIZE, SIZE), torch.tensor([0.95, 0.95])
    assert not torch.allclose(router(x, t, torch.tensor([0, 7])), router(x, t))  # the label changes p(k | ...)
    assert torch.equal(router(x, t), router(x, t, torch.tensor([10, 10])))  # no label = the null label


def test_conditional_router_without_labels_in_the_data_is_refused(clustered_run: str, fashion_mnist_shards: Path,
                                                                   tmp_path: Path):
    clustered_run = _fresh_copy(clustered_run, tmp_path)
    with pytest.raises(ConfigError, match="data.class_field"):
        run_router(_router_config(clustered_run, fashion_mnist_shards, num_classes=10,
                                  data={**_data(fashion_mnist_shards), "class_field": None}))
