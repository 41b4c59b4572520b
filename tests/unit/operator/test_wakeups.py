"""When the operator looks at a DDM again: which child events wake it, which DDMs keep a reconciler, when a pass is due
without an event (operator/ddm_operator/k8s/handlers.py; tests/integration/test_operator.py measures it for real)."""
from __future__ import annotations

from typing import Any

import pytest

from ddm_operator.k8s import builders as b
from ddm_operator.k8s import handlers
from ddm_operator.k8s.observe import JobState


def job(uid: str, *conditions: str, suspend: bool = False, queue: bool = False) -> dict[str, Any]:
    labels = {b.LABEL_UID: "ddm-1", b.LABEL_KEY: "expert-000", b.LABEL_ATTEMPT: "1"}
    if queue:
        labels[b.LABEL_QUEUE] = "q"
    return {"metadata": {"uid": uid, "name": "d-expert-000-a1", "labels": labels},
            "spec": {"runPolicy": {"suspend": suspend}},
            "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]}}


def test_only_phase_changes_and_deletions_of_a_child_wake_its_ddm() -> None:
    seen: dict[str, str] = {}
    assert not handlers.child_wakes_parent("ADDED", job("j1"), seen)  # just created by a pass: it knows
    assert not handlers.child_wakes_parent("MODIFIED", job("j1", "Created"), seen)  # still Pending
    # Pending -> Running: the planner reads both as running; the next pass shows progress
    assert not handlers.child_wakes_parent("MODIFIED", job("j1", "Created", "Running"), seen)
    assert handlers.child_wakes_parent("MODIFIED", job("j1", "Created", "Running", "Succeeded"), seen)
    assert not handlers.child_wakes_parent("MODIFIED", job("j1", "Created", "Running", "Succeeded"), seen)  # again
    assert seen == {"j1": "Succeeded"}
    assert handlers.child_wakes_parent("DELETED", job("j1", "Succeeded"), seen) and seen == {}
    # seen first in another phase (the operator restarted): wake, the reconciler reads it anyway
    assert handlers.child_wakes_parent(None, job("j2", "Created", "Running", "Failed"), seen)
    # Kueue admits a queued job (suspend true -> false): Queued -> Pending wakes, the status stops saying "waiting"
    assert handlers.child_wakes_parent("ADDED", job("j3", suspend=True, queue=True), seen)
    assert handlers.child_wakes_parent("MODIFIED", job("j3", queue=True), seen)
    # suspended by the DDM's spec.suspend and resumed: both wake
    assert handlers.child_wakes_parent("MODIFIED", job("j3", "Created", suspend=True), seen)
    assert handlers.child_wakes_parent("MODIFIED", job("j3", "Created", "Running"), seen)
    # no DDM labels: not ours to read
    assert not handlers.child_wakes_parent("MODIFIED", {"metadata": {"uid": "x", "labels": {}}}, seen)


@pytest.mark.parametrize(("phase", "observed", "generation", "expected"), [
    (None, None, 1, True),  # new
    ("Training", 1, 1, True),
    ("Suspended", 2, 2, True),
    ("Succeeded", 1, 1, False),
    ("Degraded", 3, 3, False),
    ("Failed", 1, 1, False),
    ("Succeeded", 1, 2, True),  # finished, then its spec changed: looked at again
    ("Failed", None, 1, True),
])
def test_finished_ddms_have_no_reconciler_until_their_spec_changes(phase: str | None, observed: int | None,
                                                                    generation: int, expected: bool) -> None:
    status = {k: v for k, v in (("phase", phase), ("observedGeneration", observed)) if v is not None}
    assert handlers.needs_reconciler(status=status, meta={"generation": generation}) is expected


def test_next_pass_without_an_event_retry_backoff_or_a_live_remote_stage() -> None:
    local = JobState(key="expert-000", attempt=1, name="a", phase="Running")
    remote_running = JobState(key="expert-001", attempt=1, name="b", phase="Running", cluster="east")
    remote_done = JobState(key="expert-002", attempt=1, name="c", phase="Succeeded", cluster="east")
    assert handlers.next_look(None, {"a": local, "c": remote_done}) is None  # events only (and the safety net)
    assert handlers.next_look(2.5, {"a": local}) == 2.5
    assert handlers.next_look(None, {"b": remote_running}) == handlers.REMOTE_INTERVAL_S
    assert handlers.next_look(0.5, {"b": remote_running}) == 0.5


def test_a_remote_stage_is_polled_only_while_its_clusters_watch_is_down() -> None:
    remote_running = JobState(key="expert-001", attempt=1, name="b", phase="Running", cluster="east")
    assert handlers.next_look(None, {"b": remote_running}, {"east"}) is None  # its watch wakes the DDM
    assert handlers.next_look(None, {"b": remote_running}, {"west"}) == handlers.REMOTE_INTERVAL_S


def test_event_handler_successes_are_debug_lines() -> None:
    import logging

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, message, None, None)

    quiet, kept = record("Handler 'on_ddm_event' succeeded."), record("Handler 'on_delete' succeeded.")
    logging.getLogger("kopf.objects").setLevel(logging.INFO)
    try:
        assert handlers._quiet_event_handlers(quiet) is False and quiet.levelname == "DEBUG"
        assert handlers._quiet_event_handlers(kept) is True and kept.levelname == "INFO"
        logging.getLogger("kopf.objects").setLevel(logging.DEBUG)
        assert handlers._quiet_event_handlers(record("Handler 'on_ddm_event' succeeded.")) is True  # --verbose
    finally:
        logging.getLogger("kopf.objects").setLevel(logging.NOTSET)


