"""ddm-launch: torchrun with the workers' most telling exit code (torchrun itself exits 1 on any worker failure)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddm_trainer.launch import telling_exit_code


def test_the_most_telling_code_wins() -> None:
    assert telling_exit_code([-9, 1]) == 137  # rank 0 killed, rank 1's collective then failed (exit 1): retryable
    assert telling_exit_code([2, 2]) == 2  # a bad config on every rank: permanent
    assert telling_exit_code([-9, -15]) == 137  # rank 0 OOM-killed, rank 1 then stopped by torchrun: retryable
    # rank 1 refused its config (2) and torchrun SIGTERMed rank 0 before it refused too (the race CI hit)
    assert telling_exit_code([-15, 2]) == 2
    assert telling_exit_code([-15, -15]) == 143  # SIGTERM to the workers alone: a stop, retryable
    assert telling_exit_code([137]) == 137
    assert telling_exit_code([0]) == 1  # torchrun said failed but no worker code: a plain failure


@pytest.mark.slow
def test_two_workers_exit_code_reaches_the_launcher(tmp_path: Path) -> None:
    """Two real torchrun workers whose stage refuses its config (exit 2): torchrun would exit 1, ddm-launch 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_uri: 3\n")  # a config the expert stage refuses
    cmd = [sys.executable, "-m", "ddm_trainer.launch", "--standalone", "--nproc-per-node=2",
           "-m", "ddm_trainer.cli", "expert", "--config", str(bad)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[3:]], env=env, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 1, plain.stderr[-2000:]  # what the launcher fixes
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "exiting 2" in proc.stderr
