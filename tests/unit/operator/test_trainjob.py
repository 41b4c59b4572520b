"""The Trainer v2 backend, pure: a stage attempt -> TrainingRuntime + TrainJob, TrainJob status -> attempt state.

Field names and condition types are Trainer v2.3's (pkg/apis/trainer/v1alpha1/trainjob_types.go,
trainingruntime_types.go); the env names its torch plugin injects are in pkg/constants/constants.go.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from ddm_operator import planner as pl
from ddm_operator.api.models import DecentralizedDiffusionSpec
from ddm_operator.k8s import builders as b
from ddm_operator.k8s.handlers import job_request
from ddm_operator.k8s.observe import has_failed, job_state

OWNER = b.Owner(name="mnist", namespace="team-a", uid="u-1")
SPEC = DecentralizedDiffusionSpec.model_validate({
    "dataset": {"uri": "s3://data/fmnist"}, "clustering": {"numClusters": 4, "fineClusters": 16},
    "experts": {"steps": 100, "gpusPerNode": 2, "nodes": 2,
                "placement": {"nodeSelector": {"pool": "a100"}, "priorityClassName": "training",
                              "podAnnotations": {"team": "vision"}}},
    "storage": {"uri": "s3://runs", "credentialsSecret": "creds"},
})


def expert_request(**over: Any) -> b.JobRequest:
    req = job_request(SPEC, OWNER, pl.expert_key(2), 1)
    return b.JobRequest(**{**req.__dict__, **over})


def test_a_stage_becomes_its_own_runtime_and_a_trainjob_on_it() -> None:
    req = expert_request()
    runtime, trainjob = b.build_job(req, b.TRAINJOB)
    assert runtime["kind"] == "TrainingRuntime" and trainjob["kind"] == "TrainJob"
    assert runtime["metadata"]["name"] == trainjob["metadata"]["name"] == req.name == "mnist-expert-002-a1"
    for obj in (runtime, trainjob):  # both go with the DDM and carry the labels that select its children
        assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u-1"
        assert obj["metadata"]["labels"][b.LABEL_KEY] == "expert-002"
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": req.name}
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 2 == runtime["spec"]["mlPolicy"]["numNodes"]
    assert trainer["image"] == SPEC.trainer_image
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 2
    # two nodes: the rendezvous is at the address Trainer v2's torch plugin injects, not the training operator's
    assert "--rdzv-endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)" in trainer["command"]
    assert not any("$(MASTER_ADDR)" in arg for arg in trainer["command"])
    assert trainjob["spec"]["suspend"] is False and "mlPolicy" in runtime["spec"] and "torch" in runtime["spec"]["mlPolicy"]


def test_the_runtime_carries_the_whole_pod_and_one_retry_layer() -> None:
    runtime = b.build_training_runtime(expert_request())
    [rjob] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # the replicated job and container the torch plugin looks for (constants.Node, AncestorTrainer)
    assert rjob["name"] == "node" and rjob["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert rjob["template"]["spec"]["backoffLimit"] == 0
    pod = rjob["template"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    [container] = pod["spec"]["containers"]
    assert container["name"] == "node"
    # what a TrainJob's runtimePatches cannot say: the credentials Secret as envFrom, priority class, pull policy
    assert container["envFrom"] == [{"secretRef": {"name": "creds"}}]
    assert pod["spec"]["priorityClassName"] == "training" and container["imagePullPolicy"] == "IfNotPresent"
    assert pod["spec"]["nodeSelector"] == {"pool": "a100"} and pod["metadata"]["annotations"]["team"] == "vision"
    assert pod["metadata"]["labels"][b.LABEL_KEY] == "expert-002"  # kwok and the operator find the pods by it
    # the stage config rides in the pod template: the TrainJob needs no ConfigMap either
    assert "ddm.io/config" in pod["metadata"]["annotations"] and "downwardAPI" in pod["spec"]["volumes"][0]


def test_queued_trainjobs_leave_suspend_to_kueue_and_suspend_patches_spec_suspend() -> None:
    queued = expert_request(placement=b.Placement(queue_name="gpus"))
    trainjob = b.build_trainjob(queued)
    assert "suspend" not in trainjob["spec"] and trainjob["metadata"]["labels"][b.LABEL_QUEUE] == "gpus"
    assert b.suspend_patch(True, b.TRAINJOB) == {"spec": {"suspend": True}}
    assert b.suspend_patch(True, b.PYTORCHJOB) == {"spec": {"runPolicy": {"suspend": True}}}


def test_backend_setting_is_checked() -> None:
    assert b.backend_named("trainjob") is b.TRAINJOB and b.backend_named("pytorchjob") is b.PYTORCHJOB
    with pytest.raises(ValueError, match="DDM_JOB_BACKEND='tfjob': expected one of pytorchjob, trainjob"):
        b.backend_named("tfjob")


def trainjob(conditions: list[dict[str, Any]], active: int = 0, suspend: bool = False) -> dict[str, Any]:
    manifest = b.build_trainjob(expert_request(suspend=suspend))
    manifest["metadata"]["creationTimestamp"] = "2026-12-01T00:00:00Z"
    manifest["status"] = {"conditions": conditions, "jobsStatus": [
        {"name": "node", "active": active, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]}
    return manifest


def cond(kind: str, status: str = "True", reason: str = "", message: str = "",
         when: str = "2026-12-01T00:05:00Z") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": when}


def node_pod(code: int) -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"name": "node", "state": {"terminated": {"exitCode": code}}}]}}


def epoch(hour: int, minute: int = 0) -> float:
    return datetime(2026, 12, 1, hour, minute, tzinfo=timezone.utc).timestamp()


def test_trainjob_phases_from_its_conditions_and_its_jobsets_jobs() -> None:
    assert job_state(trainjob([])).phase == "Pending"  # type: ignore[union-attr]
    running = job_state(trainjob([], active=1))
    assert running is not None and running.phase == "Running"
    assert running.started_at == epoch(0)  # no startTime on a TrainJob: created at
    suspended = job_state(trainjob([cond("Suspended", reason="Suspended")], suspend=True))
    assert suspended is not None and suspended.phase == "Suspended"
    resumed = job_state(trainjob([cond("Suspended", "False", "Resumed", when="2026-12-01T01:00:00Z")], active=1))
    assert resumed is not None and resumed.phase == "Running" and resumed.started_at == epoch(1)
    # Complete and Failed are the JobSet's conditions, renamed (plugins/jobset/jobset.go Status)
    done = job_state(trainjob([cond("Complete", reason="AllJobsCompleted", message="jobset completed successfully")]))
    assert done is not None and done.phase == "Succeeded" and done.finished_at == epoch(0, 5)


def test_a_failed_trainjob_is_classified_by_its_pods_exit_codes() -> None:
    job = trainjob([cond("Failed", reason="FailedJobs", message="jobset failed due to one or more job failures")])
    assert has_failed(job) and not has_failed(trainjob([], active=1))
    permanent = job_state(job, pods=[node_pod(3)])
    assert permanent is not None and permanent.phase == "Failed" and permanent.permanent and permanent.exit_code == 3
    retryable = job_state(job, pods=[node_pod(143), node_pod(1)])
    assert retryable is not None and not retryable.permanent and retryable.exit_code == 143
    other_container = {"status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": {"exitCode": 3}}}]}}
    unknown = job_state(job, pods=[other_container])  # only the trainer's container "node" counts
    assert unknown is not None and unknown.exit_code is None and not unknown.permanent
