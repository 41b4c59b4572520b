"""PyTorchJob status -> planner observation, and spec -> job request: pure, no cluster."""
from __future__ import annotations

from typing import Any

from ddm_operator import planner as pl
from ddm_operator.api.models import DecentralizedDiffusionSpec
from ddm_operator.k8s import builders as b
from ddm_operator.k8s.handlers import job_request
from ddm_operator.k8s.observe import exit_code_of_pods, job_state, latest_attempts

OWNER = b.Owner(name="mnist", namespace="team-a", uid="u-1")
SPEC = DecentralizedDiffusionSpec.model_validate({
    "dataset": {"uri": "s3://data/fmnist"}, "clustering": {"numClusters": 4, "fineClusters": 16},
    "experts": {"steps": 100, "gpusPerNode": 2, "nodes": 2,
                "overrides": [{"experts": [1], "placement": {"targetCluster": "cluster-b", "kueueQueueName": "q"}}]},
    "storage": {"uri": "s3://runs", "credentialsSecret": "creds"},
})


def job(key: str, attempt: int, conditions: list[dict[str, Any]], suspend: bool = False) -> dict[str, Any]:
    req = b.JobRequest(owner=OWNER, key=key, attempt=attempt, image="i", command=["x"], config={}, suspend=suspend)
    manifest = b.build_pytorchjob(req)
    manifest["status"] = {"conditions": conditions}
    return manifest


def cond(kind: str, message: str = "", when: str = "2026-12-01T00:00:00Z") -> dict[str, Any]:
    return {"type": kind, "status": "True", "message": message, "lastTransitionTime": when}


def pod(code: int | None, container: str = "pytorch", last_state: bool = False) -> dict[str, Any]:
    """A pod as kubelet reports it: the container's terminated state carries the exit code."""
    state = {"terminated": {"exitCode": code, "reason": "Error"}} if code is not None else {"running": {}}
    status = {"name": container, "state": {"waiting": {}}, "lastState": state} if last_state else \
        {"name": container, "state": state}
    return {"metadata": {"name": "p"}, "status": {"containerStatuses": [status]}}


# The training operator v1.9's own Failed message (pytorchjob_controller.go, UpdateJobStatus): no exit code in it.
FAILED = "PyTorchJob mnist-expert-002-a1 is failed because 1 Master replica(s) failed."


def test_job_phases_and_failure_classification() -> None:
    assert job_state(job("cluster", 1, [])).phase == "Pending"  # type: ignore[union-attr]
    assert job_state(job("cluster", 1, [cond("Created"), cond("Running")])).phase == "Running"  # type: ignore[union-attr]
    assert job_state(job("cluster", 1, [cond("Running")], suspend=True)).phase == "Suspended"  # type: ignore[union-attr]
    done = job_state(job("router", 1, [cond("Running"), cond("Succeeded")]))
    assert done is not None and done.phase == "Succeeded" and done.finished_at is not None
    failed = job("expert-002", 1, [cond("Failed", FAILED)])
    permanent = job_state(failed, pods=[pod(3)])
    assert permanent is not None and permanent.permanent and permanent.exit_code == 3
    retryable = job_state(failed, pods=[pod(143)])
    assert retryable is not None and not retryable.permanent and retryable.exit_code == 143
    # the message alone says nothing: without pods (deleted, never started) the failure is retried
    unknown = job_state(failed, pods=[])
    assert unknown is not None and not unknown.permanent and unknown.exit_code is None
    assert job_state({"metadata": {"name": "foreign", "labels": {}}}) is None


def test_the_most_telling_exit_code_of_a_jobs_pods() -> None:
    # the master's node was lost (137); the workers' collectives then failed (1): retryable
    assert exit_code_of_pods([pod(137), pod(1), pod(1)]) == 137
    assert exit_code_of_pods([pod(2), pod(2), pod(0)]) == 2  # a bad config everywhere: permanent
    assert exit_code_of_pods([pod(137), pod(143)]) == 143
    assert exit_code_of_pods([pod(0), pod(None)]) is None
    assert exit_code_of_pods([pod(3, container="sidecar")]) is None  # only the trainer's container counts
    assert exit_code_of_pods([pod(4, last_state=True)]) == 4


