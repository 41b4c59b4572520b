"""A grown DDM and the partial ensemble's evaluation through the operator on the real API server (the training
operator played as in test_operator.py; the trainer's committed manifests written into the run store as its stages
commit them): only the new expert and the router get jobs, the parent's experts are Succeeded by reference, a
probe job follows each expert that lands while others train, status.partial and the Partial FID column show its
FID, and the results name the parent's rows and experts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from integration.test_operator import Harness, Operator, ddm_crd, ddm_spec, h, operator, wait_for  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.k8s]


def row(strategy: str, fid: float) -> dict[str, object]:
    return {"strategy": strategy, "fid": fid, "kid_mean": 0.01, "nfe": 100.0, "gflops_per_sample": 1.0, "n": 64}


def test_grown_ddm_trains_only_new_experts_and_shows_partial_fid(operator: Operator, h: Harness,
                                                                  tmp_path: Path) -> None:
    from ddm_trainer.store import FileStore

    parent_uri = f"file://{tmp_path}/runs/{h.ns}/parent"
    h.create("grown", ddm_spec(4, tmp_path, growth={"parentUri": parent_uri},
                               evaluation={"strategies": ["full"], "partial": {"numSamples": 64}}))
    h.wait_jobs("grown-cluster-a1")
    cluster = h.stage_config("grown-cluster-a1")
    assert cluster["growth"] == {"parent_uri": parent_uri, "assignment": "new-clusters"}
    store = FileStore(tmp_path / "runs" / h.ns / "grown")
    store.commit("clustering", {}, {"num_clusters": 4, "sizes": [0, 0, 0, 60], "grown": [],  # as the stage does
                                    "parent": {"uri": parent_uri, "num_clusters": 3, "experts": [0, 1, 2]}})
    h.succeed("grown-cluster-a1")

    h.wait_jobs("grown-expert-003-a1", "grown-router-a1")
    status = wait_for(lambda: (s := h.status("grown")).get("expertsReady") == 3 and s, "3 experts by reference")
    assert [e["phase"] for e in status["experts"]][:3] == ["Succeeded"] * 3, status["experts"]
    assert status["experts"][3]["jobName"] == "grown-expert-003-a1"
    assert parent_uri in status["experts"][0]["message"]

    h.succeed("grown-router-a1")  # three experts committed, one training: the partial ensemble is evaluated
    jobs = h.wait_jobs("grown-probe-003-a1")
    assert not any(re.match(r"grown-expert-00[0-2]", name) for name in jobs), sorted(jobs)  # never trained here
    probe = h.stage_config("grown-probe-003-a1")
    assert (probe["output"], probe["strategies"], probe["n_samples"]) == ("partial/003", ["full"], 64)
    store.commit("partial/003", {"results.json": b"{}"}, {"table": [row("full", 80.0)], "experts": [0, 1, 2],
                                                          "missing_experts": [3]})
    h.succeed("grown-probe-003-a1")
    partial = wait_for(lambda: h.status("grown").get("partial"), "status.partial")
    assert (partial["experts"], partial["missingExperts"], partial["fid"]) == ([0, 1, 2], [3], 80.0)
    out = h.plane.kubectl("get", "ddm", "grown", "-n", h.ns).stdout
    assert "PARTIAL FID" in out and re.search(r"\b80\b", out), out

    h.succeed("grown-expert-003-a1")
    h.wait_jobs("grown-evaluate-a1")
    evaluate = h.stage_config("grown-evaluate-a1")
    assert evaluate["strategies"] == ["full", "parent:full"]
    store.commit("evaluation", {"results.json": b"{}"}, {
        "table": [row("full", 50.0), row("parent:full", 60.0)], "experts": [0, 1, 2, 3], "missing_experts": [],
        "parent": {"uri": parent_uri, "num_clusters": 3, "experts": [0, 1, 2]}})
    h.succeed("grown-evaluate-a1")
    status = h.wait_phase("grown", "Succeeded")
    assert status["bestFid"] == 50.0 and status["results"]["parentUri"] == parent_uri
    assert status["results"]["artifacts"]["expert-000"] == f"{parent_uri}/experts/000/final"
    assert status["results"]["artifacts"]["expert-003"].endswith("/grown/experts/003/final")
    assert sorted(h.jobs()) == ["grown-cluster-a1", "grown-evaluate-a1", "grown-expert-003-a1", "grown-probe-003-a1",
                                "grown-router-a1"]
