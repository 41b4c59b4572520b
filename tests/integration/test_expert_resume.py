"""Exact resume: N steps + interruption + resume + N steps == 2N uninterrupted steps, bit for bit.

In-process (SIGTERM-style preemption, and a crash after a checkpoint) and through the real ``ddm-train expert`` CLI
in subprocesses SIGKILLed at several points of a checkpoint write (DDM_TEST_CRASH_AT), on real Fashion-MNIST.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

import ddm_trainer.progress as progress
from ddm_trainer import layout
from ddm_trainer.checkpoint import latest_checkpoint, load_final
from ddm_trainer.configs.common import DataConfig
from ddm_trainer.configs.expert import TrainerConfig
from ddm_trainer.data import open_source
from ddm_trainer.errors import ExitCode, PreemptedError
from ddm_trainer.flow import flow_loss
from ddm_trainer.models.dit import build_dit
from ddm_trainer.runtime import setup_runtime
from ddm_trainer.store import FileStore, open_store
from ddm_trainer.train_loop import Trainer

N = 4  # steps before the interruption; runs are 2N steps
STAGE = "experts/000"


def trainer_config(**overrides: Any) -> TrainerConfig:
    fields: dict[str, Any] = dict(steps=2 * N, batch_size=8, lr=1e-3, weight_decay=0.01, warmup_steps=3,
                                  ema_decay=0.9, grad_clip=1.0, precision="fp32", ckpt_every=N, keep_checkpoints=2,
                                  log_every=2, deterministic=True)
    fields.update(overrides)
    return TrainerConfig(**fields)


def make_trainer(store: FileStore, data: DataConfig, init_seed: int, loss_hook: Callable[[int], None] | None = None,
                 **overrides: Any) -> Trainer:
    torch.set_num_threads(1)
    cfg = trainer_config(**overrides)
    rt = setup_runtime("cpu", deterministic=True)
    torch.manual_seed(init_seed)  # a resumed trainer starts from different weights: only the checkpoint can fix that
    model = build_dit("DiT-N/4", data.image_size, data.channels, num_classes=10)
    stream = open_source(data).stream(cfg.batch_size, seed=3, prefetch=cfg.prefetch)  # 2 by default: decoded ahead
    calls = [0]

    def loss_fn(m: torch.nn.Module, batch: Any, gen: torch.Generator) -> torch.Tensor:
        calls[0] += 1
        if loss_hook:
            loss_hook(calls[0])
        return flow_loss(m, batch.images, batch.labels, gen, "logit_normal", label_dropout=0.2)

    return Trainer(model, loss_fn, stream, store, STAGE, cfg, None, seed=7, runtime=rt)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for name in ("model", "ema"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), f"optimizer state {i}.{k} differs"
    assert a.losses == b.losses and len(a.losses) == 2 * N
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.stream.state_dict() == b.stream.state_dict()


@pytest.fixture
def data(fashion_mnist_data_config: Callable[..., DataConfig]) -> DataConfig:
    return fashion_mnist_data_config(image_size=16, limit=64)


@pytest.fixture
def reference(tmp_path: Path, data: DataConfig) -> Trainer:
    trainer = make_trainer(FileStore(tmp_path / "reference"), data, init_seed=0)
    trainer.fit()
    return trainer


def test_preempted_run_resumes_bitwise(tmp_path: Path, data: DataConfig, reference: Trainer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "run")

    def preempt_after_n(call: int) -> None:
        if call == N:  # SIGTERM arrives during step N: the loop checkpoints before step N+1
            monkeypatch.setattr(progress, "_preempted", True)

    with pytest.raises(PreemptedError, match=f"step {N}"):
        make_trainer(store, data, init_seed=0, loss_hook=preempt_after_n).fit()
    assert latest_checkpoint(store, STAGE) == layout.checkpoint(STAGE, N)
    assert store.read_manifest(layout.final(STAGE)) is None
    monkeypatch.setattr(progress, "_preempted", False)

    resumed = make_trainer(store, data, init_seed=1)
    resumed.fit()
    assert_same_state(reference, resumed)
    final = load_final(store, STAGE)
    ref_final = load_final(FileStore(tmp_path / "reference"), STAGE)
    assert all(torch.equal(final.ema[k], ref_final.ema[k]) for k in ref_final.ema)


def test_crash_after_a_checkpoint_replays_the_lost_steps_bitwise(tmp_path: Path, data: DataConfig,
                                                                 reference: Trainer) -> None:
    store = FileStore(tmp_path / "run")

    def crash(call: int) -> None:
        if call == N + 2:  # two steps past the checkpoint at N are lost
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(store, data, init_seed=0, loss_hook=crash).fit()
    assert latest_checkpoint(store, STAGE) == layout.checkpoint(STAGE, N)
    resumed = make_trainer(store, data, init_seed=2)
    resumed.fit()
    assert_same_state(reference, resumed)


def test_finished_stage_is_not_retrained(tmp_path: Path, data: DataConfig, reference: Trainer) -> None:
    again = make_trainer(FileStore(tmp_path / "reference"), data, init_seed=5,
                         loss_hook=lambda call: pytest.fail("a finished stage must not train again"))
    assert again.fit() == reference.losses
    assert all(torch.equal(a, b) for a, b in zip(again.ema.state_dict().values(), reference.ema.state_dict().values()))


# -- through the CLI, SIGKILLed -------------------------------------------------------------------------------------
def write_expert_config(path: Path, run_uri: str, data: DataConfig, **train: Any) -> Path:
    cfg = {
        "run_uri": run_uri, "device": "cpu", "seed": 1, "model": "DiT-N/4", "class_cond": True, "num_classes": 10,
        "data": data.model_dump(mode="json"),
        "train": {**trainer_config().model_dump(mode="json"), "ckpt_every": 2, **train},
        "sample_grid": {"count": 4, "nrow": 2, "steps": 2},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(config: Path, crash_at: str | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DDM_TEST_CRASH_AT", None)
    if crash_at:
        env["DDM_TEST_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "ddm_trainer.cli", "expert", "--config", str(config), *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def final_state(run_uri: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bytes]:
    store = open_store(run_uri)
    final = load_final(store, "experts/monolith")
    return final.model, final.ema, store.read_committed("experts/monolith/report", "loss_curve.json")


@pytest.mark.slow
def test_cli_sigkill_during_checkpoint_write_resumes_bitwise(tmp_path: Path, data: DataConfig) -> None:
    ref = run_cli(write_expert_config(tmp_path / "ref.yaml", str(tmp_path / "ref"), data))
    assert ref.returncode == 0, ref.stderr
    ref_model, ref_ema, ref_curve = final_state(str(tmp_path / "ref"))

    # (kill point, checkpoint that must be the latest after the kill): checkpoints every 2 steps, killed at step 4.
    cases = [("after_state:step=4", 2), ("before_manifest:step=4", 2), ("after_manifest:step=4", 4)]
    for crash_at, survivor in cases:
        run_uri = str(tmp_path / crash_at.split(":")[0])
        config = write_expert_config(tmp_path / f"{crash_at.split(':')[0]}.yaml", run_uri, data)
        killed = run_cli(config, crash_at)
        assert killed.returncode == -signal.SIGKILL, (crash_at, killed.returncode, killed.stderr[-2000:])
        store = open_store(run_uri)
        assert latest_checkpoint(store, "experts/monolith") == layout.checkpoint("experts/monolith", survivor)
        assert store.read_manifest(layout.final("experts/monolith")) is None

        resumed = run_cli(config)
        assert resumed.returncode == 0, resumed.stderr
        assert '"event": "resumed"' in resumed.stdout and f'"step": {survivor}' in resumed.stdout
        model, ema, curve = final_state(run_uri)
        assert curve == ref_curve, crash_at
        for k in ref_model:
            assert torch.equal(model[k], ref_model[k]) and torch.equal(ema[k], ref_ema[k]), (crash_at, k)


def test_cli_non_finite_loss_exits_4_without_checkpointing_the_bad_state(tmp_path: Path, data: DataConfig) -> None:
    run_uri = str(tmp_path / "run")
    config = write_expert_config(tmp_path / "nan.yaml", run_uri, data, lr=1e30, grad_clip=None, warmup_steps=0,
                                 ckpt_every=1, log_every=1, steps=20)
    proc = run_cli(config)
    assert proc.returncode == ExitCode.NON_FINITE_LOSS, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    bad_step = int(lines[0].split(" at step ")[1].split()[0])
    assert any(w in lines[0] for w in ("loss is nan", "loss is inf", "gradient norm is nan", "gradient norm is inf"))
    store = open_store(run_uri)
    committed = store.committed_prefixes(layout.checkpoints("experts/monolith"))
    assert committed, "the good steps before divergence should have been checkpointed"
    assert all(int(p.rsplit("-", 1)[1]) < bad_step for p in committed), (committed, bad_step)
    assert store.read_manifest(layout.final("experts/monolith")) is None


@pytest.mark.slow
def test_cli_two_process_ddp_on_cpu_checkpoints_every_rank_and_resumes(tmp_path: Path, data: DataConfig) -> None:
    """torchrun, 2 ranks (gloo): rank 0 writes, every rank's stream/RNG state is in the checkpoint, resume works."""
    run_uri = str(tmp_path / "ddp")
    config = write_expert_config(tmp_path / "ddp.yaml", run_uri, data, steps=6, ckpt_every=2, keep_checkpoints=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDM_TEST_CRASH_AT": "after_manifest:step=4"}
    # ddm-launch, as the operator's multi-GPU stage command runs it (torchrun's own launcher, the workers' exit code)
    cmd = [sys.executable, "-m", "ddm_trainer.launch", "--standalone", "--nproc_per_node", "2",
           "-m", "ddm_trainer.cli", "expert", "--config", str(config)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # rank 0 was SIGKILLed right after committing step 4 (137; its peer then gets SIGTERM, 143): retryable, where
    # plain torchrun exits 1, which the operator would take as permanent
    assert killed.returncode in (137, 143), (killed.returncode, killed.stderr[-2000:])
    store = open_store(run_uri)
    prefix = latest_checkpoint(store, "experts/monolith")
    assert prefix == layout.checkpoint("experts/monolith", 4)
    from ddm_trainer.checkpoint import load_checkpoint

    state = load_checkpoint(store, prefix)
    assert state["world_size"] == 2 and [s["stream"]["rank"] for s in state["per_rank"]] == [0, 1]
    assert not torch.equal(state["per_rank"][0]["generator"], state["per_rank"][1]["generator"])  # seed per rank

    env.pop("DDM_TEST_CRASH_AT")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '"event": "resumed"' in resumed.stdout
    final = load_final(store, "experts/monolith")
    assert final.config["step"] == 6 and final.config["trainer"]["steps"] == 6


def _worker_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker process of ``rank`` (its RANK environment variable), found through /proc."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_cli_ddp_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path, data: DataConfig) -> None:
    """A node drain may signal one worker first: every rank must stop within one step at the same step, with a
    checkpoint of that step (the checkpoint is collective; a rank left training would hang)."""
    run_uri = str(tmp_path / "ddp")
    # log_every far away: the stop must not wait for a progress line (it once did, under DDP).
    config = write_expert_config(tmp_path / "ddp.yaml", run_uri, data, steps=10_000, ckpt_every=2, log_every=5_000,
                                 keep_checkpoints=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ddm_trainer.cli", "expert", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # rank 0's checkpoint lines: training is under way on both ranks
            if '"event": "checkpoint"' in line and '"step": 4,' in line:
                break
        pid = _worker_pid(proc.pid, rank=1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # rank 1 only
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    steps = {int(m) for m in __import__("re").findall(r"preempted \(SIGTERM\) at step (\d+)", err)}
    assert len(steps) == 1, err[-3000:]  # both ranks report the same step
    assert err.count("preempted (SIGTERM) at step") == 2, err[-3000:]
    step = steps.pop()
    assert 4 <= step < 100
    store = open_store(run_uri)
    assert latest_checkpoint(store, "experts/monolith") == layout.checkpoint("experts/monolith", step)
