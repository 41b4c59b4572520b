"""A small run of the fleet harness (bench/fleet.py): two real control planes, each with kube-scheduler, the
Kubeflow training operator and kwok GPU nodes; 2 DDMs of K=2 over both clusters; the operator SIGKILLed once while
they run. The load run (100 DDMs x K=8 on 500 nodes) and the other faults are BENCHMARKS.md's, not the suite's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = [pytest.mark.integration, pytest.mark.k8s, pytest.mark.slow]


def test_fleet_harness_two_clusters_one_sigkill() -> None:
    import fleet

    # Member clusters polled only every 60 s and a 60 s safety net: a stage that ends in b moves its DDM on within
    # seconds only through the operator's watch of b.
    args = fleet.make_parser().parse_args([
        "--ddms", "2", "--experts", "2", "--nodes", "4", "--run-ms", "1500", "--faults", "kill", "--kills", "1",
        "--kill-window", "2", "--remote-interval", "60", "--interval", "60", "--timeout", "120"])
    out = fleet.run(args)
    assert out["problems"] == [], out["problems"]
    assert out["operator_starts"] == 2 and out["faults"]["kill"]["kills"] == 1
    assert out["duplicates"] == 0 and out["orphans"] == 0
    # d000: clustering, expert 0, router, evaluation in a, expert 1 in b; d001: router and evaluation in b too
    assert out["jobs"] == {"a": 4 + 2, "b": 1 + 3}
    # every experts -> evaluation boundary waits on an expert in b: seconds, not the 60 s poll
    evaluate = [v for label, vs in out["latencies"].items() if label.startswith("experts+router") for v in vs]
    assert len(evaluate) == 2 and max(evaluate) < 15, out["latencies"]


def test_one_ddm_of_two_experts_costs_few_api_requests() -> None:
    """Every API request of the operator's client certificate, from both API servers' audit logs, for one DDM of K=2
    over both clusters. What a pass reads (its jobs, its DDM, b's Secret) comes from watches and caches, so the reads
    no longer grow with the passes; what remains is what the pipeline writes."""
    import math

    import fleet

    k = 2
    args = fleet.make_parser().parse_args(["--ddms", "1", "--experts", str(k), "--nodes", "2", "--run-ms", "1000",
                                           "--timeout", "120"])
    out = fleet.run(args)
    assert out["problems"] == [], out["problems"]
    requests, minimum = out["requests"], fleet.minimum_requests(k, True)
    print("requests", requests, "minimum", minimum, f"in {out['elapsed']:.1f} s")
    assert requests["create pytorchjobs"] == minimum["create pytorchjobs"], requests  # each stage's job once
    assert "create configmaps" not in requests, requests  # the stage config travels in the job
    # status: the minimum's 4 steps, plus one pass per expert and the router when they finish apart
    assert requests["patch decentralizeddiffusions/status"] <= minimum["patch decentralizeddiffusions/status"] + k + 1
    assert requests.get("create events", 0) <= requests["patch decentralizeddiffusions/status"], requests  # per pass
    # reads: one list per watched cluster (a, b), the DDM from kopf's watch (a GET at most for a first pass that
    # comes before kopf's copy), b's Secret at most every DDM_SECRET_RECHECK_S (2 s) while the DDM runs
    assert requests["list pytorchjobs"] <= 2 + 1, requests
    assert requests.get("get decentralizeddiffusions", 0) <= 1, requests
    assert requests.get("get secrets", 0) <= math.ceil(out["elapsed"] / 2) + 2, requests
