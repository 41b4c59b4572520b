"""bench/stage_throughput.py's model-only reference must run with whatever options bench/expert_throughput.py
reads: on the 2026-12-07 lease it crashed on the GPU (`'Namespace' object has no attribute 'text_dim'`) because its
settings were built by hand and missed options added to the model benchmark since."""
from __future__ import annotations

import argparse

import torch

from fixtures.bench import load_bench


def test_the_model_only_reference_runs_with_the_stage_benchmarks_settings() -> None:
    stage = load_bench("stage_throughput")
    args = argparse.Namespace(batch=2, image_size=8, channels=3, model_steps=1, compile_mode="default",
                              residual="fp32", coordinate_descent=False)
    settings = stage.model_only_settings(args, torch.device("cpu"))
    assert (settings.batch, settings.image_size, settings.channels, settings.steps) == (2, 8, 3, 1)
    assert settings.compile == "none" and settings.text_dim == 0 and settings.compile_mode is None
    result = stage.bench_preset("DiT-N/4", settings, torch.device("cpu"))
    assert result["preset"] == "DiT-N/4" and result["images_per_s"] > 0
    # the stage's --compile-mode is the reference's too (its step marks each iteration for the CUDA graphs)
    graphs = stage.model_only_settings(argparse.Namespace(**{**vars(args), "compile_mode": "reduce-overhead"}),
                                       torch.device("cpu"))
    assert graphs.compile_mode == "reduce-overhead"
    assert stage.bench_preset("DiT-N/4", graphs, torch.device("cpu"))["images_per_s"] > 0


def test_the_residual_and_tuning_settings_reach_the_stage_and_the_model_only_step() -> None:
    """--residual bf16 / --coordinate-descent are the trainer's settings: the stage's config carries them, the
    model-only reference runs with the same ones (both sides of the ratio measure one thing)."""
    stage = load_bench("stage_throughput")
    args = argparse.Namespace(batch=2, image_size=8, channels=3, model_steps=1, compile_mode="default",
                              residual="bf16", coordinate_descent=True, data="d", device="cpu", log_every=1)
    settings = stage.model_only_settings(args, torch.device("cpu"))
    assert settings.residual == "bf16" and settings.coordinate_descent is True
    train = stage.expert_config(args, "/r", "DiT-N/4", 3, 10, 2)["train"]
    assert train["residual_precision"] == "bf16" and train["coordinate_descent_tuning"] is True
    from ddm_trainer.configs.expert import ExpertConfig
    ExpertConfig.model_validate(stage.expert_config(args, "/r", "DiT-N/4", 3, 10, 2))  # the stage accepts it
    throughput = load_bench("expert_throughput")
    settings = throughput.parse_args(["--batch", "2", "--image-size", "8", "--steps", "1", "--warmup", "1",
                                      "--compile", "none", "--residual", "bf16"])
    assert throughput.bench_preset("DiT-N/4", settings, torch.device("cpu"))["images_per_s"] > 0


def test_the_latent_text_stage_loads_its_encoders_as_a_users_and_trains_on_their_shapes(tmp_path) -> None:
    """--latent-text (issue 10's XL/2 stage on latents with cross-attention): the VAE and CLIP folders it writes load
    through the trainer's own loaders, and the stage's config and the model-only step have the same shapes (the
    latents' channels and size, the caption tokens' width and count)."""
    import pytest
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    stage = load_bench("stage_throughput")
    args = argparse.Namespace(latent_text=True, vae="tiny", text_width=32, text_tokens=16, text_layers=1,
                              limit=64, data="d", image_size=32, channels=3, device="cpu", batch=2, model_steps=1,
                              compile_mode="default", residual="fp32", coordinate_descent=False, log_every=1)
    vae_dir, clip_dir = stage.encoder_folders(args, tmp_path)
    from ddm_trainer.text import TextEncoder
    from ddm_trainer.vae import Vae
    captions = TextEncoder(clip_dir, max_tokens=16, kind="clip", expect_dim=32).encode(["a photo of a cat"])
    assert captions.tokens.shape == (1, 16, 32) and 3 <= int(captions.mask.sum()) < 16  # real tokens, then padding
    assert Vae(str(vae_dir), torch.device("cpu")).encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16, 16)

    from ddm_trainer.configs.expert import ExpertConfig
    cfg = ExpertConfig.model_validate(stage.expert_config(args, "/r", "DiT-T/4", 3, 10, 2))
    assert cfg.latents and cfg.text_dim == 32 and cfg.text_tokens == 16 and cfg.data.caption_field == "txt"
    assert cfg.data.limit == 64 and not cfg.class_cond
    ref = stage.model_only_settings(args, torch.device("cpu"), latent=(4, 16))
    assert (ref.channels, ref.image_size, ref.text_dim, ref.text_tokens) == (4, 16, 32, 16)