def test_experts_changing_together_make_one_event() -> None:
    from ddm_operator.api.models import DecentralizedDiffusionStatus

    def status(*phases: str, jobs: tuple[str, ...] = ()) -> DecentralizedDiffusionStatus:
        return DecentralizedDiffusionStatus.model_validate({"phase": "Training", "experts": [
            {"index": i, "phase": p, **({"jobName": jobs[i]} if jobs else {})} for i, p in enumerate(phases)]})

    jobs = ("x-expert-000-a1", "x-expert-001-a1", "x-expert-002-a1")
    events = handlers._transitions(status("Pending", "Pending", "Running", jobs=jobs),
                                   status("Running", "Running", "Succeeded", jobs=jobs))
    assert events == [("ExpertChanged", "experts 0, 1 Pending -> Running"),
                      ("ExpertChanged", "expert 2 Running -> Succeeded (x-expert-002-a1)")]
    retried = handlers._transitions(status("Failed", jobs=jobs[:1]), status("Running", jobs=("x-expert-000-a2",)))
    assert retried == [("ExpertRetried", "expert 0 retried as x-expert-000-a2 (after x-expert-000-a1)")]


def test_a_store_that_fails_rests_but_a_missing_report_does_not(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass reads the progress of each running stage; a store that does not answer must not make every read of
    every pass wait on it (an unreachable S3 endpoint costs seconds per read)."""
    import json
    from pathlib import Path

    from ddm_operator import stages
    from ddm_operator.api.models import DecentralizedDiffusionSpec

    spec = DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/data"}, "clustering": {"numClusters": 2, "fineClusters": 16},
        "experts": {"steps": 100}, "storage": {"uri": f"file://{tmp_path}/runs"}})
    monkeypatch.setattr(handlers, "_store_down", {})
    run = Path(stages.run_uri(spec, "ns", "d").removeprefix("file://"))
    run.mkdir(parents=True)
    assert handlers._progress_report(spec, "ns", "d", "expert-000") == {}  # no report yet: not a failure
    assert handlers._store_down[stages.run_uri(spec, "ns", "d")][0] == 0.0  # not resting
    (run / "progress").write_text("a file where the folder should be")  # reads now fail (StoreError)
    assert handlers._progress_report(spec, "ns", "d", "expert-000") == {}
    assert handlers._store_down[stages.run_uri(spec, "ns", "d")][0] > 0  # resting
    (run / "progress").unlink()
    (run / "progress").mkdir()
    (run / "progress" / "expert-000.json").write_text(json.dumps({"step": 7}))
    with pytest.raises(handlers.StoreResting):
        handlers._run_store(spec, "ns", "d")
    assert handlers._progress_report(spec, "ns", "d", "expert-000") == {}  # resting: not read
    handlers._store_down.clear()  # DDM_STORE_RETRY_S later
    assert handlers._progress_report(spec, "ns", "d", "expert-000") == {"step": 7}


def test_a_client_rebuilt_from_a_rotated_secret_does_not_inherit_the_old_clients_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys rotated at the server: the old client's read fails (refused while the server restarts) and it rests;
    the client built from the new Secret is read at once and on every later pass, not only on its first (found by
    tests/integration/test_storage_cluster.py once the operator's store reads stopped retrying for seconds)."""
    from ddm_operator.api.models import DecentralizedDiffusionSpec

    spec = DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/data"}, "clustering": {"numClusters": 2, "fineClusters": 16},
        "experts": {"steps": 100}, "storage": {"uri": "s3://bucket/runs", "credentialsSecret": "creds"}})
    old, new = object(), object()
    current = [old]
    monkeypatch.setattr(handlers, "_store_down", {})
    monkeypatch.setattr(handlers, "_stores", type("Clients", (), {"get": lambda self, *a: current[0]})())
    monkeypatch.setattr(handlers, "_core", lambda: None)
    assert handlers._run_store(spec, "ns", "d") is old
    handlers._store_failed(spec, "ns", "d", ConnectionRefusedError("[Errno 111] Connection refused"))
    with pytest.raises(handlers.StoreResting):
        handlers._run_store(spec, "ns", "d")
    current[0] = new  # the Secret changed: StoreClients built a new client
    assert handlers._run_store(spec, "ns", "d") is new
    assert handlers._run_store(spec, "ns", "d") is new  # and again on the next pass


