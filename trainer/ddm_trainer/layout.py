"""Where each stage's artifacts live under the run URI (torch-free: the operator and local runner read it too).

Every directory below that holds a ``MANIFEST.json`` is committed; anything else is in-flight or garbage.
"""
from __future__ import annotations

CLUSTERING = "clustering"  # MANIFEST.json + assignments.npz (keys, cluster ids), centroids, sizes
CLUSTER_SHARDS = f"{CLUSTERING}/shards"  # MANIFEST.json + index.json; <k>/<k>-<j>.tar: cluster k's samples
ENCODE = "encode"  # <part>/: MANIFEST.json + part.npz: features, caption embeddings, latents of a part of the samples
EXPERTS = "experts"
MONOLITH = f"{EXPERTS}/monolith"  # the baseline: one model of the experts' preset trained on all the data
ROUTER = "router"
EVALUATION = "evaluation"  # MANIFEST.json + results.json (FID table), grids
PARTIAL = "partial"  # <NNN>/: a partial ensemble's lightweight evaluation (probe-NNN), laid out as evaluation/
DISTILLATION = "distillation"
PROGRESS = "progress"  # progress/<stage-id>.json: latest progress line of each stage, for the operator


def expert(k: int) -> str:
    return f"{EXPERTS}/{k:03d}"


def cluster_shard(k: int, j: int) -> str:
    return f"{CLUSTER_SHARDS}/{k:03d}/{k:03d}-{j:06d}.tar"


def checkpoints(stage_dir: str) -> str:
    return f"{stage_dir}/checkpoints"


def checkpoint(stage_dir: str, step: int) -> str:
    return f"{stage_dir}/checkpoints/step-{step:09d}"


def final(stage_dir: str) -> str:
    """The committed final weights of a trained stage (expert, router, student): its 'done' marker."""
    return f"{stage_dir}/final"


def stage_id(stage: str, index: int | None = None) -> str:
    return stage if index is None else f"{stage}-{index:03d}"
