"""The ensemble against the compute-matched monolith (spec.baseline): one computation behind the operator's
status (results.bestVsMonolith, the "vs Monolith" column), `ddm status` and the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddm_operator.comparison import best_fid, compare, compare_student
from ddm_trainer.store import FileStore

TABLE = [  # as the evaluate stage commits it, the monolith row last
    {"strategy": "full", "fid": 41.5, "kid_mean": 0.02, "nfe": 200.0, "gflops_per_sample": 9.0, "n": 200},
    {"strategy": "top1", "fid": 36.0, "kid_mean": 0.01, "nfe": 50.0, "gflops_per_sample": 3.0, "n": 200},
    {"strategy": "monolith", "fid": 40.0, "kid_mean": 0.02, "nfe": 50.0, "gflops_per_sample": 3.0, "n": 200},
]


def rows(table: list[dict]) -> list[tuple[str, float]]:
    return [(r["strategy"], r["fid"]) for r in table]


def test_the_best_strategy_is_compared_with_the_monolith_and_never_is_it() -> None:
    vs = compare(rows(TABLE))
    assert vs is not None and (vs.best_strategy, vs.best_fid, vs.monolith_fid) == ("top1", 36.0, 40.0)
    assert vs.ratio == pytest.approx(0.9) and "beats it" in vs.sentence()
    worse = compare([("full", 50.0), ("monolith", 40.0)])
    assert worse is not None and worse.ratio == 1.25 and "does not beat it" in worse.sentence()
    assert best_fid([("monolith", 1.0), ("top1", 5.0)]) == ("top1", 5.0)  # a baseline is no DDM result
    assert best_fid([("oracle", 2.0), ("top1", 5.0)]) == ("top1", 5.0)  # nor is the oracle routing is measured by
    assert compare(rows(TABLE[:2])) is None and compare([("monolith", 40.0)]) is None


def test_status_results_carry_the_ratio(tmp_path: Path) -> None:
    from ddm_operator.api.models import DecentralizedDiffusionSpec
    from ddm_operator.k8s import handlers

    spec = DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/data"}, "clustering": {"numClusters": 2, "fineClusters": 16},
        "experts": {"steps": 10}, "storage": {"uri": f"file://{tmp_path}"}, "baseline": {}})
    FileStore(tmp_path / "ns" / "run").commit("evaluation", {"results.json": b"{}"},
                                              {"table": TABLE, "experts": [0], "missing_experts": [1]})
    results = handlers._results(spec, "ns", "run")
    assert results is not None and results.best_vs_monolith == 0.9
    assert (results.experts, results.missing_experts) == ([0], [1])  # a partial ensemble says what it held
    assert results.artifacts["baseline"].endswith("/ns/run/experts/monolith/final")
    assert handlers._best_fid(results.fid) == 36.0


def test_the_report_states_the_comparison(tmp_path: Path) -> None:
    from ddm_operator.local.report import write_report

    store = FileStore(tmp_path / "run")
    store.commit("evaluation", {"results.json": json.dumps({"table": TABLE}).encode()})
    html = write_report(store, tmp_path / "run", title="t").read_text()
    assert "Against the compute-matched monolith" in html and "ratio 0.900" in html
    assert "ratio 0.900 (the ensemble beats it)" in (tmp_path / "run" / "report" / "index.md").read_text()


def test_the_report_says_which_experts_a_partial_ensemble_held(tmp_path: Path) -> None:
    from ddm_operator.local.report import write_report

    store = FileStore(tmp_path / "run")
    store.commit("evaluation", {"results.json": json.dumps(
        {"table": TABLE[:2], "experts": [0, 2, 3], "missing_experts": [1]}).encode()})
    md = (write_report(store, tmp_path / "run", title="t").parent / "index.md").read_text()
    assert "A partial ensemble: experts [0, 2, 3] of 4 (missing: [1], failed for good)" in md


STUDENT_ROW = {"strategy": "student", "fid": 42.0, "kid_mean": 0.02, "nfe": 50.0, "gflops_per_sample": 3.0, "n": 200}


def test_the_student_is_compared_with_the_monolith_and_is_no_routing_strategy() -> None:
    student = compare_student(rows([*TABLE, STUDENT_ROW]))
    assert student is not None and student.ratio == pytest.approx(1.05) and "ratio 1.050" in student.sentence()
    assert compare_student(rows(TABLE)) is None and compare_student([("student", 5.0)]) is None
    assert best_fid([("student", 1.0), ("top1", 5.0)]) == ("top1", 5.0)  # the best routing strategy, never it
    vs = compare(rows([*TABLE, {**STUDENT_ROW, "fid": 1.0}]))
    assert vs is not None and vs.best_strategy == "top1"


def test_status_and_report_carry_the_students_ratio(tmp_path: Path) -> None:
    from ddm_operator.api.models import DecentralizedDiffusionSpec
    from ddm_operator.k8s import handlers
    from ddm_operator.local.report import write_report

    spec = DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/data"}, "clustering": {"numClusters": 2, "fineClusters": 16},
        "experts": {"steps": 10}, "storage": {"uri": f"file://{tmp_path}"}, "baseline": {},
        "distillation": {"enabled": True}})
    table = [*TABLE, STUDENT_ROW]
    FileStore(tmp_path / "ns" / "run").commit("evaluation", {"results.json": b"{}"}, {"table": table})
    results = handlers._results(spec, "ns", "run")
    assert results is not None and results.student_vs_monolith == 1.05 and results.best_vs_monolith == 0.9
    assert results.to_wire()["studentVsMonolith"] == 1.05
    assert handlers._best_fid(results.fid) == 36.0
    store = FileStore(tmp_path / "local")
    store.commit("evaluation", {"results.json": json.dumps({"table": table}).encode()})
    md = (write_report(store, tmp_path / "local", title="t").parent / "index.md").read_text()
    assert "**The distilled student against the monolith:** distilled student FID 42.00 vs the compute-matched " \
           "monolith 40.00: ratio 1.050" in md
    assert "| student |" in md


def test_the_status_reads_the_table_again_once_the_students_row_is_committed() -> None:
    """The operator reads a committed table once (it does not change), and once more when evaluate-student succeeded:
    that commit holds the student's row."""
    from ddm_operator.api.models import DecentralizedDiffusionStatus, Results, StrategyResult
    from ddm_operator.k8s.handlers import _table_to_read
    from ddm_operator.k8s.observe import JobState

    def jobs(**phases: str) -> dict[str, JobState]:
        return {key.replace("_", "-"): JobState(key.replace("_", "-"), 1, f"x-{key}-a1", phase)  # type: ignore[arg-type]
                for key, phase in phases.items()}

    def status(*rows: str) -> DecentralizedDiffusionStatus:
        return DecentralizedDiffusionStatus(results=Results(fid=[StrategyResult(strategy=s, fid=1.0) for s in rows]))

    empty = DecentralizedDiffusionStatus()
    assert not _table_to_read(jobs(evaluate="Running"), empty)
    assert _table_to_read(jobs(evaluate="Succeeded", distill="Running"), empty)
    assert not _table_to_read(jobs(evaluate="Succeeded", distill="Running"), status("top1", "monolith"))
    assert not _table_to_read(jobs(evaluate="Succeeded", evaluate_student="Running"), status("top1", "monolith"))
    assert _table_to_read(jobs(evaluate="Succeeded", evaluate_student="Succeeded"), status("top1", "monolith"))
    assert not _table_to_read(jobs(evaluate="Succeeded", evaluate_student="Succeeded"), status("top1", "student"))
