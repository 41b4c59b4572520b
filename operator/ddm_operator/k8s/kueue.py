"""Pausing a Kueue-managed job the way Kueue expects: through its Workload, never through the job's suspend field.

Kueue owns ``runPolicy.suspend`` of a job with a queue label: its webhook suspends it at creation, its job reconciler
unsuspends it on admission and suspends it on eviction (sigs.k8s.io/kueue@v0.17.0
pkg/controller/jobframework/reconciler.go). A client that writes the field bypasses the quota. What Kueue offers
instead is ``Workload.spec.active`` (apis/kueue/v1beta2/workload_types.go: "false: indicates that a workload should
never be admitted and evicts running workloads"):
- false: the workload controller evicts it with reason ``Deactivated`` (pkg/controller/core/workload_controller.go),
  the job reconciler then stops the job (suspends it, so its pods go, reconciler.go "handle eviction") and gives
  its quota back; a workload still waiting is never admitted;
- true again: the Requeued condition becomes ``Reactivated`` (workload_controller.go), the workload queues again and
  Kueue unsuspends the job when it is admitted.
Kueue labels each Workload with its job's UID (``kueue.x-k8s.io/job-uid``, reconciler.go ConstructWorkload), which is
how the operator finds it; the job carries no reference to its Workload.
"""
from __future__ import annotations

import logging
from typing import Any

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # pkg/controller/constants/constants.go JobUIDLabel
log = logging.getLogger("ddm_operator")


def inactive_jobs(custom: Any, namespace: str, job_uids: list[str], **kw: Any) -> set[str]:
    """The UIDs among ``job_uids`` whose Workload has ``spec.active: false`` (``custom``: a CustomObjectsApi; ``kw``:
    request options). One list request, selected by Kueue's job-uid label."""
    if not job_uids:
        return set()
    selector = f"{JOB_UID_LABEL} in ({','.join(sorted(set(job_uids)))})"
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, label_selector=selector,
                                                 **kw)["items"]
    return {w["metadata"]["labels"][JOB_UID_LABEL] for w in items
            if (w.get("spec") or {}).get("active") is False}


def set_active(custom: Any, namespace: str, job_uid: str, active: bool, **kw: Any) -> int:
    """Set ``spec.active`` of the Workload(s) of the job ``job_uid``; returns how many were patched (0 while Kueue
    has not made the job's Workload yet: the next pass asks again, since the stage still reads as running)."""
    selector = f"{JOB_UID_LABEL}={job_uid}"
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, label_selector=selector,
                                                 **kw)["items"]
    patched = 0
    for workload in items:
        if (workload.get("spec") or {}).get("active", True) is active:
            continue
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, workload["metadata"]["name"],
                                              {"spec": {"active": active}}, **kw)
        log.info("Workload %s/%s of job uid %s: active=%s", namespace, workload["metadata"]["name"], job_uid, active)
        patched += 1
    return patched


def worker_of(custom: Any, namespace: str, job_uid: str, **kw: Any) -> str | None:
    """The MultiKueueCluster that ran the job ``job_uid``: its Workload's ``status.clusterName`` (set by MultiKueue
    when a worker admits it, apis/kueue/v1beta2/workload_types.go); None if not dispatched, or no Workload."""
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                 label_selector=f"{JOB_UID_LABEL}={job_uid}", **kw)["items"]
    names = [(w.get("status") or {}).get("clusterName") for w in items]
    return next((n for n in names if n), None)
