"""The planner of a grown run (spec.growth) and of the partial ensemble's lightweight evaluation
(spec.evaluation.partial): pure, over observed states."""
from __future__ import annotations

from typing import Any

import pytest

from ddm_operator.api.models import DecentralizedDiffusionSpec
from ddm_operator.planner import (
    CLUSTER,
    EVALUATE,
    ROUTER,
    Launch,
    Observed,
    ParentObservation,
    StageKey,
    StageObservation,
    State,
    expert_key,
    parent_from_manifest,
    plan,
    probe_key,
)
from ddm_operator.stages import parse_key, stage_config, trainer_command

NOW = 1_000_000.0
OK = StageObservation(State.SUCCEEDED, attempts=1)
RUN = StageObservation(State.RUNNING, attempts=1, step=5)
PARENT = ParentObservation("runs/parent", 3, frozenset({0, 1, 2}))


GROWTH = {"parentUri": "runs/parent"}


def spec(k: int = 4, growth: dict[str, Any] | None = GROWTH, **extra: Any) -> DecentralizedDiffusionSpec:
    doc: dict[str, Any] = {"dataset": {"uri": "/new"}, "clustering": {"numClusters": k, "fineClusters": 16},
                           "experts": {"steps": 100}, "storage": {"uri": "runs/grown"},
                           "evaluation": {"strategies": ["full", "top-4"]}, **extra}
    if growth is not None:
        doc["growth"] = growth
    return DecentralizedDiffusionSpec.model_validate(doc)


def launched(p: Any) -> list[StageKey]:
    return [a.key for a in p.actions if isinstance(a, Launch)]


def test_a_grown_run_trains_only_the_new_experts_and_a_router() -> None:
    p = plan(spec(), Observed(NOW, {CLUSTER: OK}, parent=PARENT))
    assert launched(p) == [ROUTER, expert_key(3)]
    assert [e.phase for e in p.experts] == ["Succeeded", "Succeeded", "Succeeded", "Pending"]
    assert "by reference: runs/parent" in p.experts[0].message
    assert p.experts_ready == 3
    done = plan(spec(), Observed(NOW, {CLUSTER: OK, ROUTER: OK, expert_key(3): OK}, parent=PARENT))
    assert launched(done) == [EVALUATE]  # the parent's three and the new one: evaluated together


def test_an_expert_the_parent_lost_is_lost_to_the_grown_run() -> None:
    parent = ParentObservation("runs/parent", 3, frozenset({0, 2}))
    p = plan(spec(failurePolicy={"minExperts": 3}), Observed(NOW, {CLUSTER: OK}, parent=parent))
    assert expert_key(1) not in launched(p)  # never retrained here
    assert p.experts[1].phase == "Failed" and "not committed in the parent run" in p.experts[1].message
    too_few = plan(spec(failurePolicy={"minExperts": 4}), Observed(NOW, {CLUSTER: OK}, parent=parent))
    assert too_few.phase == "Failed" and too_few.reason == "TooFewExperts"


def test_nearest_assignment_trains_no_expert() -> None:
    s = spec(k=3, evaluation={"strategies": ["full"]}, growth={"parentUri": "p", "assignment": "nearest"})
    assert launched(plan(s, Observed(NOW, {CLUSTER: OK}, parent=PARENT))) == [ROUTER]


def test_retrain_grown_trains_the_parents_experts_whose_clusters_grew() -> None:
    parent = ParentObservation("runs/parent", 3, frozenset({0, 1, 2}), grown=frozenset({1}))
    s = spec(k=3, evaluation={"strategies": ["full"]}, growth={"parentUri": "p", "assignment": "nearest",
                                                               "retrain": "grown"})
    assert launched(plan(s, Observed(NOW, {CLUSTER: OK}, parent=parent))) == [ROUTER, expert_key(1)]
    cfg = stage_config(s, expert_key(1), "runs/grown")
    assert cfg["init_from_parent"] is True and cfg["cluster_index"] == 1
    assert launched(plan(spec(k=3, evaluation={"strategies": ["full"]}, growth={"parentUri": "p", "assignment": "nearest"}),
                         Observed(NOW, {CLUSTER: OK}, parent=parent))) == [ROUTER]  # retrain: new (default)
    assert "init_from_parent" not in stage_config(spec(), expert_key(3), "r")
    assert parent_from_manifest({"parent": {"uri": "runs/parent", "num_clusters": 3, "experts": [0, 1, 2]},
                                 "grown": [1]}) == parent


def test_nothing_trains_until_the_parent_is_read() -> None:
    p = plan(spec(), Observed(NOW, {CLUSTER: OK}))  # e.g. the store unreadable from the operator for a moment
    assert (p.phase, p.reason, launched(p)) == ("Training", "WaitingForParent", [])


def test_parent_from_manifest() -> None:
    assert parent_from_manifest({"parent": {"uri": "s3://b/p", "num_clusters": 3, "experts": [0, 2]}}) == \
        ParentObservation("s3://b/p", 3, frozenset({0, 2}))
    assert parent_from_manifest({"num_clusters": 3}) is None and parent_from_manifest(None) is None