def test_a_finished_ddm_whose_results_the_store_did_not_give_keeps_its_reconciler() -> None:
    """The evaluation succeeded while the store was down: the DDM is Succeeded, but its table is read only by a pass,
    so it keeps a reconciler until a pass reads it (ResultsRead True again)."""
    from ddm_operator.api.models import Condition

    done = {"phase": "Succeeded", "observedGeneration": 1}
    conditions = handlers._results_read([], ["the evaluation table: S3Error: connection refused"], 1)
    assert [(c.type, c.status, c.reason) for c in conditions] == [("ResultsRead", "False", "StoreUnreachable")]
    unread = {**done, "conditions": [c.to_wire() for c in conditions]}
    assert handlers.needs_reconciler(status=unread, meta={"generation": 1}) is True
    assert handlers._results_read(conditions, ["again"], 1) is conditions  # written once per outage
    read = handlers._results_read(conditions, [], 1)
    assert [(c.type, c.status, c.reason) for c in read] == [("ResultsRead", "True", "StoreAnswered")]
    assert "connection refused" in read[0].message
    assert handlers.needs_reconciler(status={**done, "conditions": [c.to_wire() for c in read]},
                                     meta={"generation": 1}) is False
    assert handlers._results_read([Condition(type="Ready", status="True")], [], 1)[0].type == "Ready"  # untouched


@pytest.mark.parametrize("queued", [False, True])
def test_the_job_index_keeps_all_that_a_pass_reads_of_a_job(queued: bool) -> None:
    """The index holds jobs without their pod templates (memory at 100 DDMs x K=8); a pass must read the same state
    from the slim copy as from the whole job, for both backends."""
    from ddm_operator.k8s.observe import job_state
    from ddm_operator.k8s.remote_watch import _slim

    whole = job("j1", "Created", "Running", suspend=True, queue=queued)
    whole.update(apiVersion="kubeflow.org/v1", kind="PyTorchJob")
    whole["metadata"].update(managedFields=[{"manager": "x"}], resourceVersion="7", creationTimestamp="2026-01-01T00:00:00Z")
    whole["spec"]["pytorchReplicaSpecs"] = {"Master": {"template": {"spec": {"containers": [{"name": "pytorch"}]}}}}
    whole["status"]["startTime"] = "2026-01-01T00:00:01Z"
    slim = _slim(whole)
    assert "pytorchReplicaSpecs" not in slim["spec"] and "managedFields" not in slim["metadata"]
    assert job_state(slim) == job_state(whole) and job_state(slim).phase in ("Queued", "Suspended")
    trainjob = {**whole, "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "spec": {"suspend": False},
                "status": {"jobsStatus": [{"active": 1}]}}
    assert job_state(_slim(trainjob)) == job_state(trainjob) and job_state(trainjob).phase == "Running"
