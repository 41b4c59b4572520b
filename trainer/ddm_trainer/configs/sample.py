"""Config of the sample stage: draw images from the expert ensemble combined by the router.

Torch-free: the operator validates it before it starts a pod (strategy strings are parsed by ``combine``,
which imports torch only inside its tensor functions).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ..combine import STRATEGY_HELP, parse_strategy
from ..errors import ConfigError
from .common import StageBase


def strategy_name(value: str) -> str:
    """A strategy string in its canonical spelling ("Top-1" -> "top1"); unknown ones are a validation error."""
    try:
        return parse_strategy(value).name
    except ConfigError as e:
        raise ValueError(str(e)) from None


StrategyName = Annotated[str, AfterValidator(strategy_name)]


class SampleConfig(StageBase):
    """Writes ``samples/<name>/`` in the run store: grid.png, samples.npz (uint8 images + labels), NFE/GFLOPs."""

    strategy: StrategyName = Field("full", description=f"How expert velocities are combined: {STRATEGY_HELP}")
    n: int = Field(64, ge=1, description="Images to draw")
    batch_size: int = Field(64, ge=1)
    steps: int = Field(50, ge=1, description="ODE steps from t=1 to t=0")
    method: Literal["euler", "heun"] = "euler"
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale (class- or text-conditional "
                                                    "experts)")
    labels: list[int] | None = Field(None, description="Class labels, cycled over the n images (conditional "
                                                       "experts; default: uniform random)")
    prompts: list[str] | None = Field(None, description="Captions for text-conditioned experts: n images per "
                                      "prompt, a grid each (encoded with the run's text encoder)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._@-]+$",
                             description="Output directory under samples/ (default: the strategy's name)")
    nrow: int = Field(8, ge=1, description="Images per row of the grid")
    grid_max: int = Field(64, ge=1, description="At most this many images in grid.png")
    use_ema: bool = Field(True, description="Use the experts' EMA weights")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: networks under bf16 autocast (GPU); the "
                                                                    "ODE state stays fp32")
    expert_devices: list[str] | None = Field(None, description="One device per expert (e.g. cuda:0, cuda:1, ...); "
                                                               "default: all on `device`")
