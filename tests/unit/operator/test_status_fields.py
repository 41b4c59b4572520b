"""Every declared status field is written: each stage's start and end (the PyTorchJob's own startTime and its
terminal condition), every expert's last committed checkpoint and the training ETA (from the trainer's progress
reports), the router's held-out accuracy and URI once it is committed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ddm_operator import planner as pl
from ddm_operator.api.models import DecentralizedDiffusionSpec, DecentralizedDiffusionStatus
from ddm_operator.k8s import handlers
from ddm_operator.k8s.builders import LABEL_ATTEMPT, LABEL_KEY
from ddm_operator.k8s.observe import JobState, job_state
from ddm_trainer.progress import Reporter
from ddm_trainer.store import FileStore


def spec(tmp_path: Path) -> DecentralizedDiffusionSpec:
    return DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/data"}, "clustering": {"numClusters": 2, "fineClusters": 8},
        "experts": {"steps": 1000, "batchSize": 256}, "storage": {"uri": f"file://{tmp_path}"}})


def state(key: str, *conds: tuple[str, str], progress: dict | None = None) -> JobState:
    """One of our PyTorchJobs as the training operator leaves it (status.startTime, conditions), observed."""
    raw = {"metadata": {"name": f"d-{key}-a1", "labels": {LABEL_KEY: key, LABEL_ATTEMPT: "1"}},
           "status": {"startTime": "2026-12-06T08:00:00Z", "conditions": [
               {"type": t, "status": "True", "lastTransitionTime": when} for t, when in conds]}}
    js = job_state(raw)
    assert js is not None
    return js if progress is None else dataclasses.replace(js, progress=progress)


def test_stage_times_checkpoints_eta_and_router_facts(tmp_path: Path) -> None:
    s = spec(tmp_path)
    latest = {
        "cluster": state("cluster", ("Running", "2026-12-06T08:00:05Z"), ("Succeeded", "2026-12-06T08:03:00Z")),
        "router": state("router", ("Succeeded", "2026-12-06T08:20:00Z")),
        "expert-000": state("expert-000", ("Running", "2026-12-06T08:04:00Z"),
                            progress={"step": 400, "total": 1000, "images_per_s": 512.0,
                                      "last_checkpoint": "file:///r/experts/000/checkpoints/step-000000400"}),
        "expert-001": state("expert-001", ("Running", "2026-12-06T08:04:00Z"),
                            progress={"step": 900, "total": 1000, "images_per_s": 256.0}),
    }
    observed = pl.Observed(now=0.0, stages={
        pl.CLUSTER: pl.StageObservation(pl.State.SUCCEEDED, 1), pl.ROUTER: pl.StageObservation(pl.State.SUCCEEDED, 1),
        pl.expert_key(0): pl.StageObservation(pl.State.RUNNING, 1, step=400),
        pl.expert_key(1): pl.StageObservation(pl.State.RUNNING, 1, step=900)})
    plan = pl.plan(s, observed)
    status = handlers._status_of(plan, DecentralizedDiffusionStatus(), latest, 1, None, s.experts.batch_size,
                                 (0.62, "file:///r/router/final"))
    assert status.stages.clustering.started_at == "2026-12-06T08:00:00Z"  # type: ignore[union-attr]
    assert status.stages.clustering.finished_at == "2026-12-06T08:03:00Z"  # type: ignore[union-attr]
    assert status.experts[0].last_checkpoint.endswith("step-000000400")  # type: ignore[union-attr]
    assert status.experts[1].last_checkpoint is None
    # expert 0: 600 steps x 256 images / 512 images/s = 300 s; expert 1: 100 x 256 / 256 = 100 s -> the slower
    assert status.eta == "5m00s"
    assert (status.router.accuracy, status.router.uri) == (0.62, "file:///r/router/final")  # type: ignore[union-attr]
    # the next pass reads neither again: what the last status holds stays
    again = handlers._status_of(plan, status, {k: v for k, v in latest.items() if k != "expert-000"} | {
        "expert-000": state("expert-000", ("Running", "2026-12-06T08:04:00Z"), progress={"step": 420, "total": 1000})},
        1, None, 256)
    assert again.router.uri == "file:///r/router/final"  # type: ignore[union-attr]
    assert again.experts[0].last_checkpoint.endswith("step-000000400")  # type: ignore[union-attr]
    assert handlers.training_eta(pl.plan(s, pl.Observed(now=0.0)), {}, 256) is None


def test_router_facts_average_the_committed_accuracy(tmp_path: Path) -> None:
    s = spec(tmp_path)
    store = FileStore(tmp_path / "ns" / "d")
    store.commit("router/eval", {"accuracy.json": json.dumps({"bins": [{"accuracy": 0.9}, {"accuracy": 0.3}]}).encode()})
    accuracy, uri = handlers._router_facts(s, "ns", "d")
    assert accuracy == 0.6 and uri is not None and uri.endswith("/ns/d/router/final")


def test_progress_reports_keep_the_last_committed_checkpoint(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    r = Reporter("expert", 3, 100, store, every_s=0.0)
    r.update(10, loss=1.0)
    r.event("checkpoint", step=20, checkpoint="file:///r/experts/003/checkpoints/step-000000020")
    r.update(30, loss=0.5)
    report = store.get_json("progress/expert-003.json")
    assert report["step"] == 30 and report["last_checkpoint"].endswith("step-000000020")


class _Unreachable:
    """A member cluster's client whose every call fails as urllib3 does when the API server does not answer."""

    def delete_collection_namespaced_custom_object(self, *a: object, **kw: object) -> None:
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    delete_collection_namespaced_config_map = delete_collection_namespaced_custom_object


def test_deletion_with_an_unreachable_member_cluster_ends_after_a_bounded_time(monkeypatch) -> None:
    import time

    import kopf
    import pytest

    ddm_spec = {"dataset": {"uri": "/data"}, "clustering": {"numClusters": 2, "fineClusters": 8},
                "experts": {"steps": 10, "placement": {"targetCluster": "far"}}, "storage": {"uri": "s3://b/r"}}
    monkeypatch.setattr(handlers, "_client_for", lambda ns, cluster: object())
    monkeypatch.setattr(handlers, "_custom", lambda api: _Unreachable())
    monkeypatch.setattr(handlers, "_core", lambda api=None: _Unreachable())
    warned: list[str] = []
    monkeypatch.setattr(handlers.kopf, "warn", lambda body, reason, message: warned.append(f"{reason}: {message}"))

    def delete(asked_ago: float) -> None:
        asked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - asked_ago))
        handlers.on_delete(namespace="ns", uid="u-1", spec=ddm_spec, meta={"deletionTimestamp": asked}, body={})

    with pytest.raises(kopf.TemporaryError, match=r"cleanup of clusters \['far'\] failed") as retried:
        delete(asked_ago=10)  # within the deadline: kopf retries it
    assert retried.value.delay == handlers.CLEANUP_RETRY_S
    with pytest.raises(kopf.TemporaryError) as retried:
        delete(asked_ago=handlers.CLEANUP_TIMEOUT_S - 5)  # the last try comes at the deadline, not after it
    assert handlers.CLEANUP_RETRY_S > retried.value.delay >= 4
    assert warned == []
    delete(asked_ago=handlers.CLEANUP_TIMEOUT_S + 5)  # past it: released, and the Event says what stays
    assert len(warned) == 1 and warned[0].startswith("CleanupIncomplete: gave up after")
    assert "cluster far: PyTorchJobs and ConfigMaps in namespace ns with label ddm.io/uid=u-1" in warned[0]
    assert "ConnectionRefusedError" in warned[0]
