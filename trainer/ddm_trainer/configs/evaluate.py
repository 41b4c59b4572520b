"""Config of the evaluation stage: FID/KID of each combination strategy against the training data.

Torch-free: the operator validates it before it starts a pod.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..combine import STRATEGY_HELP
from .common import DataConfig, StageBase
from .sample import strategy_name

MONOLITH_ROW = "monolith"  # the K=1 baseline (experts/monolith) as one more row of the table
STUDENT_ROW = "student"  # the distilled dense student (distillation/), sampled like the monolith
PARENT_ROW = "parent:"  # parent:<strategy>: a grown run's parent ensemble, on the grown run's reference images


class EvaluateConfig(StageBase):
    """Writes ``evaluation/``: results.json, results.md (the table) and grids/<strategy>.png."""

    data: DataConfig = Field(description="Reference images (the training data) for the FID/KID statistics")
    strategies: list[str] = Field(["full", "top1", "top-2", "sample-2", "nucleus-0.9"], min_length=1,
                                  description=f"Rows of the table: {STRATEGY_HELP}, '{MONOLITH_ROW}', "
                                              f"'{STUDENT_ROW}' (the distilled student), or "
                                              f"'{PARENT_ROW}<strategy>' (a grown run's parent ensemble)")
    n_samples: int = Field(10_000, ge=2, description="Generated images per strategy (FID-N)")
    reference_n: int = Field(10_000, ge=2, description="Training images in the reference statistics")
    batch_size: int | None = Field(None, ge=1, description="Images per sampling batch and process (null: about 1024 "
                                                            "per expert call on a GPU, 256 on a CPU: a routed strategy "
                                                            "draws up to 4x that at once)")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Networks under bf16 autocast (the ODE state "
                                                                    "stays fp32)")
    compile: bool | None = Field(None, description="Regional torch.compile of experts and router (null: on CUDA)")
    steps: int = Field(50, ge=1, description="ODE steps from t=1 to t=0")
    method: Literal["euler", "heun"] = "euler"
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale (class- or text-conditional "
                                                    "experts)")
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size (capped at half the smaller set's size)")
    kid_subsets: int = Field(100, ge=1)
    grid_count: int = Field(64, ge=0, description="Images in each strategy's PNG grid (0: none)")
    grid_nrow: int = Field(8, ge=1)
    use_ema: bool = Field(True, description="Sample with the EMA weights")
    prompts: list[str] | None = Field(None, description="Captions (text-conditioned experts): a grid of grid_nrow "
                                      "images per prompt, drawn with the first strategy, committed as "
                                      "prompts/<prompt>.png")
    output: str = Field("evaluation", pattern=r"^[a-z0-9_/-]+$",
                        description="Store prefix the results are committed under (partial/NNN: the lightweight "
                                    "evaluation of a partial ensemble while experts train)")
    progress: str | None = Field(None, pattern=r"^[a-z0-9-]+$",
                                 description="The stage id it reports progress as (progress/<id>.json; null: "
                                             "evaluate, or probe-NNN for output partial/NNN)")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            if s.strip().lower() in (MONOLITH_ROW, STUDENT_ROW):
                out.append(s.strip().lower())
                continue
            if s.startswith(PARENT_ROW):
                out.append(PARENT_ROW + strategy_name(s[len(PARENT_ROW):]))
                continue
            out.append(strategy_name(s))
        dup = sorted({s for s in out if out.count(s) > 1})
        if dup:
            raise ValueError(f"strategy {dup[0]!r} is listed twice")
        return out

    @model_validator(mode="after")
    def _sizes(self) -> "EvaluateConfig":
        if self.data.limit is not None and self.reference_n > self.data.limit:
            raise ValueError(f"reference_n={self.reference_n} exceeds data.limit={self.data.limit}")
        return self
