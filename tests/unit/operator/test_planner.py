"""The pure planner over many observed states: launches, retries with backoff, partial ensembles, suspend/resume."""
from __future__ import annotations

import itertools
from typing import Any

import pytest

from ddm_operator.api.models import DecentralizedDiffusionSpec
from ddm_operator.planner import (
    BASELINE,
    CLUSTER,
    DISTILL,
    EVALUATE,
    ROUTER,
    STUDENT_EVAL,
    Cancel,
    Launch,
    Observed,
    Plan,
    Retry,
    StageKey,
    StageObservation,
    State,
    Suspend,
    Unsuspend,
    backoff_seconds,
    expert_key,
    merge_conditions,
    plan,
)

NOW = 1_000_000.0
OK = StageObservation(State.SUCCEEDED, attempts=1)
RUN = StageObservation(State.RUNNING, attempts=1, step=5)
SUSP = StageObservation(State.SUSPENDED, attempts=1, step=5)


def make_spec(k: int = 3, **over: Any) -> DecentralizedDiffusionSpec:
    doc: dict[str, Any] = {
        "dataset": {"uri": "/data"}, "clustering": {"numClusters": k, "fineClusters": 16},
        "experts": {"steps": 100}, "storage": {"uri": "runs/x"},
        "failurePolicy": {"maxRetriesPerExpert": 2, "maxRetriesPerStage": 1, "backoffSeconds": 10},
    }
    for dotted, value in over.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return DecentralizedDiffusionSpec.model_validate(doc)


def failed(attempts: int = 1, retryable: bool = True, ago: float = 1000.0) -> StageObservation:
    return StageObservation(State.FAILED, attempts=attempts, retryable=retryable, failed_at=NOW - ago, message="boom")


def observe(stages: dict[StageKey, StageObservation], now: float = NOW) -> Observed:
    return Observed(now=now, stages=stages)


def trained(k: int, **experts: StageObservation) -> dict[StageKey, StageObservation]:
    """Clustering and router done, every expert succeeded unless given (keyword e<index>)."""
    stages = {CLUSTER: OK, ROUTER: OK}
    for i in range(k):
        stages[expert_key(i)] = experts.get(f"e{i}", OK)
    return stages


def keys(p: Plan, kind: type) -> list[StageKey]:
    return [a.key for a in p.actions if isinstance(a, kind)]


def cond(p: Plan, type_: str) -> str:
    return next(c.status for c in p.conditions if c.type == type_)


# ---------------------------------------------------------------- the happy path, step by step


def test_happy_path_walks_the_dag() -> None:
    spec = make_spec(k=2, distillation={"enabled": True})
    p = plan(spec, observe({}))
    assert (p.phase, p.actions) == ("Pending", [Launch(CLUSTER, 1)])
    p = plan(spec, observe({CLUSTER: RUN}))
    assert (p.phase, p.actions) == ("Clustering", [])
    p = plan(spec, observe({CLUSTER: OK}))
    assert p.phase == "Training"
    assert p.actions == [Launch(ROUTER, 1), Launch(expert_key(0), 1), Launch(expert_key(1), 1)]
    p = plan(spec, observe({CLUSTER: OK, ROUTER: RUN, expert_key(0): OK, expert_key(1): RUN}))
    assert (p.phase, p.actions, p.experts_ready, p.experts_total) == ("Training", [], 1, 2)
    p = plan(spec, observe(trained(2)))  # the student needs experts and router, not the FID table: both start
    assert (p.phase, p.actions) == ("Evaluating", [Launch(EVALUATE, 1), Launch(DISTILL, 1)])
    p = plan(spec, observe({**trained(2), EVALUATE: RUN, DISTILL: OK}))
    assert (p.phase, p.actions) == ("Evaluating", [])
    p = plan(spec, observe({**trained(2), EVALUATE: OK, DISTILL: RUN}))
    assert (p.phase, p.actions) == ("Distilling", [])
    p = plan(spec, observe({**trained(2), EVALUATE: OK}))
    assert (p.phase, p.actions) == ("Distilling", [Launch(DISTILL, 1)])
    p = plan(spec, observe({**trained(2), EVALUATE: OK, DISTILL: OK}))  # the student's row joins the table
    assert (p.phase, p.reason, p.actions) == ("Evaluating", "EvaluatingStudent", [Launch(STUDENT_EVAL, 1)])
    p = plan(spec, observe({**trained(2), EVALUATE: OK, DISTILL: OK, STUDENT_EVAL: OK}))
    assert (p.phase, p.actions, p.terminal) == ("Succeeded", [], True)
    assert cond(p, "Ready") == "True" and cond(p, "Degraded") == "False" and cond(p, "Progressing") == "False"