def test_stage_configs_of_a_grown_run() -> None:
    s = spec()
    assert stage_config(s, CLUSTER, "runs/grown")["growth"] == {"parent_uri": "runs/parent",
                                                               "assignment": "new-clusters"}
    assert stage_config(s, EVALUATE, "runs/grown")["strategies"] == ["full", "top-4", "parent:full", "parent:top-4"]
    assert stage_config(spec(growth=None), CLUSTER, "r")["growth"] is None


def test_growth_is_refused_with_distillation() -> None:
    with pytest.raises(ValueError, match="spec.growth: a grown run cannot distil yet"):
        spec(distillation={"enabled": True})


# ---------------------------------------------------------------- partial ensembles while experts train


def test_a_probe_follows_each_expert_that_lands_while_others_train() -> None:
    s = spec(growth=None, clustering={"numClusters": 3, "fineClusters": 16},
             evaluation={"strategies": ["full"], "partial": {"numSamples": 64}})
    assert probe_key(1) not in launched(plan(s, Observed(NOW, {CLUSTER: OK, ROUTER: RUN, expert_key(0): OK})))
    one = {CLUSTER: OK, ROUTER: OK, expert_key(0): OK, expert_key(1): RUN, expert_key(2): RUN}
    assert launched(plan(s, Observed(NOW, one))) == [probe_key(1)]  # the router is needed to route
    busy = {**one, probe_key(1): RUN, expert_key(1): OK}
    assert probe_key(2) not in launched(plan(s, Observed(NOW, busy)))  # one at a time
    two = {**busy, probe_key(1): OK}
    assert launched(plan(s, Observed(NOW, two))) == [probe_key(2)]
    lost = {**one, expert_key(1): StageObservation(State.FAILED, attempts=1, retryable=False)}
    assert launched(plan(s.model_copy(update={"failure_policy": s.failure_policy.model_copy(
        update={"min_experts": 1})}), Observed(NOW, {**lost, probe_key(1): OK}))) == []  # still 1 committed
    finished = {**two, expert_key(2): OK}
    assert launched(plan(s, Observed(NOW, finished))) == [EVALUATE]  # all landed: the full evaluation instead


def test_a_probe_suspended_with_the_run_resumes_with_it() -> None:
    from ddm_operator.planner import Suspend, Unsuspend

    s = spec(growth=None, clustering={"numClusters": 2, "fineClusters": 16},
             evaluation={"strategies": ["full"], "partial": {"numSamples": 64}})
    stages = {CLUSTER: OK, ROUTER: OK, expert_key(0): OK, expert_key(1): RUN, probe_key(1): RUN}
    paused = plan(s.model_copy(update={"suspend": True}), Observed(NOW, stages))
    assert Suspend(probe_key(1)) in paused.actions
    stopped = StageObservation(State.SUSPENDED, attempts=1)
    resumed = plan(s, Observed(NOW, {**stages, probe_key(1): stopped, expert_key(1): stopped}))
    assert Unsuspend(probe_key(1)) in resumed.actions and Unsuspend(expert_key(1)) in resumed.actions


def test_a_failed_probe_never_fails_the_run() -> None:
    s = spec(growth=None, clustering={"numClusters": 2, "fineClusters": 16},
             evaluation={"strategies": ["full"], "partial": {"numSamples": 64}})
    dead = StageObservation(State.FAILED, attempts=5, retryable=False, failed_at=NOW)
    p = plan(s, Observed(NOW, {CLUSTER: OK, ROUTER: OK, expert_key(0): OK, expert_key(1): RUN, probe_key(1): dead}))
    assert p.phase == "Training" and launched(p) == []


def test_probe_keys_and_configs() -> None:
    s = spec(growth=None, clustering={"numClusters": 3, "fineClusters": 16},
             evaluation={"strategies": ["full", "top1"], "numSamples": 1000, "steps": 30,
                         "partial": {"numSamples": 64, "strategy": "top1"}})
    assert parse_key("probe-002") == probe_key(2) and probe_key(2).id == "probe-002"
    assert trainer_command(probe_key(2)) == "evaluate"
    cfg = stage_config(s, probe_key(2), "runs/x")
    assert (cfg["output"], cfg["strategies"], cfg["n_samples"], cfg["reference_n"], cfg["steps"]) == \
        ("partial/002", ["top1"], 64, 64, 30)
    assert "output" not in stage_config(s, EVALUATE, "runs/x")


def test_a_probe_draws_no_prompt_grids() -> None:
    s = DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "/d", "captionField": "txt"}, "clustering": {"numClusters": 2, "fineClusters": 16},
        "experts": {"steps": 100}, "storage": {"uri": "r"}, "textEncoder": {"uri": "/m", "width": 384},
        "evaluation": {"strategies": ["full"], "prompts": ["a bag"], "partial": {"numSamples": 64}}})
    assert stage_config(s, EVALUATE, "r")["prompts"] == ["a bag"]
    assert "prompts" not in stage_config(s, probe_key(1), "r")  # a probe is the lightweight one


def test_a_probe_job_is_labelled_as_no_expert() -> None:
    from ddm_operator.k8s.builders import LABEL_EXPERT, LABEL_STAGE, Owner, child_labels

    owner = Owner(name="d", namespace="ns", uid="u")
    assert child_labels(owner, "probe-002", 1)[LABEL_STAGE] == "probe"
    assert LABEL_EXPERT not in child_labels(owner, "probe-002", 1)
    assert child_labels(owner, "expert-002", 1)[LABEL_EXPERT] == "002"
