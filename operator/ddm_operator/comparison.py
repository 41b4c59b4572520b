"""The question every DDM answers first: does the ensemble beat one model trained on the same compute?

Pure and torch-free: the operator's status, ``ddm status`` and the report all read the evaluation table through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

MONOLITH = "monolith"  # the evaluation table's row of the baseline (spec.baseline)
STUDENT = "student"  # the evaluation table's row of the distilled student (spec.distillation)
PARENT = "parent:"  # a grown run's rows of its parent's ensemble (spec.growth.compareParent)
ORACLE = "oracle"  # the mixture oracle: each sample's expert from its class or training caption, a reference row


@dataclass(frozen=True)
class Comparison:
    best_strategy: str
    best_fid: float
    monolith_fid: float

    @property
    def ratio(self) -> float:
        """Best routing strategy's FID over the monolith's: below 1 the ensemble wins."""
        return self.best_fid / self.monolith_fid

    def sentence(self) -> str:
        verdict = "beats" if self.ratio < 1 else "does not beat"
        return (f"best strategy {self.best_strategy} FID {self.best_fid:.2f} vs the compute-matched monolith "
                f"{self.monolith_fid:.2f}: ratio {self.ratio:.3f} (the ensemble {verdict} it)")


def best_fid(rows: Iterable[tuple[str, float | None]]) -> tuple[str, float] | None:
    """(strategy, FID) of the best routing strategy; the monolith row, the student row and a grown run's
    parent:<strategy> rows are not routing strategies of this DDM's ensemble, and the mixture oracle is the
    reference routing is measured against (it knows each FID caption's training image)."""
    scored = [(s, f) for s, f in rows
              if s not in (MONOLITH, STUDENT, ORACLE) and not s.startswith(PARENT) and f is not None]
    return min(scored, key=lambda sf: sf[1]) if scored else None


def compare(rows: Iterable[tuple[str, float | None]]) -> Comparison | None:
    """The comparison, when the table has both a routing strategy and a (positive) monolith FID."""
    rows = list(rows)
    best = best_fid(rows)
    monolith = next((f for s, f in rows if s == MONOLITH and f is not None), None)
    if best is None or not monolith or monolith <= 0:
        return None
    return Comparison(best[0], best[1], monolith)


@dataclass(frozen=True)
class StudentComparison:
    student_fid: float
    monolith_fid: float

    @property
    def ratio(self) -> float:
        """The distilled student's FID over the monolith's: the paper's target is within 10% (ratio <= 1.1)."""
        return self.student_fid / self.monolith_fid

    def sentence(self) -> str:
        return (f"distilled student FID {self.student_fid:.2f} vs the compute-matched monolith "
                f"{self.monolith_fid:.2f}: ratio {self.ratio:.3f}")


def compare_student(rows: Iterable[tuple[str, float | None]]) -> StudentComparison | None:
    """The student's comparison, when the table has a student row and a (positive) monolith FID."""
    fids = {s: f for s, f in rows if s in (STUDENT, MONOLITH) and f is not None}
    if STUDENT not in fids or not fids.get(MONOLITH) or fids[MONOLITH] <= 0:
        return None
    return StudentComparison(fids[STUDENT], fids[MONOLITH])