def test_the_students_row_waits_for_both_the_table_and_the_student() -> None:
    """evaluate-student reruns the evaluation with the student's row: never before the evaluation committed its table
    (it reads its rows back) nor before distillation committed the student (whose weights it samples)."""
    spec = make_spec(k=2, distillation={"enabled": True})
    absent = StageObservation(State.ABSENT)
    for evaluate, distill in itertools.product([absent, RUN, OK, failed(1)], repeat=2):
        p = plan(spec, observe({**trained(2), EVALUATE: evaluate, DISTILL: distill}))
        launched = STUDENT_EVAL in keys(p, Launch) + keys(p, Retry)
        assert launched == (evaluate is OK and distill is OK), (evaluate, distill, p.actions)
        assert p.stages.student_evaluation is not None and p.stages.student_evaluation.phase == "Pending"
    p = plan(spec, observe({**trained(2), EVALUATE: OK, DISTILL: OK, STUDENT_EVAL: RUN}))
    assert (p.phase, p.actions, p.stages.student_evaluation.phase) == ("Evaluating", [], "Running")  # type: ignore[union-attr]
    p = plan(spec, observe({**trained(2), EVALUATE: OK, DISTILL: OK, STUDENT_EVAL: failed(1)}))
    assert p.actions == [Retry(STUDENT_EVAL, 2, NOW - 1000.0 + backoff_seconds(spec, 1))]
    p = plan(spec, observe({**trained(2), EVALUATE: OK, DISTILL: OK, STUDENT_EVAL: failed(2)}))
    assert (p.phase, p.reason) == ("Failed", "StudentEvaluationFailed") and "student's evaluation" in p.message
    # without distillation there is no student and no such stage
    p = plan(make_spec(k=2), observe({**trained(2), EVALUATE: OK}))
    assert p.phase == "Succeeded" and p.stages.student_evaluation is None


def test_no_distillation_means_done_after_evaluation() -> None:
    p = plan(make_spec(k=2), observe({**trained(2), EVALUATE: OK}))
    assert p.phase == "Succeeded" and p.stages.distillation is None and p.stages.student_evaluation is None


# ---------------------------------------------------------------- exhaustive: invariants over many combinations

EXPERT_STATES = [
    StageObservation(State.ABSENT), RUN, OK, SUSP,
    failed(1), failed(1, ago=1.0), failed(3), failed(1, retryable=False),
]
STAGE_STATES = [StageObservation(State.ABSENT), RUN, OK, failed(1), failed(1, ago=1.0), failed(2), failed(1, retryable=False)]


def _combos() -> list[tuple[Any, ...]]:
    rows = []
    for e0, e1 in itertools.product(EXPERT_STATES, repeat=2):
        for router in STAGE_STATES:
            rows.append((e0, e1, router))
    return rows


@pytest.mark.parametrize("suspend", [False, True])
@pytest.mark.parametrize("parallelism", [None, 1])
def test_invariants_over_all_expert_and_router_states(suspend: bool, parallelism: int | None) -> None:
    spec = make_spec(k=2, suspend=suspend, parallelism=parallelism, failurePolicy={"minExperts": 1, "maxRetriesPerExpert": 2,
                                                                                   "maxRetriesPerStage": 1, "backoffSeconds": 10})
    for e0, e1, router in _combos():
        stages = {CLUSTER: OK, ROUTER: router, expert_key(0): e0, expert_key(1): e1}
        p = plan(spec, observe(stages))
        assert plan(spec, observe(stages)) == p  # idempotent: same observation, same plan
        launched = {a.key for a in p.launches}
        for key, obs in stages.items():
            if obs.state in (State.RUNNING, State.SUCCEEDED, State.SUSPENDED):
                assert key not in launched, f"relaunched {key} ({obs.state})"
            if obs.state is State.FAILED and not obs.retryable:
                assert key not in launched
        for a in p.actions:
            if isinstance(a, Retry):
                assert a.not_before <= NOW and a.attempt == stages[a.key].attempts + 1
            if isinstance(a, Launch):
                assert stages.get(a.key, StageObservation(State.ABSENT)).state is State.ABSENT
        for w in p.waiting:
            assert w.not_before > NOW
        if p.waiting:
            assert p.requeue_after == min(w.not_before for w in p.waiting) - NOW
        else:
            assert p.requeue_after is None
        if suspend or p.phase == "Failed":
            assert not p.launches and not p.waiting and not keys(p, Unsuspend)
        if suspend and p.phase != "Failed":
            assert p.phase == "Suspended"
            assert set(keys(p, Suspend)) == {k for k, o in stages.items() if o.state is State.RUNNING}
        if p.phase == "Failed":
            assert set(keys(p, Cancel)) == {k for k, o in stages.items() if o.state in (State.RUNNING, State.SUSPENDED)}
        if parallelism == 1 and not suspend:
            busy = sum(1 for o in (e0, e1) if o.state in (State.RUNNING, State.SUSPENDED))
            new = [a for a in p.launches if a.key.stage == "expert"]
            assert busy + len(new) <= 1 or busy > 1
        if p.phase == "Evaluating":
            assert router.state is State.SUCCEEDED
            assert all(o.state is State.SUCCEEDED or o in (failed(3), failed(1, retryable=False)) for o in (e0, e1))


