"""train.compile_mode: the mode reaches every compiled block; reduce-overhead (CUDA graphs, for small per-GPU batches
where the host sets the pace) trains exactly as the default mode does. The GPU case runs wherever a GPU is visible
(the device machine: ``bash bench/h200.sh stage`` runs this file), the CPU cases everywhere."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ddm_trainer.configs.expert import TrainerConfig
from ddm_trainer.runtime import setup_runtime
from ddm_trainer.store import FileStore
from ddm_trainer.train_loop import Trainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Blocks(nn.Module):
    """What compile_model looks for: a ``blocks`` list, compiled one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class Noise:
    """A seeded stream of batches (no state: the tests do not resume)."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(1)

    def __iter__(self) -> "Noise":
        return self

    def __next__(self) -> torch.Tensor:
        return torch.randn(8, 16, generator=self.gen)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        pass


def trainer(tmp_path: Path, device: str, mode: str, steps: int = 8) -> Trainer:
    torch.manual_seed(0)
    loss = lambda m, x, g: ((m(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()  # noqa: E731
    cfg = TrainerConfig(steps=steps, batch_size=8, lr=1e-2, precision="fp32", compile=True, compile_mode=mode,
                        ckpt_every=1000, log_every=1, prefetch=0)
    return Trainer(Blocks(), loss, Noise(), FileStore(tmp_path), "experts/000", cfg, None,
                   runtime=setup_runtime(device))


def test_the_mode_reaches_every_block_and_cuda_graphs_only_on_cuda(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.append(kw))
    t = trainer(tmp_path / "graphs", "cpu", "reduce-overhead")
    assert seen == [{"mode": "reduce-overhead"}] * 3
    assert t.cudagraphs is False  # no CUDA graphs on the CPU: the mode compiles as the default does there
    seen.clear()
    trainer(tmp_path / "default", "cpu", "default")
    assert seen == [{}] * 3  # the default mode passes nothing: torch.compile's own default


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="compile_mode"):
        TrainerConfig(compile_mode="cudagraphs")


@needs_cuda
def test_cuda_graphs_train_as_the_default_mode_does(tmp_path: Path) -> None:
    default = trainer(tmp_path / "default", "cuda", "default")
    graphs = trainer(tmp_path / "graphs", "cuda", "reduce-overhead")
    assert graphs.cudagraphs
    a, b = default.fit(), graphs.fit()
    assert len(a) == len(b) == 8 and all(torch.isfinite(torch.tensor(b)))
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)  # a stale replayed output would change the curve
    for p, q in zip(default.ema.parameters(), graphs.ema.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
