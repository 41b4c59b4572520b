"""The operator with the real Kueue (v0.17, its own cmd/kueue) on the simulated GPU fleet of test_training_operator.py.

``k8s_kueue`` (tests/fixtures/k8s.py) starts Kueue against the fleet's API server with its webhooks on loopback and
integrates PyTorchJobs. What Kueue does that the test relies on, from its source (sigs.k8s.io/kueue@v0.17.0):
- its PyTorchJob webhook suspends a new job that carries ``kueue.x-k8s.io/queue-name``
  (pkg/controller/jobframework/base_webhook.go Default -> defaults.go ApplyDefaultForSuspend);
- its job reconciler makes a Workload per job, the scheduler admits a workload while the ClusterQueue's nominalQuota
  covers its pods' requests (pkg/scheduler/scheduler.go), and on admission the reconciler unsuspends the job with a
  patch of its own (pkg/controller/jobframework/reconciler.go, startJob); a finished job's workload is marked
  Finished and its quota goes to the next one (reconciler.go).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.k8s import KUEUE_USER, RUN_MS_ANNOTATION
from integration.test_operator import Harness, chart_account, wait_for
from integration.test_training_operator import JOB_NAME_LABEL, fleet, fleet_spec, pods_by_job  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

K = 4
QUOTA_GPUS = 2  # experts ask for one GPU each: the ClusterQueue admits two experts at a time


class LivePods:
    """A watch on the namespace's training pods: which are alive (not Succeeded/Failed, not deleted) after every
    event the API server sends, and the most expert pods alive at once."""

    def __init__(self, h: Harness) -> None:
        self.h, self.peak, self.live = h, 0, set[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LivePods:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        from kubernetes import watch

        w = watch.Watch()
        version = ""
        while not self._stop.is_set():
            for event in w.stream(self.h.core.list_namespaced_pod, self.h.ns, label_selector=JOB_NAME_LABEL,
                                  resource_version=version, timeout_seconds=2):
                pod = event["object"]
                version = pod.metadata.resource_version
                name = pod.metadata.name
                if event["type"] == "DELETED" or pod.status.phase in ("Succeeded", "Failed"):
                    self.live.discard(name)
                elif "-expert-" in pod.metadata.labels[JOB_NAME_LABEL]:
                    self.live.add(name)
                self.peak = max(self.peak, len(self.live))
                if self._stop.is_set():
                    break


@pytest.fixture
def queue(k8s_kueue: Any, fleet: Harness) -> Iterator[str]:  # noqa: F811 (the imported fixture)
    yield k8s_kueue.add_kueue_queue(fleet.ns, "gpus", gpus=QUOTA_GPUS)


def job_writes(events: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """Every create, patch or update of a PyTorchJob (not its status) in ``namespace``, as the API server's audit log
    recorded it: who, what, and ``spec.runPolicy.suspend`` of the request body (absent: None).

    The body is recorded as decoded, so a create carries the CRD's default ``runPolicy.suspend: false`` (the training
    operator's kubeflow.org_pytorchjobs.yaml) whether the client wrote it or not; a patch carries only what it sets."""
    out = []
    for e in events:
        ref = e.get("objectRef") or {}
        if ref.get("resource") != "pytorchjobs" or ref.get("subresource") or ref.get("namespace") != namespace:
            continue
        run_policy = ((e.get("requestObject") or {}).get("spec") or {}).get("runPolicy") or {}
        out.append({"user": e["user"]["username"], "verb": e["verb"], "name": ref.get("name"),
                    "code": (e.get("responseStatus") or {}).get("code"), "suspend": run_policy.get("suspend")})
    return out


