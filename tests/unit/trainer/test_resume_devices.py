"""Resume on any device: RNG states come back as CPU byte tensors whatever a loader did with them, checkpoints load
on the CPU and are read once, and background checkpoint writes commit exactly the state of their step.

The GPU cases reproduce the failure seen on the H200 (a checkpoint loaded with ``map_location`` = the CUDA device
moved the CPU generator's state there: ``TypeError: RNG state must be a torch.ByteTensor``); they run wherever a
GPU is visible (the device machine), the CPU cases everywhere.
"""
from __future__ import annotations

import io
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddm_trainer import checkpoint as ckpt
from ddm_trainer import layout
from ddm_trainer.runtime import rng_state, set_rng_state
from ddm_trainer.store import FileStore

STAGE = "experts/001"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def draws() -> tuple[Any, ...]:
    return (torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random(),
            torch.rand(2, device="cuda").tolist() if torch.cuda.is_available() else None)


def round_trip(obj: Any, map_location: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.load(io.BytesIO(buf.getvalue()), map_location=map_location, weights_only=False)


def test_rng_states_restore_from_tensors_a_loader_changed() -> None:
    torch.manual_seed(3)
    saved = rng_state()
    expected = draws()
    # What a loader may hand back: copies in another dtype/layout (a device move on a GPU machine, see below).
    changed = {**saved, "torch": saved["torch"].to(torch.int64)}
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(changed)
    assert draws() == expected


@needs_cuda
def test_rng_states_restore_after_a_load_mapped_to_the_gpu() -> None:
    torch.manual_seed(5)
    torch.cuda.manual_seed_all(5)
    saved = rng_state()
    expected = draws()
    moved = round_trip(saved, torch.device("cuda:0"))  # the map_location the trainer used to pass
    assert moved["torch"].device.type == "cuda"
    torch.manual_seed(1)
    torch.cuda.manual_seed_all(1)
    set_rng_state(moved)
    assert draws() == expected

    gen = torch.Generator(device="cuda").manual_seed(7)
    state = round_trip(gen.get_state(), "cuda:0")
    after = torch.rand(4, device="cuda", generator=gen)
    from ddm_trainer.runtime import host_byte_tensor

    gen.set_state(host_byte_tensor(state))
    assert torch.equal(torch.rand(4, device="cuda", generator=gen), after)


def test_latest_checkpoint_loads_on_the_cpu_reading_the_state_once(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path)
    for step in (1, 2):
        ckpt.save_checkpoint(store, STAGE, step, {"step": step, "rng": rng_state()}, {}, keep=3)
    reads: list[str] = []
    real_get = store.get_bytes
    monkeypatch.setattr(store, "get_bytes", lambda key: (reads.append(key), real_get(key))[1])
    locations: list[Any] = []
    real_from_bytes = ckpt.from_bytes
    monkeypatch.setattr(ckpt, "from_bytes", lambda data, map_location="cpu", trusted=False:
                        (locations.append(map_location), real_from_bytes(data, map_location, trusted))[1])
    prefix, state = ckpt.load_latest_checkpoint(store, STAGE)  # type: ignore[misc]
    assert prefix == layout.checkpoint(STAGE, 2) and state["step"] == 2
    assert [k for k in reads if k.endswith(ckpt.STATE_FILE)] == [f"{prefix}/{ckpt.STATE_FILE}"]
    assert locations == ["cpu"] and state["rng"]["torch"].device.type == "cpu"

    (tmp_path / prefix / ckpt.STATE_FILE).write_bytes(b"torn")  # hash mismatch: the older one is used
    prefix, state = ckpt.load_latest_checkpoint(store, STAGE)  # type: ignore[misc]
    assert prefix == layout.checkpoint(STAGE, 1) and state["step"] == 1


def test_background_write_commits_the_state_at_submit_time(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    release = threading.Event()
    committed: list[tuple[int, dict[str, float]]] = []

    def on_commit(step: int, prefix: str, timing: dict[str, float]) -> None:
        release.wait(10)
        committed.append((step, timing))

    writer = ckpt.CheckpointWriter(store, STAGE, keep=2, on_commit=on_commit)
    weights = torch.zeros(4)
    writer.submit(10, {"w": weights}, {})
    weights.add_(1.0)  # training goes on while the write is in flight: the checkpoint keeps step 10's values
    assert committed == []
    release.set()
    writer.wait()
    state = ckpt.load_checkpoint(store, layout.checkpoint(STAGE, 10))
    assert torch.equal(state["w"], torch.zeros(4))
    assert committed[0][0] == 10 and set(committed[0][1]) == {"stall_s", "write_s"}


def test_background_write_error_reaches_the_training_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path)
    monkeypatch.setattr(store, "put_bytes", lambda key, data: (_ for _ in ()).throw(OSError("disk full")))
    writer = ckpt.CheckpointWriter(store, STAGE, keep=2)
    writer.submit(1, {"w": torch.zeros(1)}, {})
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # reported once



@needs_cuda
def test_gpu_snapshots_reuse_pinned_buffers_and_keep_each_steps_values(tmp_path: Path) -> None:
    """Snapshots of GPU tensors go through pinned host buffers allocated once; the write of step N is never
    overwritten by step N+1's snapshot (submit waits for it), and CPU tensors in the state are plain copies."""
    store = FileStore(tmp_path)
    writer = ckpt.CheckpointWriter(store, STAGE, keep=3)
    weights = torch.zeros(1 << 20, device="cuda")
    writer.submit(1, {"w": weights, "rng": torch.ones(3, dtype=torch.uint8)}, {})
    first = writer._pinned[("w",)]  # type: ignore[index]
    assert first.is_pinned() and ("rng",) not in writer._pinned  # type: ignore[operator]
    weights.add_(1.0)
    writer.submit(2, {"w": weights, "rng": torch.ones(3, dtype=torch.uint8)}, {})
    weights.add_(1.0)
    writer.wait()
    assert writer._pinned[("w",)].data_ptr() == first.data_ptr()  # type: ignore[index]
    for step, value in ((1, 0.0), (2, 1.0)):
        state = ckpt.load_checkpoint(store, layout.checkpoint(STAGE, step))
        assert state["w"].device.type == "cpu" and bool((state["w"] == value).all()), step


def test_cpu_snapshots_are_copies_without_pinned_buffers() -> None:
    buffers: dict = {}
    t = torch.zeros(3)
    host = ckpt.to_host({"a": [t, 1]}, buffers)
    t.add_(1.0)
    assert torch.equal(host["a"][0], torch.zeros(3)) and host["a"][1] == 1 and buffers == {}

@needs_cuda
def test_trainer_preempted_on_the_gpu_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The H200 failure, end to end in-process: preempt a CUDA trainer, resume it in a new one."""
    import ddm_trainer.progress as progress
    from ddm_trainer.configs.expert import TrainerConfig
    from ddm_trainer.errors import PreemptedError
    from ddm_trainer.flow import flow_loss
    from ddm_trainer.models.dit import build_dit
    from ddm_trainer.runtime import setup_runtime
    from ddm_trainer.train_loop import Trainer

    class Noise:
        def __init__(self) -> None:
            self.pos = 0

        def __iter__(self) -> "Noise":
            return self

        def __next__(self) -> torch.Tensor:
            self.pos += 1
            return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(self.pos))

        def state_dict(self) -> dict[str, int]:
            return {"pos": self.pos}

        def load_state_dict(self, s: dict[str, int]) -> None:
            self.pos = s["pos"]

    def make() -> Trainer:
        cfg = TrainerConfig(steps=6, batch_size=8, ckpt_every=100, log_every=1, compile=False)
        model = build_dit("DiT-N/4", 16, 3)
        loss = lambda m, x, g: flow_loss(m, x, None, g, "logit_normal", 0.0)  # noqa: E731
        return Trainer(model, loss, Noise(), FileStore(tmp_path), STAGE, cfg, None, runtime=setup_runtime("cuda"))

    first = make()
    calls = [0]
    real = first.loss_fn

    def preempt_at_3(m: Any, x: Any, g: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            monkeypatch.setattr(progress, "_preempted", True)
        return real(m, x, g)

    first.loss_fn = preempt_at_3
    with pytest.raises(PreemptedError, match="step 3"):
        first.fit()
    monkeypatch.setattr(progress, "_preempted", False)
    second = make()
    assert second.resume() and second.step == 3 and second.stream.state_dict() == {"pos": 3}
    second.fit()
    assert second.step == 6