# ---------------------------------------------------------------- retries and backoff


@pytest.mark.parametrize("attempts,expected", [(1, 10.0), (2, 20.0), (3, 40.0), (20, 3600.0)])
def test_backoff_is_exponential_and_capped(attempts: int, expected: float) -> None:
    assert backoff_seconds(make_spec(), attempts) == expected


@pytest.mark.parametrize("key", [CLUSTER, ROUTER, EVALUATE, expert_key(1)], ids=str)
def test_retry_waits_for_the_backoff_then_fires(key: StageKey) -> None:
    spec = make_spec(k=2)
    base = {} if key == CLUSTER else trained(2)
    obs = StageObservation(State.FAILED, attempts=1, failed_at=NOW, message="oom")
    stages = {**base, key: obs}
    early = plan(spec, observe(stages, now=NOW + 4))
    assert not any(a.key == key for a in early.actions)
    assert early.waiting == [Retry(key, 2, NOW + 10)] and early.requeue_after == 6.0
    due = plan(spec, observe(stages, now=NOW + 10))
    assert Retry(key, 2, NOW + 10) in due.actions and due.waiting == [] and due.phase != "Failed"


@pytest.mark.parametrize("key,reason", [(CLUSTER, "ClusteringFailed"), (ROUTER, "RouterFailed"), (EVALUATE, "EvaluationFailed")])
def test_stage_retries_exhausted_fails_the_run(key: StageKey, reason: str) -> None:
    spec = make_spec(k=2)  # maxRetriesPerStage 1: two attempts in all
    stages = {**trained(2), key: failed(attempts=2)} if key != CLUSTER else {CLUSTER: failed(attempts=2)}
    if key == ROUTER:
        stages[expert_key(0)] = RUN  # still training: cancelled, the run cannot succeed without a router
    p = plan(spec, observe(stages))
    assert p.phase == "Failed" and p.reason == reason and not p.launches
    assert cond(p, "Failed") == "True" and cond(p, "Ready") == "False"
    assert set(keys(p, Cancel)) == {k for k, o in stages.items() if o.state is State.RUNNING}
    # one attempt fewer: retried instead
    stages[key] = failed(attempts=1)
    assert any(isinstance(a, Retry) and a.key == key and a.attempt == 2 for a in plan(spec, observe(stages)).actions)


def test_permanent_stage_error_is_not_retried() -> None:
    p = plan(make_spec(), observe({CLUSTER: failed(1, retryable=False)}))
    assert p.phase == "Failed" and "permanent" in p.message and p.actions == []


def test_distillation_failure_fails_the_run() -> None:
    spec = make_spec(k=1, distillation={"enabled": True})
    p = plan(spec, observe({**trained(1), EVALUATE: OK, DISTILL: failed(2)}))
    assert (p.phase, p.reason) == ("Failed", "DistillationFailed")


# ---------------------------------------------------------------- partial ensembles


def test_lost_expert_degrades_but_continues_with_survivors() -> None:
    spec = make_spec(k=3, failurePolicy={"minExperts": 2, "maxRetriesPerExpert": 1})
    dead = failed(attempts=2)  # 1 retry allowed: exhausted
    p = plan(spec, observe(trained(3, e1=dead, e2=RUN)))
    assert p.phase == "Training" and cond(p, "Degraded") == "True" and p.experts[1].phase == "Failed"
    p = plan(spec, observe(trained(3, e1=dead)))
    assert (p.phase, p.actions) == ("Evaluating", [Launch(EVALUATE, 1)])
    p = plan(spec, observe({**trained(3, e1=dead), EVALUATE: OK}))
    assert p.phase == "Degraded" and p.terminal and cond(p, "Ready") == "True" and "lost: [1]" in p.message


