"""PyTorchJob status -> planner observation, and spec -> job request: pure, no cluster."""
from __future__ import annotations

from typing import Any

from ddm_operator import planner as pl
from ddm_operator.api.models import DecentralizedDiffusionSpec
from ddm_operator.k8s import builders as b
from ddm_operator.k8s.handlers import job_request
from ddm_operator.k8s.observe import job_state, latest_attempts

OWNER = b.Owner(name="mnist", namespace="team-a", uid="u-1")
SPEC = DecentralizedDiffusionSpec.model_validate({
    "dataset": {"uri": "s3://data/fmnist"}, "clustering": {"numClusters": 4, "fineClusters": 16},
    "experts": {"steps": 100, "gpusPerNode": 2, "nodes": 2,
                "overrides": [{"experts": [1], "placement": {"targetCluster": "cluster-b", "kueueQueueName": "q"}}]},
    "storage": {"uri": "s3://runs", "credentialsSecret": "creds"},
})


def job(key: str, attempt: int, conditions: list[dict[str, Any]], suspend: bool = False,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    req = b.JobRequest(owner=OWNER, key=key, attempt=attempt, image="i", command=["x"], config={}, suspend=suspend)
    manifest = b.build_pytorchjob(req)
    if annotations:
        manifest["metadata"]["annotations"] = annotations
    manifest["status"] = {"conditions": conditions}
    return manifest


def cond(kind: str, message: str = "", when: str = "2026-12-01T00:00:00Z") -> dict[str, Any]:
    return {"type": kind, "status": "True", "message": message, "lastTransitionTime": when}


def test_job_phases_and_failure_classification() -> None:
    assert job_state(job("cluster", 1, [])).phase == "Pending"  # type: ignore[union-attr]
    assert job_state(job("cluster", 1, [cond("Created"), cond("Running")])).phase == "Running"  # type: ignore[union-attr]
    assert job_state(job("cluster", 1, [cond("Running")], suspend=True)).phase == "Suspended"  # type: ignore[union-attr]
    done = job_state(job("router", 1, [cond("Running"), cond("Succeeded")]))
    assert done is not None and done.phase == "Succeeded" and done.finished_at is not None
    permanent = job_state(job("expert-002", 1, [cond("Failed", "Master replica exited with exit code 3")]))
    assert permanent is not None and permanent.permanent and permanent.exit_code == 3
    retryable = job_state(job("expert-002", 1, [cond("Failed", "pod exitCode: 151")]))
    assert retryable is not None and not retryable.permanent and retryable.exit_code == 151
    unknown = job_state(job("expert-002", 1, [cond("Failed", "BackoffLimitExceeded")]))
    assert unknown is not None and not unknown.permanent and unknown.exit_code is None
    by_annotation = job_state(job("expert-002", 1, [cond("Failed")], annotations={"ddm.io/exit-code": "2"}))
    assert by_annotation is not None and by_annotation.permanent
    assert job_state({"metadata": {"name": "foreign", "labels": {}}}) is None


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
