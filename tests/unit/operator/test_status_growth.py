"""What the operator reads from the store of a grown run and of a run with partial-ensemble evaluations: the parent
(once its clustering has committed), status.partial from the latest probe, results naming the parent's rows and
experts."""
from __future__ import annotations

from pathlib import Path

from ddm_operator import planner as pl
from ddm_operator.api.models import DecentralizedDiffusionSpec
from ddm_operator.k8s import handlers
from ddm_operator.local.report import write_report
from ddm_operator.partial import describe
from ddm_trainer.store import FileStore


def spec(tmp_path: Path) -> DecentralizedDiffusionSpec:
    return DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/new"}, "clustering": {"numClusters": 3, "fineClusters": 8},
        "experts": {"steps": 10}, "evaluation": {"strategies": ["full"], "partial": {"numSamples": 64}},
        "growth": {"parentUri": "s3://b/ns/parent"}, "storage": {"uri": f"file://{tmp_path}"}})


def row(strategy: str, fid: float) -> dict[str, object]:
    return {"strategy": strategy, "fid": fid, "kid_mean": 0.1, "kid_std": 0.0, "nfe": 2.0, "gflops_per_sample": 1.0,
            "n": 64, "seconds": 1.0}


def test_parent_partial_and_results_of_a_grown_run(tmp_path: Path) -> None:
    s = spec(tmp_path)
    store = FileStore(tmp_path / "ns" / "grown")
    assert handlers._parent(s, "ns", "grown", "uid-1") is None  # nothing committed yet: the planner waits
    store.commit("clustering", {}, {"num_clusters": 3, "grown": [],
                                    "parent": {"uri": "s3://b/ns/parent", "num_clusters": 2, "experts": [0, 1]}})
    parent = handlers._parent(s, "ns", "grown", "uid-1")
    assert parent == pl.ParentObservation("s3://b/ns/parent", 2, frozenset({0, 1}))

    assert handlers._partial(s, "ns", "grown") is None
    store.commit("partial/001", {}, {"table": [row("full", 90.0)], "experts": [0, 1], "missing_experts": [2]})
    store.commit("partial/002", {}, {"table": [row("full", 70.0)], "experts": [0, 1, 2], "missing_experts": []})
    store.commit("partial/003/strategies/full", {}, {"row": row("full", 1.0)})  # a probe not finished: ignored
    partial = handlers._partial(s, "ns", "grown")
    assert partial is not None and (partial.experts, partial.fid, partial.num_samples) == ([0, 1, 2], 70.0, 64)
    assert partial.uri is not None and partial.uri.endswith("/partial/002/results.json")
    assert describe(partial) == "partial ensemble of experts [0, 1, 2]: full FID-64 70.00"

    table = [row("full", 50.0), row("parent:full", 60.0)]
    store.commit("evaluation", {"results.json": b"{}"}, {"table": table, "experts": [0, 1, 2], "missing_experts": [],
                                                          "parent": {"uri": "s3://b/ns/parent", "num_clusters": 2,
                                                                     "experts": [0, 1]}})
    results = handlers._results(s, "ns", "grown")
    assert results is not None and results.parent_uri == "s3://b/ns/parent"
    assert results.artifacts["expert-000"] == "s3://b/ns/parent/experts/000/final"  # by reference
    assert results.artifacts["expert-002"].endswith("/ns/grown/experts/002/final")
    assert handlers._best_fid(results.fid) == 50.0  # the parent's row is a reference, not this run's result


def test_the_report_lists_partial_ensembles_and_puts_the_grown_table_beside_the_parents(tmp_path: Path) -> None:
    import json

    store = FileStore(tmp_path / "run")
    store.commit("partial/001", {}, {"table": [row("full", 90.0)], "experts": [0], "missing_experts": [1, 2]})
    results = {"table": [row("full", 50.0), row("parent:full", 60.0)], "experts": [0, 1, 2], "missing_experts": [],
               "parent": {"uri": "/runs/parent", "num_clusters": 2, "experts": [0, 1]}}
    store.commit("evaluation", {"results.json": json.dumps(results).encode()})
    write_report(store, tmp_path / "run")
    md = (tmp_path / "run" / "report" / "index.md").read_text()
    assert "### grown: K=3, experts [0, 1, 2]" in md and "### parent: K=2, experts [0, 1] (/runs/parent)" in md
    grown, parent = md.split("### grown")[1].split("### parent")
    assert "| full | 50" in grown and "| full | 60" in parent and "parent:" not in parent.split("\n", 1)[1]
    assert "| [0] | full | 90" in md


def test_ddm_status_names_the_parents_experts(tmp_path: Path) -> None:
    from ddm_operator.api.models import DecentralizedDiffusion
    from ddm_operator.local.commands import stage_rows

    def obj(retrain: str) -> DecentralizedDiffusion:
        return DecentralizedDiffusion.model_validate({
            "apiVersion": "ddm.io/v1alpha1", "kind": "DecentralizedDiffusion", "metadata": {"name": "grown"},
            "spec": {**spec(tmp_path).to_wire(), "growth": {"parentUri": "/runs/parent", "retrain": retrain}}})

    store = FileStore(tmp_path / "grown")
    store.commit("clustering", {}, {"num_clusters": 3, "grown": [1],
                                    "parent": {"uri": "/runs/parent", "num_clusters": 2, "experts": [0, 1]}})
    rows = {r[0]: r for r in stage_rows(obj("new"), store)}
    assert rows["expert-000"][1:] == ("parent's", "", "by reference: /runs/parent")
    assert rows["expert-001"][1] == "parent's" and rows["expert-002"][1] == "pending"
    rows = {r[0]: r for r in stage_rows(obj("grown"), store)}
    assert rows["expert-000"][1] == "parent's" and rows["expert-001"][1] == "pending"  # retrained here


def test_the_report_shows_each_strategys_grid_once(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "run")
    store.commit("evaluation/strategies/full", {"grid.png": b"row"}, {})  # a row committed as it finished
    store.commit("evaluation", {"grids/full.png": b"png", "grids/parent-full.png": b"png", "results.json": b"{}"})
    from ddm_operator.local.report import gather

    assert sorted(gather(store, tmp_path / "run").grids) == ["full", "parent-full"]
