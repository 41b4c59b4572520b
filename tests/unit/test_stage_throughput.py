"""bench/stage_throughput.py's model-only reference must run with whatever options bench/expert_throughput.py
reads: on the 2026-12-07 lease it crashed on the GPU (`'Namespace' object has no attribute 'text_dim'`) because its
settings were built by hand and missed options added to the model benchmark since."""
from __future__ import annotations

import argparse

import torch

from fixtures.bench import load_bench


def test_the_model_only_reference_runs_with_the_stage_benchmarks_settings() -> None:
    stage = load_bench("stage_throughput")
    args = argparse.Namespace(batch=2, image_size=8, channels=3, model_steps=1, compile_mode="default")
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


def test_the_bf16_residual_candidate_runs_and_changes_only_the_stream_between_blocks() -> None:
    """bench/expert_throughput.py --residual bf16 (a candidate measured on the GPU, not the trainer's setting): under
    autocast the stream between blocks is bf16 (fp32 without the candidate); the model's output dtype is unchanged."""
    throughput = load_bench("expert_throughput")
    settings = throughput.parse_args(["--batch", "2", "--image-size", "8", "--steps", "1", "--warmup", "1",
                                      "--compile", "none", "--residual", "bf16"])
    assert throughput.bench_preset("DiT-N/4", settings, torch.device("cpu"))["images_per_s"] > 0

    from ddm_trainer.models.dit import build_dit

    def stream_dtype(candidate: bool) -> tuple[torch.dtype, torch.dtype]:
        model = build_dit("DiT-N/4", 8, 3, 10)
        if candidate:
            throughput.residual_in_bf16(model)
        seen: list[torch.dtype] = []
        model.blocks[1].register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2]))
        return seen[0], out.dtype

    (plain, plain_out), (candidate, candidate_out) = stream_dtype(False), stream_dtype(True)
    assert (plain, candidate) == (torch.float32, torch.bfloat16)
    assert candidate_out == plain_out  # what leaves the model is as before
