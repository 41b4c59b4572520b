"""Typed stage configs (pydantic, torch-free): the contract between the operator/local runner and the trainer.

Each stage's config lives in its own module; ``STAGES`` maps the CLI's stage name to (config class path, runner path).
"""
from __future__ import annotations

# stage name -> ("module:ConfigClass", "module:run_function"); imported lazily so `ddm-train --help` is fast
STAGES: dict[str, tuple[str, str]] = {
    "cluster": ("ddm_trainer.configs.cluster:ClusterConfig", "ddm_trainer.stages.cluster:run"),
    "expert": ("ddm_trainer.configs.expert:ExpertConfig", "ddm_trainer.stages.expert:run"),
    "router": ("ddm_trainer.configs.router:RouterConfig", "ddm_trainer.stages.router:run"),
    "sample": ("ddm_trainer.configs.sample:SampleConfig", "ddm_trainer.stages.sample:run"),
    "evaluate": ("ddm_trainer.configs.evaluate:EvaluateConfig", "ddm_trainer.stages.evaluate:run"),
    "distill": ("ddm_trainer.configs.distill:DistillConfig", "ddm_trainer.stages.distill:run"),
}
