"""spec.baseline through the operator on the real API server: the compute-matched monolith's PyTorchJob runs
`ddm-train expert` on all the data beside the experts, the evaluation waits for it, and the status and
`kubectl get ddm` say how the best strategy compares with it. The training operator is played as in
test_operator.py (job conditions set on the status subresource)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from integration.test_operator import Harness, Operator, ddm_crd, ddm_spec, h, operator, wait_for  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.k8s]


def test_baseline_job_runs_beside_the_experts_and_status_compares(operator: Operator, h: Harness,
                                                                  tmp_path: Path) -> None:
    h.create("base", ddm_spec(2, tmp_path, baseline={"steps": 40}))
    h.wait_jobs("base-cluster-a1")
    h.succeed("base-cluster-a1")
    jobs = h.wait_jobs("base-expert-000-a1", "base-expert-001-a1", "base-router-a1", "base-baseline-a1")
    container = jobs["base-baseline-a1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["ddm-train", "expert"], container["command"]
    config = h.stage_config("base-baseline-a1")
    assert config["cluster_index"] is None and config["train"]["steps"] == 40  # all the data, its own budget

    for name in ("base-expert-000-a1", "base-expert-001-a1", "base-router-a1"):
        h.succeed(name)
    wait_for(lambda: h.status("base").get("expertsReady") == 2, "2 experts ready")
    status = h.status("base")
    assert status["phase"] == "Training" and "baseline" in status["message"], status  # the evaluation waits
    assert "base-evaluate-a1" not in h.jobs()
    h.job_status("base-baseline-a1", ("Created", ""), ("Running", ""))
    wait_for(lambda: h.status("base")["stages"]["baseline"]["phase"] == "Running", "baseline Running")

    h.succeed("base-baseline-a1")
    h.wait_jobs("base-evaluate-a1")
    evaluate = h.stage_config("base-evaluate-a1")
    assert evaluate["strategies"][-1] == "monolith"
    from ddm_trainer.store import FileStore

    table = [{"strategy": "full", "fid": 12.5, "nfe": 100.0, "n": 100},
             {"strategy": "top1", "fid": 9.0, "nfe": 50.0, "n": 100},
             {"strategy": "monolith", "fid": 10.0, "nfe": 50.0, "n": 100}]
    FileStore(tmp_path / "runs" / h.ns / "base").commit("evaluation", {"results.json": b"{}"}, {"table": table})
    h.succeed("base-evaluate-a1")
    status = h.wait_phase("base", "Succeeded")
    assert status["stages"]["baseline"]["phase"] == "Succeeded"
    assert status["stages"]["baseline"]["jobName"] == "base-baseline-a1"
    assert status["results"]["bestVsMonolith"] == 0.9 and status["bestFid"] == 9.0
    assert status["results"]["artifacts"]["baseline"].endswith("/base/experts/monolith/final")
    out = h.plane.kubectl("get", "ddm", "base", "-n", h.ns).stdout
    assert "VS MONOLITH" in out and re.search(r"base\s+Succeeded\s+2\s+2\s+\S+\s+9\s+0\.9\b", out), out
