"""ExpertConfig / TrainerConfig: the contract the operator validates before a pod starts (torch-free)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ddm_trainer.configs.expert import ExpertConfig, TrainerConfig

DATA = {"uri": "/data/shards"}


def test_defaults_and_strictness() -> None:
    cfg = ExpertConfig(run_uri="/tmp/run", data=DATA)
    assert cfg.cluster_index is None and cfg.train.precision == "bf16" and cfg.train.steps >= 1
    with pytest.raises(ValidationError, match="unknown_key|Extra inputs"):
        TrainerConfig(unknown_key=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="precision"):
        TrainerConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="num_classes"):
        ExpertConfig(run_uri="/tmp/run", data=DATA, class_cond=True)
    with pytest.raises(ValidationError, match="class_field"):
        ExpertConfig(run_uri="/tmp/run", data={**DATA, "class_field": None}, class_cond=True, num_classes=10)


def test_configs_import_without_torch() -> None:
    code = ("import sys; import ddm_trainer.configs.expert; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_unknown_preset_exits_2_naming_the_valid_ones(tmp_path: Path) -> None:
    config = tmp_path / "e.yaml"
    config.write_text(f"run_uri: {tmp_path / 'run'}\ndata: {{uri: {tmp_path}}}\nmodel: DiT-Q/3\ndevice: cpu\n")
    proc = subprocess.run([sys.executable, "-m", "ddm_trainer.cli", "expert", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "DiT-Q/3" in proc.stderr and "DiT-XL/2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
