"""Config of the distillation stage: one dense DiT student regressing the experts' velocities.

Torch-free: the operator validates it before it starts a pod.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..combine import STRATEGY_HELP
from .common import DataConfig, StageBase
from .expert import SampleGridConfig, TrainerConfig
from .sample import StrategyName


class DistillConfig(StageBase):
    """Train ``distillation/``: a student DiT with MSE to the teacher velocity at the same (x_t, t)."""

    data: DataConfig = Field(description="Training images (the data the experts were trained on)")
    model: str = Field("DiT-S/2", description="Student DiT preset, e.g. DiT-S/2, DiT-B/2, DiT-T/4 (CPU)")
    teacher: Literal["expert-of-cluster", "ensemble"] = Field(
        "expert-of-cluster", description="expert-of-cluster: each image's own cluster expert (the paper); "
                                         "ensemble: the router-combined experts with `strategy`")
    strategy: StrategyName = Field("full", description=f"Combination for teacher=ensemble: {STRATEGY_HELP}")
    t_dist: Literal["uniform", "logit_normal"] = "logit_normal"
    use_ema: bool = Field(True, description="Teachers use their EMA weights")
    label_dropout: float = Field(0.1, ge=0, le=1, description="P(label -> null), for teacher and student alike: "
                                 "the student learns the unconditional velocity guidance needs")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="P(caption -> null caption), as label_dropout")
    train: TrainerConfig = TrainerConfig()
    sample_grid: SampleGridConfig = SampleGridConfig()

    @model_validator(mode="after")
    def _ensemble_needs_a_router_strategy(self) -> "DistillConfig":
        if self.teacher == "ensemble" and self.strategy == "oracle":
            raise ValueError("strategy 'oracle' draws one expert per sampled trajectory, and distillation has none: "
                             "teacher 'expert-of-cluster' is the oracle here (each image's own cluster's expert)")
        return self