def test_too_few_survivors_fails_early_and_cancels() -> None:
    spec = make_spec(k=3, failurePolicy={"minExperts": 2})
    perm = failed(1, retryable=False)
    p = plan(spec, observe(trained(3, e0=perm, e1=perm, e2=RUN)))
    assert (p.phase, p.reason) == ("Failed", "TooFewExperts") and p.actions == [Cancel(expert_key(2))]
    assert "minExperts is 2" in p.message


def test_default_min_experts_is_all() -> None:
    p = plan(make_spec(k=2), observe(trained(2, e0=failed(1, retryable=False))))
    assert p.phase == "Failed" and p.reason == "TooFewExperts"


def test_evaluation_waits_for_every_expert_to_finish() -> None:
    spec = make_spec(k=3, failurePolicy={"minExperts": 1})
    p = plan(spec, observe(trained(3, e2=failed(1, ago=1.0))))  # retry pending: not finished
    assert p.phase == "Training" and p.waiting == [Retry(expert_key(2), 2, NOW - 1.0 + backoff_seconds(spec, 1))]


def test_router_must_succeed_before_evaluation() -> None:
    stages = {**trained(2), ROUTER: RUN}
    assert plan(make_spec(k=2), observe(stages)).phase == "Training"


# ---------------------------------------------------------------- parallelism


@pytest.mark.parametrize("parallelism,running,expected", [(2, 0, [0, 1]), (2, 1, [1]), (2, 2, []), (None, 0, [0, 1, 2, 3]), (3, 1, [1, 2])])
def test_parallelism_limits_expert_launches(parallelism: int | None, running: int, expected: list[int]) -> None:
    spec = make_spec(k=4, parallelism=parallelism)
    stages = {CLUSTER: OK, ROUTER: RUN, **{expert_key(i): RUN for i in range(running)}}
    p = plan(spec, observe(stages))
    assert [a.key.index for a in p.launches] == expected


def test_parallelism_counts_retries_and_frees_slots_on_success() -> None:
    spec = make_spec(k=3, parallelism=1)
    p = plan(spec, observe({CLUSTER: OK, ROUTER: OK, expert_key(0): failed(1), expert_key(1): StageObservation(State.ABSENT)}))
    assert p.launches == [Retry(expert_key(0), 2, NOW - 1000 + 10)]
    p = plan(spec, observe({CLUSTER: OK, ROUTER: OK, expert_key(0): OK}))
    assert p.launches == [Launch(expert_key(1), 1)]


# ---------------------------------------------------------------- suspend / resume


def test_suspend_then_resume() -> None:
    stages = {CLUSTER: OK, ROUTER: RUN, expert_key(0): RUN, expert_key(1): OK}
    p = plan(make_spec(k=3, suspend=True), observe(stages))
    assert p.phase == "Suspended" and cond(p, "Suspended") == "True"
    assert p.actions == [Suspend(ROUTER), Suspend(expert_key(0))]  # expert 2 is not launched
    suspended = {CLUSTER: OK, ROUTER: SUSP, expert_key(0): SUSP, expert_key(1): OK}
    assert plan(make_spec(k=3, suspend=True), observe(suspended)).actions == []
    p = plan(make_spec(k=3), observe(suspended))
    assert p.phase == "Training" and cond(p, "Suspended") == "False"
    assert p.actions == [Unsuspend(ROUTER), Unsuspend(expert_key(0)), Launch(expert_key(2), 1)]


def test_suspended_experts_hold_their_parallelism_slot() -> None:
    p = plan(make_spec(k=3, parallelism=1), observe({CLUSTER: OK, ROUTER: OK, expert_key(0): SUSP}))
    assert p.actions == [Unsuspend(expert_key(0))]


def test_suspend_before_start_launches_nothing() -> None:
    p = plan(make_spec(suspend=True), observe({}))
    assert (p.phase, p.actions) == ("Suspended", [])


# ---------------------------------------------------------------- status summaries


def test_expert_summaries() -> None:
    stages = trained(3, e0=StageObservation(State.RUNNING, attempts=2, step=40, cluster="us-east"), e2=failed(1, ago=1.0))
    p = plan(make_spec(k=3), observe(stages))
    e0, e1, e2 = p.experts
    assert (e0.phase, e0.step, e0.total_steps, e0.retries, e0.cluster) == ("Running", 40, 100, 1, "us-east")
    assert (e1.phase, e1.step) == ("Succeeded", 100)
    assert (e2.phase, e2.message) == ("Retrying", "boom")
    assert p.experts_ready == 1 and p.router.phase == "Succeeded"
    assert p.stages.clustering is not None and p.stages.clustering.phase == "Succeeded"
    assert StageKey("expert", 7).id == "expert-007" and CLUSTER.id == "cluster"


