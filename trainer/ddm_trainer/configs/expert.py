"""Config of the expert stage, and ``TrainerConfig``: the training-loop settings reused by router and distillation.

Torch-free: the operator validates these before it starts a pod.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import DataConfig, StageBase, StrictModel


CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


class TrainerConfig(StrictModel):
    """The generic checkpointed training loop (``ddm_trainer.train_loop.Trainer``)."""

    steps: int = Field(1000, ge=1, description="Optimizer steps in total (a resumed run continues to this)")
    batch_size: int = Field(64, ge=1, description="Per-process batch size (global = batch_size * world_size)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, then constant")
    ema_decay: float = Field(0.9999, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="Max global grad norm; null disables clipping")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16 autocast (CUDA or CPU) or plain fp32")
    compile: bool | None = Field(None, description="Regional torch.compile (per transformer block) for training; "
                                                   "null: on CUDA only (CPU compiles cost more than they save)")
    compile_mode: CompileMode = Field("default", description="torch.compile mode of the compiled blocks: "
                                      "reduce-overhead replays each as a CUDA graph (for small per-GPU batches, "
                                      "where the host sets the pace); max-autotune-no-cudagraphs searches Triton "
                                      "GEMMs with the pointwise work fused in (longer compiles)")
    coordinate_descent_tuning: bool = Field(False, description="inductor's coordinate-descent search of the block "
                                            "sizes of its own kernels (pointwise, norms, reductions; GEMMs stay "
                                            "cuBLAS's) when the blocks compile: ~30 s more compile on DiT-XL/2")
    residual_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="The residual stream between transformer blocks under bf16 autocast: fp32 (autocast's "
        "own choice, from the fp32 position embedding) or bf16 (half the bytes each block reads, writes and saves). "
        "No effect with precision fp32")
    ckpt_every: int = Field(1000, ge=1, description="Checkpoint every N steps (and on SIGTERM)")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the last N committed checkpoints")
    log_every: int = Field(50, ge=1, description="Progress line (and the loss-finiteness check) every N steps")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms: bitwise-exact resume")
    prefetch: int = Field(2, ge=0, le=64, description="Batches decoded ahead in a background thread (0: in the step)")
    micro_batch_size: int | None = Field(None, ge=1, description="Samples per forward/backward; gradients of "
                                         "batch_size / micro_batch_size of them are accumulated into one optimizer "
                                         "step (must divide batch_size). null: the whole batch, shrunk on a CUDA "
                                         "out-of-memory error (activation checkpointing first, then halving)")
    activation_checkpointing: bool | None = Field(None, description="Recompute each transformer block's "
                                                  "activations in the backward pass. null: off unless the first "
                                                  "step runs out of GPU memory")

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> "TrainerConfig":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}")
        return self


class SampleGridConfig(StrictModel):
    """The grid of EMA samples written beside a trained expert."""

    count: int = Field(64, ge=0, description="Images in the grid (0: no grid)")
    nrow: int = Field(8, ge=1)
    steps: int = Field(50, ge=1, description="ODE steps")
    method: Literal["euler", "heun"] = "euler"
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale (class- or text-conditional)")


class ExpertConfig(StageBase):
    """Train one flow-matching DiT on one cluster (or on all data: the monolith baseline)."""

    data: DataConfig
    cluster_index: int | None = Field(None, ge=0, description="Cluster to train on; null = all data (monolith)")
    model: str = Field("DiT-S/2", description="DiT preset, e.g. DiT-S/2, DiT-B/2, DiT-XL/2, DiT-T/4 (CPU)")
    class_cond: bool = Field(False, description="Condition on the data's class labels")
    num_classes: int | None = Field(None, ge=1, description="Number of classes (required with class_cond)")
    label_dropout: float = Field(0.1, ge=0, le=1, description="P(label -> null) for classifier-free guidance")
    t_dist: Literal["uniform", "logit_normal"] = "logit_normal"
    latents: bool = Field(False, description="Train in the VAE latent space: the latents the cluster stage stored with "
                                             "the shards (data.image_size is the images' size; the model's is the "
                                             "latents')")
    text_dim: int | None = Field(None, ge=1, description="Text-conditioned: cross-attend to caption token embeddings "
                                 "of this width, read from the cluster shards (stored by the cluster stage)")
    text_tokens: int = Field(16, ge=1, le=512, description="Caption tokens per image (the text encoder's max_tokens)")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="P(caption -> null caption) for classifier-free "
                                                                "guidance on text")
    train: TrainerConfig = TrainerConfig()
    steps_allocation: Literal["equal", "proportional"] = Field(
        "equal", description="proportional: train.steps is the experts' mean, and this expert trains its cluster's "
                             "share of K x train.steps (clustering.allocated_steps); the monolith ignores it")
    sample_grid: SampleGridConfig = SampleGridConfig()
    init_from_parent: bool = Field(False, description="A grown run (spec.growth.retrain grown): start from the "
                                                      "parent's weights of this expert and train on the cluster's "
                                                      "data of every generation")

    @model_validator(mode="after")
    def _classes(self) -> "ExpertConfig":
        if self.class_cond and self.num_classes is None:
            raise ValueError("class_cond is true but num_classes is not set")
        if self.class_cond and self.data.class_field is None:
            raise ValueError("class_cond is true but data.class_field is null")
        if self.text_dim is not None and self.data.caption_field is None:
            raise ValueError("text_dim is set but data.caption_field is null: there are no captions to condition on")
        return self
