"""What the children say: PyTorchJob objects (and their pods) -> per-stage-key attempt states, pure.

How a failure is classified (the trainer's exit codes: 1-127 permanent, 128-255 retryable, see errors.ExitCode).
The Kubeflow training operator v1.9 never writes an exit code into a job's conditions: with ``restartPolicy: Never``
(what builders.py sets) a failed pod makes the job Failed with ``PyTorchJob <name> is failed because 1 Master
replica(s) failed.`` (pkg/controller.v1/pytorch/pytorchjob_controller.go, UpdateJobStatus). The code is only in the
pod's ``status.containerStatuses[name=pytorch].state.terminated.exitCode`` (pkg/controller.v1/common/pod.go reads it
from there too), so the operator lists a failed job's pods (label ``training.kubeflow.org/job-name``) and takes the
most telling code (``exit_code_of_pods``). A Failed job whose pods are gone, or that failed for another reason (deadline, a pod
that never started), has no code and counts as an infrastructure failure: it gets a new attempt.

Kubeflow Trainer v2 (a TrainJob, ``builders.TRAINJOB``) writes no Running condition and no start time: its
conditions are Suspended, Complete and Failed (pkg/apis/trainer/v1alpha1/trainjob_types.go), Complete and Failed
copied from its JobSet's Completed/Failed (pkg/runtime/framework/plugins/jobset/jobset.go Status; reasons such as
AllJobsCompleted and FailedJobs come from sigs.k8s.io/jobset pkg/constants). It runs while its JobSet has active
Jobs (status.jobsStatus[].active). Exit codes again are only in the pods (container ``node``, label
``jobset.sigs.k8s.io/jobset-name``).
"""
from __future__ import annotations

import re
from datetime import datetime
from dataclasses import dataclass
from typing import Any, Literal

from .builders import CONTAINER_NAME, LABEL_ATTEMPT, LABEL_KEY, LABEL_QUEUE, PYTORCHJOB, TRAINJOB, Backend

JobPhase = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]
POD_JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the training operator's JobNameLabel (common_types.go)


@dataclass(frozen=True)
class JobState:
    key: str
    attempt: int
    name: str
    phase: JobPhase
    permanent: bool = False  # Failed with an exit code in 1-127
    exit_code: int | None = None
    message: str = ""
    cluster: str | None = None  # targetCluster, None for the operator's own cluster
    finished_at: float | None = None  # epoch seconds of the Succeeded/Failed transition (for retry backoff)
    queued: bool = False  # on a Kueue queue: Kueue owns runPolicy.suspend, the operator never writes it
    started_at: float | None = None  # PyTorchJob status.startTime; TrainJob: when it was created or resumed
    progress: dict[str, Any] | None = None  # the stage's latest progress report, when it runs
    uid: str = ""  # the job's metadata.uid: Kueue labels the job's Workload with it (k8s/kueue.py)


def true_condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def container_exit_code(pod: dict[str, Any], container: str = CONTAINER_NAME) -> int | None:
    """The exit code of ``container`` if it terminated (a pod as the API returns it, camelCase keys)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        terminated = (status.get("state") or {}).get("terminated") \
            or (status.get("lastState") or {}).get("terminated")
        if terminated and terminated.get("exitCode") is not None:
            return int(terminated["exitCode"])
    return None


def exit_code_of_pods(pods: list[dict[str, Any]], container: str = CONTAINER_NAME) -> int | None:
    """The most telling exit code of a failed job's pods: the highest retryable one (128-255) if any (a node lost
    or preempted under one pod makes the others' collectives fail with plain errors, exit 1), else the first
    permanent one, else None (0s and unterminated containers say nothing about the failure). The same rule as
    ddm-launch applies to the workers inside one pod (ddm_trainer/launch.py)."""
    return most_telling([c for c in (container_exit_code(p, container) for p in pods) if c is not None])


def most_telling(codes: list[int]) -> int | None:
    """The highest retryable code (128-255) if any, else the first permanent one, else None (0s say nothing)."""
    codes = [c for c in codes if c]
    retryable = [c for c in codes if c >= 128]
    if retryable:
        return max(retryable)
    return codes[0] if codes else None


EXITED_WITH_CODE = re.compile(r"exited with code (\d+)$")


def exit_code_of_events(events: list[dict[str, Any]]) -> int | None:
    """The most telling exit code the training operator recorded as Events of a job (reason ExitedWithCode, message
    "Pod: <ns>.<pod> exited with code N": training-operator v1.9.4 pkg/controller.v1/common/pod.go ReconcilePods).
    The Events outlive the pods: MultiKueue deletes a finished job in its worker, and its pods with it."""
    codes = [int(m.group(1)) for e in events if e.get("reason") == "ExitedWithCode"
             and (m := EXITED_WITH_CODE.search(e.get("message") or ""))]
    return most_telling(codes)


def backend_of(job: dict[str, Any]) -> Backend:
    return TRAINJOB if job.get("kind") == TRAINJOB.kind else PYTORCHJOB


def has_failed(job: dict[str, Any]) -> bool:
    """Whether a job (either kind) has failed: then its pods are read for the exit code."""
    return true_condition(job.get("status") or {}, "Failed") is not None


def job_state(job: dict[str, Any], cluster: str | None = None, pods: list[dict[str, Any]] | None = None,
              ) -> JobState | None:
    """The state of one of our PyTorchJobs or TrainJobs (a dict as the API returns it; ``pods``: its pods, read
    for a Failed job's exit code); None if it carries no DDM labels."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    key, attempt = labels.get(LABEL_KEY), labels.get(LABEL_ATTEMPT)
    if not key or not attempt or not attempt.isdigit():
        return None
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    backend = backend_of(job)
    if backend is TRAINJOB:
        succeeded = true_condition(status, "Complete")
        suspended = bool(spec.get("suspend"))
        running = any((j.get("active") or 0) > 0 for j in status.get("jobsStatus") or [])
        resumed = next((c for c in status.get("conditions") or [] if c.get("type") == "Suspended"
                        and c.get("status") == "False"), None)
        started_at = parse_time((resumed or {}).get("lastTransitionTime") or meta.get("creationTimestamp"))
    else:
        succeeded = true_condition(status, "Succeeded")
        suspended = bool((spec.get("runPolicy") or {}).get("suspend"))
        running = true_condition(status, "Running") is not None
        started_at = parse_time(status.get("startTime"))
    failed = true_condition(status, "Failed")
    phase: JobPhase
    if succeeded:
        phase = "Succeeded"
    elif failed:
        phase = "Failed"
    elif suspended:
        phase = "Queued" if labels.get(LABEL_QUEUE) else "Suspended"  # Kueue holds a queued job until admission
    elif running:
        phase = "Running"
    else:
        phase = "Pending"
    code = exit_code_of_pods(pods or [], backend.container) if phase == "Failed" else None
    message = (failed or {}).get("message", "") if failed else ""
    done = failed or succeeded
    finished_at = parse_time((done or {}).get("lastTransitionTime"))
    return JobState(key=key, attempt=int(attempt), name=meta.get("name", ""), phase=phase,
                    permanent=code is not None and 1 <= code <= 127, exit_code=code, message=message,
                    cluster=cluster, finished_at=finished_at, queued=bool(labels.get(LABEL_QUEUE)), uid=meta.get("uid", ""),
                    started_at=started_at)


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def latest_attempts(states: list[JobState]) -> dict[str, JobState]:
    """stage key -> its highest attempt (older attempts are history)."""
    latest: dict[str, JobState] = {}
    for s in states:
        if s.key not in latest or s.attempt > latest[s.key].attempt:
            latest[s.key] = s
    return latest
