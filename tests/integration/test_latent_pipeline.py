"""Latent-space experts on the CPU with a real diffusers AutoencoderKL (a tiny config whose random weights the test
writes to a folder, and a single .safetensors file): the cluster stage encodes every Fashion-MNIST image and its
horizontal flip once into latents stored with each cluster's shards, beside the caption embeddings of a real text
encoder (all-MiniLM-L6-v2); text-conditioned experts, router and student train on them;
samples are decoded by the VAE, and the FID is computed on the decoded images. A path that holds no VAE stops with
one line naming it and commits nothing."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddm_trainer import layout
from ddm_trainer.cluster_shards import LATENT, LATENT_FLIP, load_shard_index, open_cluster_shards
from ddm_trainer.configs.cluster import ClusterConfig
from ddm_trainer.configs.common import DataConfig
from ddm_trainer.configs.distill import DistillConfig
from ddm_trainer.configs.evaluate import EvaluateConfig
from ddm_trainer.configs.expert import ExpertConfig
from ddm_trainer.configs.router import RouterConfig
from ddm_trainer.errors import ConfigError, DataError
from ddm_trainer.stages import cluster, distill, evaluate, expert, router
from ddm_trainer.stages.sample import generate
from ddm_trainer.store import open_store
from ddm_trainer.vae import Vae

K, SIZE, LIMIT, WIDTH = 2, 16, 200, 384
TRAIN = {"batch_size": 16, "precision": "fp32", "log_every": 5, "ckpt_every": 1000, "prefetch": 0}


def _data(shards: Path) -> dict[str, Any]:
    return {"uri": str(shards), "image_size": SIZE, "channels": 1, "limit": LIMIT, "workers": 0,
            "caption_field": "txt"}


def _cluster_config(run_uri: str, shards: Path, vae: str, text: str | None = None) -> ClusterConfig:
    return ClusterConfig.model_validate({"run_uri": run_uri, "device": "cpu", "data": _data(shards),
                                         "num_clusters": K, "encoder": "raw-pixels", "examples_per_cluster": 0,
                                         "vae": {"uri": vae}, "text_encoder": {"uri": text, "width": WIDTH,
                                                                               "max_tokens": 8} if text else None})


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_shards: Path, tiny_vae_dir: Path,
               minilm_path: str) -> str:
    torch.set_num_threads(2)
    run_uri = str(tmp_path_factory.mktemp("latent-run"))
    cluster.run(_cluster_config(run_uri, fashion_mnist_shards, str(tiny_vae_dir), minilm_path))
    return run_uri


def test_each_images_latents_and_its_flips_are_stored_with_its_cluster(latent_run: str, fashion_mnist_shards: Path,
                                                                        tiny_vae_dir: Path) -> None:
    store = open_store(latent_run)
    index = load_shard_index(store)
    assert index is not None and index.latent is not None and index.text is not None
    assert (index.latent["channels"], index.latent["size"], index.latent["vae"]["scaling_factor"]) == (4, 8, 0.5)
    shards = open_cluster_shards(store, 0, DataConfig(**_data(fashion_mnist_shards)), WIDTH, latents=True)
    assert shards is not None
    key, parts = shards.fetch(0)[0]
    stored = np.load(io.BytesIO(parts[LATENT]))
    flipped = np.load(io.BytesIO(parts[LATENT_FLIP]))
    assert stored.shape == (4, 8, 8) and stored.dtype == np.float16
    from ddm_trainer.data import open_source

    image = open_source(DataConfig(**_data(fashion_mnist_shards))).load([key]).images  # (1, 1, 16, 16)
    vae = Vae(str(tiny_vae_dir))
    assert np.allclose(stored, vae.encode(image)[0].numpy(), atol=2e-3)  # (mean - shift) * scale, float16
    assert np.allclose(flipped, vae.encode(image.flip(-1))[0].numpy(), atol=2e-3)
    # the expert's batches are latents, some of them of the flipped image, with their captions' embeddings
    batch = next(iter(shards.stream(32, seed=0, workers=0)))
    assert batch.images.shape == (32, 4, 8, 8) and batch.text is not None and batch.text.shape == (32, 8, WIDTH)
    members = {k: p for s in range(len(shards.shards)) for k, p in shards.fetch(s)}
    flipped = [np.allclose(batch.images[i].numpy(), np.load(io.BytesIO(members[k][LATENT_FLIP])), atol=1e-6)
               for i, k in enumerate(batch.keys)]
    assert 0 < sum(flipped) < len(flipped)  # a random flip per sample


def test_experts_router_and_student_train_on_latents_and_samples_are_decoded(latent_run: str,
                                                                              fashion_mnist_shards: Path) -> None:
    store = open_store(latent_run)
    for k in range(K):
        expert.run(ExpertConfig.model_validate({
            "run_uri": latent_run, "device": "cpu", "data": _data(fashion_mnist_shards), "cluster_index": k,
            "model": "DiT-N/4", "latents": True, "text_dim": WIDTH, "text_tokens": 8,
            "train": {"steps": 8, "lr": 1e-3, "ema_decay": 0.9, **TRAIN}, "sample_grid": {"count": 4, "steps": 2}}))
    model = json.loads(store.read_committed(layout.final(layout.expert(0)), "config.json"))["model"]
    assert (model["image_size"], model["channels"], model["pixel_size"], model["pixel_channels"]) == (8, 4, SIZE, 1)
    from PIL import Image

    grid = Image.open(io.BytesIO(store.get_bytes(f"{layout.expert(0)}/report/samples.png")))
    assert grid.size[0] > 4 * SIZE  # decoded 16 px images, not 8 px latents

    result = router.run(RouterConfig.model_validate({
        "run_uri": latent_run, "device": "cpu", "data": _data(fashion_mnist_shards), "num_clusters": K,
        "preset": "Router-N/4", "latents": True, "text_dim": WIDTH, "eval": {"holdout": 20, "bins": 2},
        "train": {"steps": 8, "lr": 1e-3, "ema_decay": 0.9, **TRAIN}}))
    assert result is not None
    assert json.loads(store.read_committed(layout.final(layout.ROUTER), "config.json"))["model"]["image_size"] == 8

    distill.run(DistillConfig.model_validate({
        "run_uri": latent_run, "device": "cpu", "data": _data(fashion_mnist_shards), "model": "DiT-N/4",
        "teacher": "ensemble", "strategy": "top1", "train": {"steps": 3, **TRAIN}, "sample_grid": {"count": 4,
                                                                                                   "steps": 2}}))
    assert json.loads(store.read_committed(layout.final(layout.DISTILLATION), "config.json"))["model"]["vae"]

    images, _ = generate(store, "top1", 4, steps=2, prompts=["a photo of a bag"], cfg_scale=2.0)
    assert images.shape == (4, 1, SIZE, SIZE) and images.abs().max() <= 1  # decoded

    from ddm_trainer import fid

    try:
        fid.inception_weights_path()
    except fid.FIDSetupError:
        return
    table = evaluate.run(EvaluateConfig.model_validate({
        "run_uri": latent_run, "device": "cpu", "data": _data(fashion_mnist_shards), "strategies": ["top1"],
        "n_samples": 8, "reference_n": 16, "batch_size": 8, "steps": 2, "kid_subsets": 2, "grid_count": 4,
        "precision": "fp32"}))["table"]
    assert np.isfinite(table[0]["fid"])  # on decoded 16 px images against the 16 px training images


def test_a_single_safetensors_file_loads_and_a_path_without_a_vae_is_refused(tmp_path: Path, tiny_vae_dir: Path,
                                                                              fashion_mnist_shards: Path,
                                                                              latent_run: str) -> None:
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tiny_vae_dir / "config.json", single / "config.json")
    shutil.copy(tiny_vae_dir / "diffusion_pytorch_model.safetensors", single / "vae.safetensors")
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    assert torch.allclose(Vae(str(single / "vae.safetensors")).encode(x), Vae(str(tiny_vae_dir)).encode(x))

    empty = tmp_path / "no-vae"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    run_uri = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=f"^VAE {empty}: no diffusers AutoencoderKL there"):
        cluster.run(_cluster_config(run_uri, fashion_mnist_shards, str(empty)))
    assert open_store(run_uri).read_manifest(layout.CLUSTERING) is None
    # latent experts need stored latents: a pixel-only run has none
    pixel_run = str(tmp_path / "pixels")
    cluster.run(ClusterConfig.model_validate({"run_uri": pixel_run, "device": "cpu",
                                              "data": _data(fashion_mnist_shards), "num_clusters": K,
                                              "encoder": "raw-pixels", "examples_per_cluster": 0}))
    with pytest.raises(DataError, match="^latents is true but .* holds no VAE latents"):
        expert.run(ExpertConfig.model_validate({"run_uri": pixel_run, "device": "cpu",
                                                "data": _data(fashion_mnist_shards), "cluster_index": 0,
                                                "model": "DiT-N/4", "latents": True,
                                                "train": {"steps": 1, **TRAIN}}))


def test_the_router_streams_latents_and_captions_shard_by_shard(latent_run: str, fashion_mnist_shards: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router reads the cluster shards as the experts do: with a data cache of one shard per window it never
    holds more than three windows' samples (counted in the shard cache), not every latent; the held-out samples
    are read back by position and never trained on."""
    from ddm_trainer import cluster_shards

    run = tmp_path / "run"
    shutil.copytree(Path(latent_run) / layout.CLUSTERING, run / layout.CLUSTERING)  # the clustering alone
    shards = cluster_shards.open_all_shards(open_store(str(run)), DataConfig(**_data(fashion_mnist_shards)), WIDTH,
                                            latents=True)
    monkeypatch.setenv("DDM_DATA_CACHE_BYTES", str(3 * max(s.bytes for s in shards.shards)))
    peak, trained = [0], set()
    read_ahead = cluster_shards._ShardCache.read_ahead

    def counting(self: Any, shard_ids: Any) -> None:
        read_ahead(self, shard_ids)
        peak[0] = max(peak[0], sum(self._fetch.__self__.shards[s].samples for s in self._shards))

    monkeypatch.setattr(cluster_shards._ShardCache, "read_ahead", counting)
    next_batch = cluster_shards.ShardStream.__next__

    def recording(self: Any) -> Any:
        batch = next_batch(self)
        trained.update(batch.keys)
        return batch

    monkeypatch.setattr(cluster_shards.ShardStream, "__next__", recording)
    result = router.run(RouterConfig.model_validate({
        "run_uri": str(run), "device": "cpu", "data": _data(fashion_mnist_shards), "num_clusters": K,
        "preset": "Router-N/4", "latents": True, "text_dim": WIDTH, "eval": {"holdout": 20, "bins": 2},
        "train": {"steps": 24, "lr": 1e-3, "ema_decay": 0.9, **TRAIN}}))
    assert result is not None and result["holdout"] == 20
    largest = max(s.samples for s in shards.shards)
    assert 0 < peak[0] <= 3 * largest < len(shards) // 2, (peak[0], largest, len(shards))
    held = set(shards.load_ids(router.holdout_ids(len(shards), 20, 0)).keys)
    assert len(trained) >= len(shards) - 20 - TRAIN["batch_size"] and not trained & held  # held out: never trained