def test_a_job_on_a_kueue_queue_is_created_without_suspend_and_reads_as_queued() -> None:
    req = job_request(SPEC, OWNER, pl.expert_key(1), 1)
    manifest = b.build_pytorchjob(req)
    assert "suspend" not in manifest["spec"]["runPolicy"]  # Kueue's webhook sets it; Kueue clears it on admission
    manifest["spec"]["runPolicy"]["suspend"] = True
    state = job_state(manifest)
    assert state is not None and state.phase == "Queued" and state.queued


def test_queued_jobs_report_waiting_for_admission_from_creation_on() -> None:
    """Observed (Kueue holds it: runPolicy.suspend true, set by its webhook) and just launched (before the next
    observation), a queued stage is a launched one that waits: Pending with the reason; an unqueued one Running."""
    from ddm_operator.k8s.handlers import WAITING_FOR_ADMISSION, _just_launched

    queued = job_request(SPEC, OWNER, pl.expert_key(1), 1)
    created = job_state(b.build_pytorchjob(queued))
    assert created is not None
    obs = _just_launched(SPEC, pl.expert_key(1), created)
    assert obs.state is pl.State.RUNNING and obs.waiting and obs.message == WAITING_FOR_ADMISSION
    plain = _just_launched(SPEC, pl.expert_key(0), created)
    assert plain.state is pl.State.RUNNING and not plain.waiting and plain.message == ""


def test_one_retry_layer_pods_never_restart_in_place() -> None:
    manifest = b.build_pytorchjob(job_request(SPEC, OWNER, pl.expert_key(0), 1))
    assert {r["restartPolicy"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()} == {"Never"}
    assert "backoffLimit" not in manifest["spec"]["runPolicy"]


def test_latest_attempt_wins() -> None:
    states = [job_state(job("expert-000", a, [])) for a in (1, 3, 2)]
    latest = latest_attempts([s for s in states if s is not None])
    assert latest["expert-000"].attempt == 3 and latest["expert-000"].name == "mnist-expert-000-a3"


def test_job_request_uses_stage_definitions_and_placement() -> None:
    req = job_request(SPEC, OWNER, pl.expert_key(1), 2)
    assert req.name == "mnist-expert-001-a2" and req.nodes == 2 and req.remote
    assert req.config["run_uri"] == "s3://runs/team-a/mnist"
    manifest = b.build_pytorchjob(req)
    assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "creds"}}]
    local = job_request(SPEC, OWNER, pl.expert_key(0), 1)
    assert not local.remote and "ownerReferences" in b.build_pytorchjob(local)["metadata"]


def test_exit_code_from_the_training_operators_events() -> None:
    """MultiKueue deletes a finished job in its worker with its pods; the training operator's ExitedWithCode Events
    (pkg/controller.v1/common/pod.go: "Pod: <ns>.<pod> exited with code N") stay, and give the same code the pods
    would: the highest retryable one, else the first permanent one."""
    from ddm_operator.k8s.observe import exit_code_of_events

    def event(pod: str, code: int, reason: str = "ExitedWithCode") -> dict[str, str]:
        return {"reason": reason, "message": f"Pod: ns.{pod} exited with code {code}"}

    assert exit_code_of_events([event("j-master-0", 3)]) == 3
    assert exit_code_of_events([event("j-master-0", 1), event("j-worker-0", 137)]) == 137  # a lost node's peers exit 1
    assert exit_code_of_events([event("j-master-0", 0)]) is None  # 0 says nothing about a failure
    assert exit_code_of_events([event("j-master-0", 3, reason="SuccessfulCreatePod")]) is None
    assert exit_code_of_events([{"reason": "ExitedWithCode", "message": "something else"}]) is None
