"""What the children say: PyTorchJob objects -> per-stage-key attempt states, pure.

How a failure is classified (the trainer's exit codes: 1-127 permanent, 128-255 retryable, see errors.ExitCode):
with ``restartPolicy: ExitCode`` the training operator restarts retryable exits in place and marks the job
Failed at once on a permanent exit. The Failed condition's message carries the exit code when the controller
knows it (``... exit code 3``, ``exitCode: 3``); the operator reads it from there, or from the annotation
``ddm.io/exit-code`` (set by whoever knows better, e.g. a pod-watching sidecar or a test). A Failed job with a
code in 1-127 is permanent: retrying cannot help. Any other Failed job (retryable code, backoff limit or
deadline exceeded, no code at all) counts as an infrastructure failure and gets a new attempt.
"""
from __future__ import annotations

import re
from datetime import datetime
from dataclasses import dataclass
from typing import Any, Literal

from .builders import LABEL_ATTEMPT, LABEL_KEY

JobPhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
ANNOTATION_EXIT_CODE = "ddm.io/exit-code"
_EXIT_CODE = re.compile(r"exit[ _-]?code[\"']?\s*[:=]?\s*(\d+)", re.IGNORECASE)


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


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def exit_code_of(job: dict[str, Any], failed: dict[str, Any] | None) -> int | None:
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(ANNOTATION_EXIT_CODE)
    if raw is not None and str(raw).isdigit():
        return int(raw)
    if failed:
        match = _EXIT_CODE.search(f"{failed.get('reason', '')} {failed.get('message', '')}")
        if match:
            return int(match.group(1))
    return None


def job_state(job: dict[str, Any], cluster: str | None = None) -> JobState | None:
    """The state of one of our PyTorchJobs (a dict as the API returns it); None if it carries no DDM labels."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    key, attempt = labels.get(LABEL_KEY), labels.get(LABEL_ATTEMPT)
    if not key or not attempt or not attempt.isdigit():
        return None
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    failed = _condition(status, "Failed")
    phase: JobPhase
    if _condition(status, "Succeeded"):
        phase = "Succeeded"
    elif failed:
        phase = "Failed"
    elif (spec.get("runPolicy") or {}).get("suspend"):
        phase = "Suspended"
    elif _condition(status, "Running"):
        phase = "Running"
    else:
        phase = "Pending"
    code = exit_code_of(job, failed) if phase == "Failed" else None
    message = (failed or {}).get("message", "") if failed else ""
    done = failed or _condition(status, "Succeeded")
    finished_at = parse_time((done or {}).get("lastTransitionTime"))
    return JobState(key=key, attempt=int(attempt), name=meta.get("name", ""), phase=phase,
                    permanent=code is not None and 1 <= code <= 127, exit_code=code, message=message,
                    cluster=cluster, finished_at=finished_at)


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
