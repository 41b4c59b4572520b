"""spec.suspend of a DDM whose experts Kueue manages, on the real Kueue (v0.17) and training operator: the pause goes
through the experts' Workloads (``spec.active``; operator/ddm_operator/k8s/kueue.py says what Kueue does with it),
never through the jobs' ``runPolicy.suspend``, which stays Kueue's."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.k8s import KUEUE_USER, RUN_MS_ANNOTATION
from integration.test_operator import Harness, Operator, chart_account, ddm_spec, render_rbac, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

QUOTA_GPUS = 2  # the ClusterQueue admits two one-GPU experts at a time
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the training operator's JobNameLabel (apis/kubeflow.org/v1)
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}]


@pytest.fixture
def kueued(k8s_kueue: Any, k8s_fleet_namespace: str, tmp_path: Path) -> Iterator[tuple[Harness, str]]:
    """The DDM operator (PyTorchJob backend, the chart's RBAC) for a fresh namespace of the fleet plane with Kueue,
    and a LocalQueue there on a ClusterQueue of QUOTA_GPUS GPUs."""
    ns = k8s_fleet_namespace
    release, account = chart_account(ns)
    k8s_kueue.apply_yaml(render_rbac(ns, release))
    op = Operator(k8s_kueue.serviceaccount_kubeconfig(ns, account), ns, tmp_path / "operator.log")
    op.start()
    h = Harness(k8s_kueue, ns)
    yield h, k8s_kueue.add_kueue_queue(ns, "gpus", gpus=QUOTA_GPUS)
    op.stop()
    print(op.log())
    h.api.close()


def expert_pods(h: Harness) -> dict[str, dict[str, Any]]:
    """The experts' pods by name: job, phase, uid."""
    pods = h.core.list_namespaced_pod(h.ns, label_selector=JOB_NAME_LABEL).items
    return {p.metadata.name: {"job": p.metadata.labels[JOB_NAME_LABEL], "phase": p.status.phase, "uid": p.metadata.uid}
            for p in pods if "-expert-" in p.metadata.labels[JOB_NAME_LABEL]}


def live(pods: dict[str, dict[str, Any]]) -> list[str]:
    return [n for n, p in pods.items() if p["phase"] not in ("Succeeded", "Failed")]


def workloads_by_job(h: Harness) -> dict[str, dict[str, Any]]:
    """The namespace's Kueue Workloads by the name of the job that owns each."""
    items = h.custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", h.ns, "workloads")["items"]
    return {w["metadata"]["ownerReferences"][0]["name"]: w for w in items}


def suspend_writes(plane: Any, namespace: str) -> list[tuple[str, str, str, Any]]:
    """(user, verb, job, runPolicy.suspend of the request body) of every write to a PyTorchJob in ``namespace``, from
    the API server's audit log (a create's body shows the schema default false; a patch only what it sets)."""
    out = []
    for e in plane.audit_events():
        ref = e.get("objectRef") or {}
        if ref.get("resource") == "pytorchjobs" and not ref.get("subresource") and ref.get("namespace") == namespace:
            run_policy = ((e.get("requestObject") or {}).get("spec") or {}).get("runPolicy") or {}
            out.append((e["user"]["username"], e["verb"], ref.get("name"), run_policy.get("suspend")))
    return out


def test_spec_suspend_pauses_queued_experts_through_their_workloads(kueued: tuple[Harness, str],
                                                                    tmp_path: Path) -> None:
    """3 experts on the 2-GPU queue: 2 admitted and running, 1 waiting (their pods would run for 10 minutes: no
    timing race with the pause). spec.suspend=true deactivates all three Workloads (spec.active=false): Kueue evicts
    the running two (reason Deactivated), suspends their jobs and their pods go; the waiting one is never admitted.
    spec.suspend=false reactivates them: Kueue admits two again and the training operator makes new pods, in the
    same attempt. The operator never writes runPolicy.suspend of a queued job (audit log)."""
    h, queue = kueued
    base = {"nodeSelector": {"pool": "tainted"}, "tolerations": TOLERATE_GPU, "kueueQueueName": queue}
    spec = ddm_spec(3, tmp_path, experts={
        "modelPreset": "DiT-T/4", "steps": 100, "gpusPerNode": 1,
        "placement": {**base, "podAnnotations": {RUN_MS_ANNOTATION: "500"}},  # clustering runs here: short
        "overrides": [{"experts": [0, 1, 2], "placement": {**base, "podAnnotations": {RUN_MS_ANNOTATION: "600000"}}}]})
    experts = [f"sq-expert-{k:03d}-a1" for k in range(3)]
    queued = ["sq-cluster-a1", *experts]
    h.create("sq", spec)
    wait_for(lambda: len(live(expert_pods(h))) == QUOTA_GPUS, "2 experts admitted and running")
    first = {p["job"]: p["uid"] for p in expert_pods(h).values()}
    h.patch_spec("sq", {"suspend": True})

    def paused() -> bool:
        wls, jobs = workloads_by_job(h), h.jobs()
        return (h.status("sq").get("phase") == "Suspended" and not expert_pods(h)
                and all(wls.get(e, {}).get("spec", {}).get("active") is False for e in experts)
                and all(jobs[e]["spec"]["runPolicy"]["suspend"] for e in experts))

    wait_for(paused, "experts paused through their Workloads")
    time.sleep(3)  # stays paused: nothing admitted, no pod started
    wls = workloads_by_job(h)
    assert not expert_pods(h) and h.status("sq")["phase"] == "Suspended"
    assert not any(wls[e]["status"].get("admission") for e in experts), "a deactivated Workload kept its quota"
    evicted = {e: next((c["reason"] for c in wls[e]["status"].get("conditions") or []
                        if c["type"] == "Evicted" and c["status"] == "True"), None) for e in first}
    assert set(evicted.values()) == {"Deactivated"}, evicted
    h.patch_spec("sq", {"suspend": False})

    def resumed() -> dict[str, str]:
        pods = {p["job"]: p["uid"] for p in expert_pods(h).values() if p["phase"] == "Running"}
        return pods if len(pods) == QUOTA_GPUS and h.status("sq").get("phase") == "Training" else {}

    again = wait_for(resumed, "2 experts admitted again and running")
    wls = workloads_by_job(h)
    assert all(wls[e]["spec"].get("active") is True for e in experts), wls
    assert sorted(w["status"]["admission"]["clusterQueue"] for e, w in wls.items() if e in again) == [
        f"{h.ns}-{queue}"] * QUOTA_GPUS
    assert not set(again.values()) & set(first.values()), (first, again)  # new pods, same jobs
    assert sorted(h.jobs()) == sorted([*queued, "sq-router-a1"]), h.jobs()  # no new attempt: a pause is no failure
    writes = suspend_writes(h.plane, h.ns)
    operator_user = f"system:serviceaccount:{h.ns}:{chart_account(h.ns)[1]}"
    # the router has no queue: suspending it is the operator's job; the queued ones it never touched after creating
    assert [w for w in writes if w[0] == operator_user and w[1] != "create" and w[2] in queued] == [], writes
    # Kueue alone stopped the two running jobs, and let jobs go again after the resume
    kueue = [w for w in writes if w[0] == KUEUE_USER and w[2] in experts]
    assert sorted(w[2] for w in kueue if w[3] is True) == sorted(first), kueue
    assert sorted(w[2] for w in kueue if w[3] is False) == sorted([*first, *again]), kueue
