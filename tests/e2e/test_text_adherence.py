"""Text-conditioned experts learn their captions, through the product: ``ddm run`` on 600 16 px images whose caption
names their colour ("a red square", "a green square", "a blue square"), all-MiniLM-L6-v2 as text encoder, K=2, then
``ddm sample --prompt`` per colour. Each prompt's samples must come out in its colour.

Why: the tests beside this one only check that the output changes with the prompt; this one fails when a caption
never reaches the model the way it was trained (embeddings misaligned with their images, a prompt encoded
differently at sampling than in training). Written when CIFAR-10 grids from an H100 seemed not to follow their
prompts; that was the combined grid's layout (BENCHMARKS.md, sixth lease), not the caption path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddm_trainer.datasets import Sample, write_shards

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DDM = str(Path(sys.executable).parent / "ddm")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _spec(shards: Path, run_dir: Path, encoder: str) -> dict[str, object]:
    return {
        "apiVersion": "ddm.io/v1alpha1",
        "kind": "DecentralizedDiffusion",
        "metadata": {"name": "colours"},
        "spec": {
            "dataset": {"uri": str(shards), "imageSize": 16, "channels": 3, "captionField": "txt"},
            "clustering": {"encoder": "raw-pixels", "fineClusters": 8, "numClusters": 2},
            "textEncoder": {"uri": encoder, "width": 384, "maxTokens": 8},
            "experts": {"modelPreset": "DiT-T/4", "steps": 300, "batchSize": 32, "lr": 0.001, "precision": "fp32",
                        "gpusPerNode": 0},
            "router": {"preset": "DiT-T/4", "steps": 50, "batchSize": 32, "precision": "fp32", "gpusPerNode": 0},
            "evaluation": {"strategies": ["top1"], "numSamples": 8, "steps": 2},
            "storage": {"uri": str(run_dir)},
        },
    }


def test_samples_follow_the_colour_their_prompt_names(minilm_path: str, tmp_path: Path,
                                                      parallel_run_env: dict[str, str]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for i in range(600):
        name = list(COLOURS)[i % 3]
        noise = rng.normal(0, 20, (16, 16, 3))
        image = np.clip(np.array(COLOURS[name])[None, None, :] + noise, 0, 255).astype(np.uint8)  # (16, 16, 3)
        samples.append(Sample(f"{i:05d}", image, None, f"a {name} square"))
    write_shards(samples, tmp_path / "shards", shard_size=300)
    run_dir = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(tmp_path / "shards", run_dir, minilm_path)))
    env = parallel_run_env
    out = subprocess.run([DDM, "run", str(spec), "--parallel", "2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    means = {}
    for name in COLOURS:
        png = tmp_path / f"{name}.png"
        out = subprocess.run([DDM, "sample", str(run_dir), "--strategy", "top1", "-n", "16", "--cfg-scale", "3",
                              "--steps", "20", "--prompt", f"a {name} square", "-o", str(png)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        grid = np.asarray(Image.open(tmp_path / f"{name}-00.png").convert("RGB"), dtype=np.float64)  # (H, W, 3)
        pixels = grid.reshape(-1, 3)
        pixels = pixels[pixels.min(axis=1) < 250]  # the samples, not the grid's white padding
        means[name] = pixels.mean(axis=0)  # (3,) mean R, G, B
    for channel, name in enumerate(COLOURS):  # each prompt's own channel leads in its samples by a wide margin
        others = np.delete(means[name], channel)
        assert means[name][channel] > others.max() + 80, means
