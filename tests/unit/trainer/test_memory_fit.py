"""The spec's global batch fits whatever the GPU: gradient accumulation over micro-batches and block-wise
activation checkpointing, chosen on the first step when the config leaves them open (a DiT-XL/2 expert at batch 256
ran out of the H100's 80 GB; the H200 fits it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ddm_trainer.configs.expert import TrainerConfig
from ddm_trainer.data import ImageBatch
from ddm_trainer.models.dit import build_dit
from ddm_trainer.runtime import setup_runtime
from ddm_trainer.store import FileStore
from ddm_trainer.train_loop import Trainer, split_batch

torch.set_num_threads(1)


class Fixed:
    """The same 8 samples every step (no state)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)

    def __iter__(self) -> "Fixed":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "y": self.y}

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, s: dict[str, int]) -> None:
        pass


def mse(m: nn.Module, b: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    return ((m(b["x"]) - b["y"]) ** 2).mean()


def trainer(tmp_path: Path, loss=mse, **cfg: object) -> Trainer:
    torch.manual_seed(0)
    config = TrainerConfig(**{"steps": 3, "batch_size": 8, "lr": 0.1, "grad_clip": None, "precision": "fp32",
                              "compile": False, "log_every": 1, "prefetch": 0, **cfg})
    return Trainer(nn.Linear(4, 1), loss, Fixed(), FileStore(tmp_path), "experts/000", config, None,
                   runtime=setup_runtime("cpu"))


def test_split_batch_cuts_tensors_dicts_and_image_batches_alike() -> None:
    b = ImageBatch(torch.arange(10.0).view(5, 2), torch.arange(5), ["a", "b", "c", "d", "e"])
    parts = split_batch(b, 2)
    assert [p.keys for p in parts] == [["a", "b"], ["c", "d"], ["e"]]
    assert torch.equal(torch.cat([p.images for p in parts]), b.images) and torch.equal(parts[2].labels, torch.tensor([4]))
    d = split_batch({"x0": torch.zeros(4, 3), "t": torch.tensor(0.5)}, 3)
    assert [v["x0"].shape[0] for v in d] == [3, 1] and all(v["t"].dim() == 0 for v in d)
    assert split_batch(torch.zeros(4), 8)[0].shape == (4,)


def test_accumulated_micro_batches_give_the_whole_batch_step(tmp_path: Path) -> None:
    whole, micro = trainer(tmp_path / "a"), trainer(tmp_path / "b", micro_batch_size=2)
    whole.fit()
    micro.fit()
    for a, b in zip(whole.model.parameters(), micro.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    assert whole.losses == pytest.approx(micro.losses, abs=1e-6)


def test_micro_batch_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="does not divide batch_size 8"):
        TrainerConfig(batch_size=8, micro_batch_size=3)


def test_out_of_memory_on_the_first_step_checkpoints_then_halves_the_micro_batch(tmp_path: Path) -> None:
    """What the trainer does on a GPU that cannot hold the batch (played on the CPU: the loss raises the CUDA
    out-of-memory error above 2 samples per forward); the step that fits trains exactly as the whole batch."""
    seen: list[tuple[int, bool]] = []

    def tight(m: nn.Module, b: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
        seen.append((b["x"].shape[0], bool(getattr(t, "activation_checkpointing", False))))
        if b["x"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (played)")
        return mse(m, b, g)

    t = trainer(tmp_path / "t", loss=tight)
    events: list[dict] = []
    t.reporter = type("R", (), {"event": lambda self, name, **kw: events.append({"event": name, **kw})})()
    loss = t._fit_first_step(next(iter(t.stream)))
    assert seen[:3] == [(8, False), (8, True), (4, True)] and t.micro_batch == 2
    assert t.cfg.micro_batch_size == 2 and t.cfg.activation_checkpointing is True  # kept in the final config
    assert events == [{"event": "memory", "step": 0, "micro_batch": 2, "accumulation": 4,
                       "activation_checkpointing": True}]
    ref = trainer(tmp_path / "r")
    assert loss.item() == pytest.approx(ref._forward_backward(next(iter(ref.stream))).item(), abs=1e-6)
    fixed = trainer(tmp_path / "f", loss=tight, micro_batch_size=8, activation_checkpointing=False)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # both set by the user: no second guessing
        fixed._fit_first_step(next(iter(fixed.stream)))


def test_activation_checkpointing_changes_no_output_or_gradient() -> None:
    torch.manual_seed(0)
    model = build_dit("DiT-N/4", 8, 1).train()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    out = model(x, t)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    again = model(x, t)
    again.square().sum().backward()
    assert torch.allclose(out, again)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))