def test_an_expert_that_reports_its_own_step_count_is_shown_against_it() -> None:
    """stepsAllocation proportional: an expert's steps are its cluster's share, not spec.experts.steps; the status
    shows the total its progress reports (the spec's while it has reported none)."""
    stages = trained(2, e0=StageObservation(State.RUNNING, attempts=1, step=40, total=250),
                     e1=StageObservation(State.SUCCEEDED, attempts=1, total=30))
    e0, e1 = plan(make_spec(k=2), observe(stages)).experts
    assert (e0.step, e0.total_steps, e1.step, e1.total_steps) == (40, 250, 30, 30)


def test_merge_conditions_keeps_transition_time_unless_status_changes() -> None:
    first = plan(make_spec(), observe({}))
    c1 = merge_conditions([], first.conditions, "2026-01-01T00:00:00Z", 1)
    again = merge_conditions(c1, first.conditions, "2026-01-01T01:00:00Z", 2)
    assert [c.last_transition_time for c in again] == ["2026-01-01T00:00:00Z"] * len(again)
    done = plan(make_spec(k=1), observe({**trained(1), EVALUATE: OK}))
    c3 = merge_conditions(again, done.conditions, "2026-01-02T00:00:00Z", 2)
    ready = next(c for c in c3 if c.type == "Ready")
    assert ready.status == "True" and ready.last_transition_time == "2026-01-02T00:00:00Z" and ready.observed_generation == 2


# ---------------------------------------------------------------- held by a queue (Kueue)


def test_a_stage_waiting_for_admission_reads_pending_with_why_and_is_not_relaunched() -> None:
    """A launched job that Kueue has not admitted yet: the status says Pending and why; to the plan it is launched
    (no second launch, it holds its parallelism slot) and the DDM is Training."""
    queued = StageObservation(State.RUNNING, attempts=1, waiting=True, message="waiting for admission by Kueue")
    spec = make_spec(k=3, parallelism=2)
    p = plan(spec, observe({CLUSTER: OK, ROUTER: RUN, expert_key(0): queued, expert_key(1): RUN}))
    assert p.phase == "Training" and p.actions == []
    e0 = p.experts[0]
    assert e0.phase == "Pending" and e0.message == "waiting for admission by Kueue" and e0.retries == 0
    assert p.experts[1].phase == "Running" and p.experts[2].phase == "Pending" and p.experts[2].message == ""


# ---------------------------------------------------------------- the compute-matched baseline (spec.baseline)


def test_baseline_trains_beside_the_experts_and_the_evaluation_waits_for_it() -> None:
    spec = make_spec(k=2, baseline={})
    p = plan(spec, observe({CLUSTER: OK}))
    assert p.actions == [Launch(ROUTER, 1), Launch(expert_key(0), 1), Launch(expert_key(1), 1), Launch(BASELINE, 1)]
    assert p.stages.baseline is not None and p.stages.baseline.phase == "Pending"
    p = plan(spec, observe({**trained(2), BASELINE: RUN}))
    assert (p.phase, p.actions) == ("Training", []) and "baseline running" in p.message
    assert p.stages.baseline.phase == "Running"  # type: ignore[union-attr]
    p = plan(spec, observe({**trained(2), BASELINE: OK}))
    assert (p.phase, p.actions) == ("Evaluating", [Launch(EVALUATE, 1)])
    assert plan(make_spec(k=2), observe({CLUSTER: OK})).stages.baseline is None


def test_baseline_takes_a_parallelism_slot_after_the_experts() -> None:
    spec = make_spec(k=2, baseline={}, parallelism=2)
    p = plan(spec, observe({CLUSTER: OK}))
    assert p.actions == [Launch(ROUTER, 1), Launch(expert_key(0), 1), Launch(expert_key(1), 1)]
    p = plan(spec, observe({CLUSTER: OK, ROUTER: RUN, expert_key(0): OK, expert_key(1): RUN}))
    assert p.actions == [Launch(BASELINE, 1)]


def test_baseline_retries_as_a_stage_and_its_permanent_failure_fails_the_run() -> None:
    spec = make_spec(k=2, baseline={})
    p = plan(spec, observe({**trained(2), BASELINE: failed(1)}))
    assert p.actions == [Retry(BASELINE, 2, NOW - 1000.0 + 10)]
    p = plan(spec, observe({**trained(2), BASELINE: failed(1, retryable=False)}))
    assert (p.phase, p.reason) == ("Failed", "BaselineFailed") and "baseline failed: permanent error" in p.message
    assert plan(make_spec(k=2, baseline={"enabled": False}), observe(trained(2))).phase == "Evaluating"
