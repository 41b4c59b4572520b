"""The local runner's observation: committed manifests and its own children -> the planner's Observed."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ddm_operator import planner
from ddm_operator.api.models import DecentralizedDiffusion
from ddm_operator.local.runner import Child, Finished, ObservedState, default_run_dir, done_prefix, local_run_uri, observe
from ddm_operator.planner import State
from ddm_operator.stages import CLUSTER, DISTILL, EVALUATE, ROUTER, STUDENT_EVAL, all_keys, expert_key
from ddm_trainer.store import FileStore

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def spec() -> DecentralizedDiffusion:
    doc = yaml.safe_load((ROOT / "examples" / "local-fashion-mnist.yaml").read_text())
    return DecentralizedDiffusion.model_validate(doc)


def _commit(store: FileStore, key: planner.StageKey) -> None:
    store.commit(done_prefix(key), {"weights.bin": b"x"})


def test_empty_store_everything_absent_and_clustering_launches(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    obs = observe(spec.spec, FileStore(tmp_path), ObservedState(), now=100.0)
    assert {o.state for o in obs.stages.values()} == {State.ABSENT}
    assert set(obs.stages) == set(all_keys(spec.spec))
    plan = planner.plan(spec.spec, obs)
    assert [a.key for a in plan.launches] == [CLUSTER]


def test_manifests_mark_stages_done_and_unlock_experts(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    _commit(store, CLUSTER)
    _commit(store, expert_key(1))
    obs = observe(spec.spec, store, ObservedState(), now=100.0)
    assert obs.get(CLUSTER).state is State.SUCCEEDED
    assert obs.get(expert_key(1)).state is State.SUCCEEDED
    assert obs.get(expert_key(0)).state is State.ABSENT
    launched = {a.key for a in planner.plan(spec.spec, obs).launches}
    assert expert_key(1) not in launched  # finished experts are never relaunched
    assert {ROUTER, expert_key(0)} <= launched


def test_uncommitted_checkpoints_do_not_count_as_done(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    _commit(store, CLUSTER)
    store.commit("experts/000/checkpoints/step-000000100", {"model.pt": b"x"})
    store.put_bytes("experts/000/final/model.pt", b"torn write, no manifest")
    obs = observe(spec.spec, store, ObservedState(), now=1.0)
    assert obs.get(expert_key(0)).state is State.ABSENT


def test_exit_codes_decide_retryable_or_permanent(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    _commit(store, CLUSTER)
    state = ObservedState(
        finished={expert_key(0): Finished(1, 143, 50.0, "preempted"),
                  expert_key(1): Finished(1, 4, 50.0, "loss is nan"),
                  expert_key(2): Finished(1, 0, 50.0, "")},
        attempts={expert_key(0): 1, expert_key(1): 1, expert_key(2): 1},
    )
    obs = observe(spec.spec, store, state, now=60.0)
    e0, e1, e2 = (obs.get(expert_key(k)) for k in range(3))
    assert (e0.state, e0.retryable, e0.attempts) == (State.FAILED, True, 1)
    assert (e1.state, e1.retryable, e1.message) == (State.FAILED, False, "loss is nan")
    assert e2.state is State.FAILED and not e2.retryable and "without committing" in e2.message


def test_manifest_beats_a_remembered_failure(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    _commit(store, CLUSTER)
    state = ObservedState(finished={CLUSTER: Finished(1, 151, 1.0, "oom")}, attempts={CLUSTER: 1})
    assert observe(spec.spec, store, state, now=2.0).get(CLUSTER).state is State.SUCCEEDED


def test_running_child_is_running_with_its_step(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    _commit(store, CLUSTER)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        child = Child(expert_key(2), 1, proc, tmp_path / "log", time.monotonic(), threading.Thread(), step=42)
        state = ObservedState(running={expert_key(2): child}, attempts={expert_key(2): 1})
        obs = observe(spec.spec, store, state, now=1.0)
        assert (obs.get(expert_key(2)).state, obs.get(expert_key(2)).step) == (State.RUNNING, 42)
        launched = {a.key for a in planner.plan(spec.spec, obs).launches}
        assert expert_key(2) not in launched
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_evaluation_waits_for_every_expert_and_the_router(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for key in all_keys(spec.spec):
        if key.stage in ("cluster", "expert"):
            _commit(store, key)
    assert EVALUATE not in {a.key for a in planner.plan(spec.spec, observe(spec.spec, store, ObservedState(), 1.0)).launches}
    _commit(store, ROUTER)
    launched = [a.key for a in planner.plan(spec.spec, observe(spec.spec, store, ObservedState(), 1.0)).launches]
    assert launched == ([EVALUATE, DISTILL] if spec.spec.distill_enabled else [EVALUATE])  # the student runs beside it


def test_relative_local_storage_resolves_against_the_working_dir(spec: DecentralizedDiffusion, tmp_path: Path) -> None:
    assert local_run_uri(spec.spec, tmp_path) == str(tmp_path / "runs" / "fashion-mnist")
    assert default_run_dir(spec.spec, "fashion-mnist", tmp_path) == tmp_path / "runs" / "fashion-mnist"
    s3 = spec.spec.model_copy(update={"storage": spec.spec.storage.model_copy(update={"uri": "s3://b/p"})})
    assert local_run_uri(s3, tmp_path) == "s3://b/p"
    assert default_run_dir(s3, "x", tmp_path) == tmp_path / "runs" / "x"


def test_the_students_row_is_done_when_the_committed_table_holds_it(spec: DecentralizedDiffusion,
                                                                      tmp_path: Path) -> None:
    """evaluate-student commits the evaluation's table again: the table without the student row (the evaluation's
    own) does not finish it, and it starts only once the student is committed too."""
    assert spec.spec.distill_enabled
    store = FileStore(tmp_path)
    for key in all_keys(spec.spec):
        if key.stage in ("cluster", "expert", "router"):
            _commit(store, key)
    table = [{"strategy": "full", "fid": 3.0}]
    store.commit(done_prefix(EVALUATE), {"results.json": b"{}"}, {"table": table})

    def launched() -> list[planner.StageKey]:
        return [a.key for a in planner.plan(spec.spec, observe(spec.spec, store, ObservedState(), 1.0)).launches]

    assert launched() == [DISTILL]  # the table is committed, the student not yet
    _commit(store, DISTILL)
    assert observe(spec.spec, store, ObservedState(), 1.0).get(STUDENT_EVAL).state is State.ABSENT
    assert launched() == [STUDENT_EVAL]
    store.commit(done_prefix(EVALUATE), {"results.json": b"{}"}, {"table": [*table, {"strategy": "student", "fid": 4.0}]})
    assert observe(spec.spec, store, ObservedState(), 1.0).get(STUDENT_EVAL).state is State.SUCCEEDED
    assert planner.plan(spec.spec, observe(spec.spec, store, ObservedState(), 1.0)).phase == "Succeeded"


def test_an_omp_thread_count_that_oversubscribes_the_cores_is_warned_about() -> None:
    from ddm_operator.local.runner import oversubscription

    warning = oversubscription("2", 2, 2)
    assert warning is not None and "OMP_NUM_THREADS=2" in warning and "4 threads on 2 cores" in warning
    assert "each stage then gets 1" in warning
    assert oversubscription("1", 2, 2) is None  # fits
    assert oversubscription("4", 1, 2) is None  # one stage at a time: the user's choice
    assert oversubscription(None, 4, 2) is None  # unset: ddm run gives each stage its slice
    assert oversubscription("many", 4, 2) is None  # not a number: OpenMP's problem, not a guess of ours
