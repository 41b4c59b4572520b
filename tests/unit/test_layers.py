"""The layers the architecture promises: the operator never imports torch or faiss; the trainer never kopf/kubernetes.

Checked in a fresh interpreter, since this test process has everything imported already.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

OPERATOR_MODULES = ["ddm_operator.cli", "ddm_operator.planner", "ddm_operator.stages", "ddm_operator.api.crd",
                    "ddm_operator.local.runner", "ddm_operator.local.commands", "ddm_operator.k8s.handlers"]
TRAINER_MODULES = ["ddm_trainer.cli", "ddm_trainer.stages.cluster", "ddm_trainer.stages.expert",
                   "ddm_trainer.stages.router", "ddm_trainer.stages.sample", "ddm_trainer.stages.evaluate",
                   "ddm_trainer.stages.distill"]


def _imported_after(modules: list[str], forbidden: list[str]) -> list[str]:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.parametrize("module", OPERATOR_MODULES)
def test_operator_never_imports_torch_or_faiss(module: str) -> None:
    assert _imported_after([module], ["torch", "faiss", "torchvision", "timm"]) == []


def test_trainer_never_imports_kopf_or_kubernetes() -> None:
    assert _imported_after(TRAINER_MODULES, ["kopf", "kubernetes"]) == []
