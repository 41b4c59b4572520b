"""Config of the router stage: a classifier p(k | x_t, t[, y]) trained on noisy images against their cluster ids.

Torch-free: the operator validates it before it starts a pod.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import DataConfig, StageBase, StrictModel
from .expert import TrainerConfig


class RouterEvalConfig(StrictModel):
    """Held-out top-1 accuracy as a function of t, committed beside the router."""

    holdout: int = Field(512, ge=0, description="Samples held out of training for evaluation (0: no evaluation)")
    bins: int = Field(10, ge=1, le=100, description="Equal-width bins of t in [0, 1]")
    draws: int = Field(1, ge=1, description="Noise draws per held-out image and bin")
    batch_size: int = Field(256, ge=1)


class RouterConfig(StageBase):
    """Train the router over all clustered data: x_t = (1 - t) x0 + t eps, cross-entropy against x0's cluster."""

    data: DataConfig
    num_clusters: int = Field(ge=2, description="K; must equal the clustering stage's number of clusters")
    preset: str = Field("Router-B/2", description="Router-B/2 (DiT-B/2 backbone), Router-S/2, Router-T/4 (CPU), ...")
    num_classes: int | None = Field(None, ge=1, description="Class-conditional router p(k | x_t, t, y) over this "
                                                          "many classes (data.class_field gives y); null: p(k | x_t, t)")
    latents: bool = Field(False, description="Route VAE latents (stored with the cluster shards), as latent-space "
                                             "experts see them; false: pixels")
    text_dim: int | None = Field(None, ge=1, description="Caption-conditional router p(k | x_t, t, c) on the pooled "
                                 "caption embeddings of this width stored with the cluster shards; null: no caption")
    label_dropout: float = Field(0.1, ge=0, lt=1, description="Share of training labels (and captions) replaced by "
                                                               "the null one, so the same router also gives p(k | x_t, t)")
    t_dist: Literal["uniform", "logit_normal"] = Field("uniform", description="Distribution of training times t")
    use_ema: bool = Field(True, description="Evaluate and sample with the EMA weights (else the raw weights)")
    train: TrainerConfig = TrainerConfig()
    eval: RouterEvalConfig = RouterEvalConfig()

    @model_validator(mode="after")
    def _captions(self) -> "RouterConfig":
        if self.text_dim is not None and self.data.caption_field is None:
            raise ValueError("text_dim is set but data.caption_field is null: there are no captions to condition on")
        return self