def test_kueue_admits_experts_within_the_quota_and_owns_their_suspension(
        k8s_kueue: Any, fleet: Harness, queue: str, tmp_path: Path) -> None:  # noqa: F811
    """4 experts of one GPU each on a LocalQueue whose ClusterQueue has 2 GPUs: Kueue holds two back, the DDM status
    says which wait for admission, never more than 2 experts' pods live at once, all finish and the DDM Succeeds.
    The API server's audit log shows every write to the jobs: the operator's never carry runPolicy.suspend;
    Kueue's unsuspend each queued job (the log does see such writes)."""
    h = fleet
    spec = fleet_spec(K, tmp_path)
    spec["experts"]["placement"]["kueueQueueName"] = queue
    spec["experts"]["placement"]["podAnnotations"] = {RUN_MS_ANNOTATION: "2000"}
    waiting: dict[int, tuple[str, str]] = {}  # expert -> (phase, job) seen in the DDM status while it waited
    with LivePods(h) as pods:
        h.create("kq", spec)

        def done() -> bool:
            status = h.status("kq")
            for e in status.get("experts") or []:
                if "waiting for admission" in e.get("message", ""):
                    waiting[e["index"]] = (e["phase"], e["jobName"])
            return status.get("phase") == "Succeeded"

        wait_for(done, "kq Succeeded", timeout=180)
    status = h.status("kq")
    jobs = h.jobs()
    experts = [f"kq-expert-{k:03d}-a1" for k in range(K)]
    queued = ["kq-cluster-a1", *experts]  # clustering runs with the experts' placement, so on their queue too
    assert all(len(pods_by_job(h)[name]) == 1 for name in experts)  # one pod run each: waiting is not failing
    assert pods.peak == QUOTA_GPUS, f"most expert pods alive at once: {pods.peak}"
    # at least the experts beyond the quota were seen waiting: launched (a job) but Pending, not Running
    assert len(waiting) >= K - QUOTA_GPUS, waiting
    assert all(phase == "Pending" and job == f"kq-expert-{k:03d}-a1" for k, (phase, job) in waiting.items()), waiting
    assert all(e["message"] == "" for e in status["experts"]), status["experts"]
    # each queued job went through a Workload that Kueue admitted to this namespace's ClusterQueue
    workloads = h.custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", h.ns, "workloads")["items"]
    admitted = {w["metadata"]["ownerReferences"][0]["name"]: w["status"]["admission"]["clusterQueue"]
                for w in workloads if (w.get("status") or {}).get("admission")}
    assert admitted == {name: f"{h.ns}-{queue}" for name in queued}, admitted
    assert all(jobs[name]["spec"]["runPolicy"]["suspend"] is False for name in queued)
    assert all("suspend" not in jobs[name]["spec"]["runPolicy"] for name in ("kq-router-a1", "kq-evaluate-a1")) or \
        all(jobs[name]["spec"]["runPolicy"]["suspend"] is False for name in ("kq-router-a1", "kq-evaluate-a1"))
    # who wrote runPolicy.suspend: the API server's own record of every create/patch/update of the jobs
    writes = job_writes(h.plane.audit_events(), h.ns)
    operator_user = f"system:serviceaccount:{h.ns}:{chart_account(h.ns)[1]}"
    mine = [w for w in writes if w["user"] == operator_user]
    assert sorted(w["name"] for w in mine if w["verb"] == "create") == sorted(jobs), writes  # the operator made them
    # after creating them, the operator never patched or updated a job's suspension (nor anything else of them)
    toggles = [w for w in mine if w["verb"] != "create" and w["suspend"] is not None]
    assert toggles == [], toggles
    # its creates carry no suspend=true (the body shows the schema default false; builders.py omits the field for
    # queued jobs, tests/unit/operator), and Kueue's webhook suspended each queued one anyway: Kueue alone let each
    # go, once, and never had to take one back
    assert all(w["suspend"] in (None, False) for w in mine if w["verb"] == "create"), mine
    kueue = [w for w in writes if w["user"] == KUEUE_USER]
    assert sorted(w["name"] for w in kueue if w["suspend"] is False) == sorted(queued), kueue
    assert not [w for w in kueue if w["suspend"] is True], kueue
