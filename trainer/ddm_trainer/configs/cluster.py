"""Config of the clustering stage: encoder features -> fine k-means -> K coarse clusters (one expert each).

Torch-free: the operator validates it before it starts a pod.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import DataConfig, StageBase, StrictModel, TextEncoderConfig, VaeConfig


class ClusterGrowth(StrictModel):
    """The new data of a grown run beside its parent's clusters (``ddm_trainer.growth``)."""

    parent_uri: str = Field(description="The parent run's root (its run_uri)")
    assignment: Literal["new-clusters", "nearest"] = Field(
        "new-clusters", description="new-clusters: cluster the new data into num_clusters minus the parent's K new "
                                    "clusters; nearest: assign it to the parent's clusters (nearest fine centroid, "
                                    "then its coarse cluster)")


class ClusterConfig(StageBase):
    """Partition the dataset into ``num_clusters`` clusters; commits assignments under ``<run>/clustering``."""

    data: DataConfig
    num_clusters: int = Field(ge=1, le=4096, description="K: coarse clusters = experts")
    fine_clusters: int = Field(1024, ge=1, le=1_000_000,
                               description="Fine k-means centroids, merged into K (fewer are used on small data)")
    method: Literal["kmeans", "random"] = Field("kmeans", description="random: a uniform random partition (ablation)")
    encoder: str = Field("efficientnet_lite0",
                         description="efficientnet_lite0 | raw-pixels | dinov2_vit{s,b,l,g}14 | any timm model name")
    encoder_weights: str | None = Field(None, description="Weights file or store URI (required for timm models)")
    encoder_resolution: int | None = Field(None, ge=16, le=1024,
                                           description="Encoder input size (efficientnet_lite0 default 224)")
    embed_batch_size: int = Field(256, ge=1)
    encode_part_size: int = Field(4096, ge=256, multiple_of=256,
                                  description="Samples per committed part of the encode step (ranks share out parts)")
    max_cluster_fraction: float | None = Field(None, gt=0, le=1,
                                               description="Balance bound: no cluster holds more than this share")
    kmeans_iters: int = Field(20, ge=1, le=1000)
    examples_per_cluster: int = Field(8, ge=0, le=64, description="Images per cluster in examples.png (0: none)")
    growth: ClusterGrowth | None = Field(None, description="Grow a parent run (spec.growth): cluster only data.uri, "
                                                           "the new data, beside the parent's clusters")
    text_encoder: TextEncoderConfig | None = Field(None, description="Embed every caption (data.caption_field) "
                                                   "once with it and store the embeddings with the cluster shards")
    vae: VaeConfig | None = Field(None, description="Encode every image (and its horizontal flip) once into this "
                                             "VAE's latents, stored with the cluster shards (latent-space experts)")

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.text_encoder is not None and self.data.caption_field is None:
            raise ValueError("text_encoder is set but data.caption_field is null: there are no captions to embed")
        if self.fine_clusters < self.num_clusters:
            raise ValueError(f"fine_clusters={self.fine_clusters} must be >= num_clusters={self.num_clusters}")
        if self.max_cluster_fraction is not None and self.max_cluster_fraction * self.num_clusters < 1:
            raise ValueError(f"max_cluster_fraction={self.max_cluster_fraction} x num_clusters={self.num_clusters} "
                             "< 1: no partition fits")
        return self
