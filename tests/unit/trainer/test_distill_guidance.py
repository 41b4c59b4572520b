"""Distillation teaches the unconditional velocity too: the evaluation samples the student with classifier-free
guidance, which asks for its null-label (null-caption) velocity; a student never shown the null label guides by an
embedding it never trained (lease P's student: FID 48.16 against its teacher's 33.05)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ddm_trainer.errors import ConfigError
from ddm_trainer.models.dit import build_dit
from ddm_trainer.stages import distill

SIZE, CHANNELS, CLASSES = 8, 3, 4
NULL = CLASSES  # the DiT's null label: its last label row


def _batch(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x0": torch.randn(n, CHANNELS, SIZE, SIZE, generator=g), "cluster": torch.zeros(n, dtype=torch.long),
            "y": torch.randint(0, CLASSES, (n,), generator=g)}


class Recording:
    """A teacher that keeps what it was asked (zero velocity)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append({**batch, "t": t})
        return torch.zeros_like(x_t)


class StudentSpy(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []  # type: ignore[var-annotated]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Any = None, *text: Any, **kw: Any) -> torch.Tensor:
        self.seen.append((y, kw.get("text_drop")))
        return self.inner(x, t, y, *text, **kw)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_teacher_and_student_see_the_same_dropped_labels(p: float) -> None:
    teacher, student = Recording(), StudentSpy(build_dit("DiT-N/4", SIZE, CHANNELS, CLASSES))
    batch = _batch()
    distill.distill_loss(teacher, "uniform", label_dropout=p, null_label=NULL)(student, batch,
                                                                               torch.Generator().manual_seed(0))
    (asked,), ((y_student, _),) = teacher.calls, student.seen
    assert torch.equal(asked["y"], y_student)
    nulled = asked["y"] == NULL
    assert torch.equal(asked["y"][~nulled], batch["y"][~nulled])  # a label is kept or nulled, never changed
    low, high = {0.0: (0, 0), 0.5: (4, 28), 1.0: (32, 32)}[p]  # of the 32 labels
    assert low <= int(nulled.sum()) <= high


def test_label_dropout_without_a_null_label_is_refused() -> None:
    with pytest.raises(ConfigError, match="null label"):
        distill.distill_loss(Recording(), label_dropout=0.1)(build_dit("DiT-N/4", SIZE, CHANNELS, CLASSES),
                                                             _batch(), torch.Generator().manual_seed(0))


def test_dropped_captions_reach_the_teacher_without_text_and_the_student_as_text_drop() -> None:
    n, length, dim = 16, 3, 8
    batch = {**_batch(n), "text": torch.randn(n, length, dim), "text_mask": torch.ones(n, length, dtype=torch.bool),
             "text_pooled": torch.randn(n, dim)}
    batch.pop("y")
    teacher = Recording()
    student = StudentSpy(build_dit("DiT-N/4", SIZE, CHANNELS, None, text_dim=dim, text_tokens=length))
    distill.distill_loss(teacher, "uniform", caption_dropout=0.5)(student, batch, torch.Generator().manual_seed(0))
    captioned, uncaptioned = teacher.calls
    assert set(distill.TEXT_KEYS) <= set(captioned) and not set(distill.TEXT_KEYS) & set(uncaptioned)
    (_, drop), = student.seen
    assert drop is not None and int(drop.sum()) == uncaptioned["x0"].shape[0] == n - captioned["x0"].shape[0]
    assert torch.equal(captioned["text"], batch["text"][~drop])  # the kept rows, with their own captions


SCALES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])  # v = SCALES[y] x; the last one, the null label's, unlike any


def _teacher(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A class-conditional teacher whose null velocity differs from every class's."""
    return SCALES[y].view(-1, 1, 1, 1) * x


def _null_error(student: nn.Module) -> float:
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(64, CHANNELS, SIZE, SIZE, generator=g), torch.rand(64, generator=g)
    null = torch.full((64,), NULL, dtype=torch.long)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(student(x, t, null), _teacher(x, t, null)))


def _distilled(label_dropout: float) -> nn.Module:
    torch.manual_seed(3)
    student = build_dit("DiT-N/4", SIZE, CHANNELS, CLASSES)
    loss_fn = distill.distill_loss(lambda x, t, b: _teacher(x, t, b["y"]), "uniform", label_dropout, null_label=NULL)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        loss_fn(student, _batch(), g).backward()
        opt.step()
    return student


def test_with_label_dropout_the_student_learns_the_teachers_null_velocity() -> None:
    """Sixty steps from the same start: only the run that drops labels moves the student's null velocity to the
    teacher's; without it the null label's embedding never gets a gradient."""
    with_dropout, without = _null_error(_distilled(0.3)), _null_error(_distilled(0.0))
    assert with_dropout < 0.5 * without, (with_dropout, without)
