"""bench/stage_throughput.py's model-only reference must run with whatever options bench/expert_throughput.py
reads: on the 2026-12-07 lease it crashed on the GPU (`'Namespace' object has no attribute 'text_dim'`) because its
settings were built by hand and missed options added to the model benchmark since."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_model_only_reference_runs_with_the_stage_benchmarks_settings() -> None:
    stage = load("stage_throughput")
    args = argparse.Namespace(batch=2, image_size=8, channels=3, model_steps=1)
    settings = stage.model_only_settings(args, torch.device("cpu"))
    assert (settings.batch, settings.image_size, settings.channels, settings.steps) == (2, 8, 3, 1)
    assert settings.compile == "none" and settings.text_dim == 0
    result = stage.bench_preset("DiT-N/4", settings, torch.device("cpu"))
    assert result["preset"] == "DiT-N/4" and result["images_per_s"] > 0
