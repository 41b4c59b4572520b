"""The pipeline planner: what should happen next, given the spec and what is observed. PURE: no I/O, no clock.

Both executors (the Kubernetes operator and the local runner) observe their children, call ``plan`` and carry out
``Plan.actions``; the same observation always gives the same plan, so re-running a reconcile is harmless.

DAG: cluster -> (expert 0..K-1, the baseline (if enabled) and router, side by side; experts and baseline limited
     by ``spec.parallelism``)
     -> evaluate (router and baseline succeeded, every expert finished or permanently failed, >= minExperts
        succeeded)
     -> distill (if enabled; beside the evaluation)
     -> evaluate-student (if distillation is enabled: the evaluation stage again, once both committed, adding the
        distilled student's row to the same table; the other rows are read back, not sampled) -> done.

Attempts are 1-based launch counts: ``Launch(key, 1)`` starts a stage; after a retryable failure observed with
``attempts=n`` the planner emits ``Retry(key, n + 1, not_before)`` while ``n - 1 < max retries``. The backoff is
``backoffSeconds * 2**(n-1)`` capped at one hour, counted from ``failed_at``. Retries not yet due are listed in
``Plan.waiting`` and ``Plan.requeue_after`` says when to look again.

Phases: Pending (clustering not started) -> Clustering -> Training -> Evaluating -> Distilling -> Succeeded, or
Degraded when it finished with fewer than K experts (the Degraded condition is set as soon as one expert is lost),
Failed (terminal: a stage exhausted its retries or too few experts can still succeed; running children are
cancelled), Suspended (spec.suspend: no launches, running children get Suspend actions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Mapping, Union

from ddm_trainer import layout

from .api.models import (
    Condition,
    DecentralizedDiffusionSpec,
    ExpertStatus,
    Phase,
    RouterStatus,
    StagePhase,
    StagesStatus,
    StageStatus,
)

Stage = Literal["cluster", "expert", "router", "baseline", "probe", "evaluate", "distill", "evaluate-student"]
MAX_BACKOFF_SECONDS = 3600.0


_DAG_ORDER = {"cluster": 0, "router": 1, "expert": 2, "baseline": 3, "probe": 4, "evaluate": 5, "distill": 6,
              "evaluate-student": 7}


@dataclass(frozen=True)
class StageKey:
    stage: Stage
    index: int | None = None  # the expert index; None for every other stage

    @property
    def id(self) -> str:
        """``cluster``, ``expert-003``, ...: the same id the trainer's progress files use."""
        return str(layout.stage_id(self.stage, self.index))

    def __str__(self) -> str:
        return self.id

    def __lt__(self, other: StageKey) -> bool:
        """DAG order (cluster, router, experts by index, baseline, evaluate, distill, evaluate-student): actions come
        out in this order."""
        return (_DAG_ORDER[self.stage], self.index or 0) < (_DAG_ORDER[other.stage], other.index or 0)


CLUSTER = StageKey("cluster")
ROUTER = StageKey("router")
EVALUATE = StageKey("evaluate")
DISTILL = StageKey("distill")
BASELINE = StageKey("baseline")  # the compute-matched monolith: one model of the experts' preset on all the data
STUDENT_EVAL = StageKey("evaluate-student")  # the distilled student's row, added to the committed evaluation table


def expert_key(index: int) -> StageKey:
    return StageKey("expert", index)


def probe_key(experts: int) -> StageKey:
    """The lightweight evaluation of a partial ensemble launched when ``experts`` experts had committed."""
    return StageKey("probe", experts)


class State(str, Enum):
    ABSENT = "absent"  # never launched (or its child was deleted)
    RUNNING = "running"  # launched, not finished (includes pending pods)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUSPENDED = "suspended"


@dataclass(frozen=True)
class StageObservation:
    state: State
    attempts: int = 0  # launches so far (the attempt number of the latest one)
    step: int = 0  # training progress of the latest attempt
    total: int = 0  # its step count where it reported one (0: the spec's; per expert with stepsAllocation proportional)
    retryable: bool = True  # for FAILED: infrastructure (retry) vs bad input (give up); see errors.is_retryable
    failed_at: float | None = None  # for FAILED: when, in the same clock as Observed.now
    message: str = ""
    cluster: str | None = None  # where it runs (targetCluster), for the status
    waiting: bool = False  # RUNNING but held before it may start (a Kueue-queued job not admitted yet): "Pending"


ABSENT = StageObservation(State.ABSENT)


@dataclass(frozen=True)
class ParentObservation:
    """A grown run's parent, as its clustering manifest recorded it (``parent_from_manifest``)."""

    uri: str
    num_clusters: int  # the parent's K: experts 0..K-1 are the parent's, never trained here
    experts: frozenset[int]  # those the parent had committed; the others are lost to the grown run too
    grown: frozenset[int] = frozenset()  # the parent's clusters that received new data (retrain: grown)


def parent_from_manifest(manifest: Mapping[str, object] | None) -> ParentObservation | None:
    """The parent named by a committed clustering manifest (its ``parent`` entry), or None."""
    parent = (manifest or {}).get("parent")
    if not isinstance(parent, dict):
        return None
    return ParentObservation(str(parent["uri"]), int(parent["num_clusters"]),
                             frozenset(int(k) for k in parent["experts"]),
                             frozenset(int(k) for k in (manifest or {}).get("grown") or []))


@dataclass(frozen=True)
class Observed:
    now: float  # seconds, any epoch, the same clock as StageObservation.failed_at
    stages: Mapping[StageKey, StageObservation] = field(default_factory=dict)
    parent: ParentObservation | None = None  # a grown run's parent, once its clustering has committed

    def get(self, key: StageKey) -> StageObservation:
        return self.stages.get(key, ABSENT)


@dataclass(frozen=True)
class Launch:
    key: StageKey
    attempt: int


@dataclass(frozen=True)
class Retry:
    key: StageKey
    attempt: int
    not_before: float


@dataclass(frozen=True)
class Suspend:
    key: StageKey


@dataclass(frozen=True)
class Unsuspend:
    key: StageKey


@dataclass(frozen=True)
class Cancel:
    key: StageKey


Action = Union[Launch, Retry, Suspend, Unsuspend, Cancel]


@dataclass(frozen=True)
class ConditionUpdate:
    """A condition's desired value; the executor stamps lastTransitionTime/observedGeneration when it changes."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Plan:
    actions: list[Action]  # do these now, in order
    phase: Phase
    reason: str
    message: str
    conditions: list[ConditionUpdate]
    experts: list[ExpertStatus]
    experts_ready: int
    experts_total: int
    stages: StagesStatus
    router: RouterStatus
    waiting: list[Retry] = field(default_factory=list)  # retries whose backoff has not expired
    requeue_after: float | None = None  # seconds until the earliest waiting retry is due

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Degraded", "Failed") and not self.actions and not self.waiting

    @property
    def launches(self) -> list[Launch | Retry]:
        return [a for a in self.actions if isinstance(a, (Launch, Retry))]


# ---------------------------------------------------------------- per-stage decisions


@dataclass(frozen=True)
class _Next:
    """What one stage needs: an action now, a retry later, or nothing; and whether it is dead for good."""

    action: Action | None = None
    waiting: Retry | None = None
    dead: bool = False


def backoff_seconds(spec: DecentralizedDiffusionSpec, attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: exponential from backoffSeconds, capped at an hour."""
    base = float(spec.failure_policy.backoff_seconds)
    return min(base * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)


def _next_for(key: StageKey, obs: StageObservation, max_retries: int, spec: DecentralizedDiffusionSpec, now: float) -> _Next:
    """The next step of a stage whose dependencies are met (ignoring parallelism and suspension)."""
    if obs.state is State.ABSENT:
        return _Next(action=Launch(key, max(obs.attempts, 0) + 1))
    if obs.state is State.SUSPENDED:
        return _Next(action=Unsuspend(key))
    if obs.state is State.FAILED:
        attempts = max(obs.attempts, 1)
        if not obs.retryable or attempts - 1 >= max_retries:
            return _Next(dead=True)
        failed_at = obs.failed_at if obs.failed_at is not None else now
        retry = Retry(key, attempts + 1, failed_at + backoff_seconds(spec, attempts))
        return _Next(action=retry) if retry.not_before <= now else _Next(waiting=retry)
    return _Next()  # running or succeeded: never relaunched


def _is_dead(obs: StageObservation, max_retries: int) -> bool:
    return obs.state is State.FAILED and (not obs.retryable or max(obs.attempts, 1) - 1 >= max_retries)


def _stage_phase(obs: StageObservation, dead: bool) -> StagePhase:
    if obs.state is State.FAILED:
        return "Failed" if dead else "Retrying"
    phases: dict[State, StagePhase] = {
        State.ABSENT: "Pending",
        State.RUNNING: "Pending" if obs.waiting else "Running",
        State.SUCCEEDED: "Succeeded",
        State.SUSPENDED: "Suspended",
    }
    return phases[obs.state]


def _stage_status(obs: StageObservation, max_retries: int) -> StageStatus:
    return StageStatus(phase=_stage_phase(obs, _is_dead(obs, max_retries)), attempts=obs.attempts, message=obs.message)


# ---------------------------------------------------------------- the plan


def plan(spec: DecentralizedDiffusionSpec, observed: Observed) -> Plan:
    now = observed.now
    k_total = spec.num_experts
    stage_retries = spec.failure_policy.max_retries_per_stage
    expert_retries = spec.failure_policy.max_retries_per_expert

    cluster = observed.get(CLUSTER)
    router = observed.get(ROUTER)
    evaluate = observed.get(EVALUATE)
    distill = observed.get(DISTILL)
    baseline = observed.get(BASELINE)
    student_eval = observed.get(STUDENT_EVAL)
    experts = [observed.get(expert_key(k)) for k in range(k_total)]
    grown = spec.growth is not None and cluster.state is State.SUCCEEDED
    if grown and observed.parent is not None:
        # the parent's experts are used by reference, unless retrain: grown trains those whose cluster grew again
        retrained = observed.parent.grown if spec.growth is not None and spec.growth.retrain == "grown" \
            else frozenset()
        experts = [_inherited(k, observed.parent) if k < observed.parent.num_clusters and k not in retrained else o
                   for k, o in enumerate(experts)]

    succeeded = [k for k, o in enumerate(experts) if o.state is State.SUCCEEDED]
    dead = [k for k, o in enumerate(experts) if _is_dead(o, expert_retries)]
    min_experts = spec.min_experts

    expert_status = [
        ExpertStatus(
            index=k,
            phase=_stage_phase(o, k in dead),
            step=(o.total or spec.experts.steps) if o.state is State.SUCCEEDED else o.step,
            total_steps=o.total or spec.experts.steps,
            retries=max(o.attempts - 1, 0),
            cluster=o.cluster,
            message=o.message,
        )
        for k, o in enumerate(experts)
    ]
    stages = StagesStatus(
        clustering=_stage_status(cluster, stage_retries),
        router=_stage_status(router, stage_retries),
        evaluation=_stage_status(evaluate, stage_retries),
        distillation=_stage_status(distill, stage_retries) if spec.distill_enabled else None,
        baseline=_stage_status(baseline, stage_retries) if spec.baseline_enabled else None,
        student_evaluation=_stage_status(student_eval, stage_retries) if spec.distill_enabled else None,
    )
    router_status = RouterStatus(
        phase=_stage_phase(router, _is_dead(router, stage_retries)),
        step=spec.router.steps if router.state is State.SUCCEEDED else router.step,
        total_steps=spec.router.steps,
    )

    def finish(phase: Phase, reason: str, message: str, actions: list[Action], waiting: list[Retry]) -> Plan:
        return _assemble(spec, phase, reason, message, actions, waiting, now, expert_status, len(succeeded), dead,
                         stages, router_status)

    # ---- terminal failures: cancel whatever still runs
    in_dag_order = sorted(observed.stages.items(), key=lambda kv: kv[0])
    failure = _failure(spec, cluster, router, evaluate, distill, stage_retries, k_total, len(dead), min_experts,
                       baseline, student_eval)
    if failure is not None:
        reason, message = failure
        cancels: list[Action] = [Cancel(key) for key, o in in_dag_order if o.state in (State.RUNNING, State.SUSPENDED)]
        return finish("Failed", reason, message, cancels, [])

    # ---- suspension: stop everything that runs, launch nothing
    if spec.suspend:
        suspends: list[Action] = [Suspend(key) for key, o in in_dag_order if o.state is State.RUNNING]
        return finish("Suspended", "Suspended", "spec.suspend is true: no new stages start", suspends, [])

    actions: list[Action] = []
    waiting: list[Retry] = []

    def take(nxt: _Next) -> None:
        if nxt.action is not None:
            actions.append(nxt.action)
        if nxt.waiting is not None:
            waiting.append(nxt.waiting)

    # ---- clustering
    if cluster.state is not State.SUCCEEDED:
        take(_next_for(CLUSTER, cluster, stage_retries, spec, now))
        if cluster.state is State.ABSENT:
            return finish("Pending", "Starting", "launching clustering", actions, waiting)
        return finish("Clustering", "Clustering", _describe("clustering", cluster), actions, waiting)

    if grown and observed.parent is None:  # which experts are the parent's is not known yet (store unreadable)
        return finish("Training", "WaitingForParent",
                      "waiting to read the parent run recorded by the committed clustering (spec.growth)", actions,
                      waiting)

    # ---- experts, the baseline and the router, side by side (the baseline takes a parallelism slot like an expert)
    take(_next_for(ROUTER, router, stage_retries, spec, now))
    if spec.evaluation.partial is not None and router.state is State.SUCCEEDED \
            and len(succeeded) + len(dead) < k_total:  # before the experts: a runner with few slots shows it first
        take(_next_probe(spec, observed, len(succeeded), stage_retries, now))
    trainees = [*experts, baseline] if spec.baseline_enabled else experts
    busy = sum(1 for o in trainees if o.state in (State.RUNNING, State.SUSPENDED))
    slots = (spec.parallelism - busy) if spec.parallelism is not None else len(trainees)
    # Suspended experts resume first: they already hold progress and count as busy.
    for k, o in enumerate(experts):
        if o.state is State.SUSPENDED:
            actions.append(Unsuspend(expert_key(k)))
    if spec.baseline_enabled and baseline.state is State.SUSPENDED:
        actions.append(Unsuspend(BASELINE))
    for k, o in enumerate(experts):
        if o.state in (State.RUNNING, State.SUCCEEDED, State.SUSPENDED) or k in dead:
            continue
        nxt = _next_for(expert_key(k), o, expert_retries, spec, now)
        if nxt.action is not None:
            if slots <= 0:
                continue  # over spec.parallelism: launched on a later reconcile, when a slot frees
            slots -= 1
        take(nxt)

    if spec.baseline_enabled and baseline.state not in (State.RUNNING, State.SUCCEEDED, State.SUSPENDED):
        nxt = _next_for(BASELINE, baseline, stage_retries, spec, now)
        if nxt.action is None or slots > 0:  # launched after the experts, in a slot of spec.parallelism
            take(nxt)

    experts_finished = len(succeeded) + len(dead) == k_total
    baseline_done = not spec.baseline_enabled or baseline.state is State.SUCCEEDED
    if not (experts_finished and router.state is State.SUCCEEDED and baseline_done):
        message = f"{len(succeeded)}/{k_total} experts ready, router {router.state.value}"
        if spec.baseline_enabled:
            message += f", baseline {baseline.state.value}"
        return finish("Training", "Training", message, actions, waiting)

    # ---- evaluation and distillation, side by side (router done, every expert finished, enough succeeded:
    # _failure ruled out too few). The student learns from the experts and router, not from the evaluation, so it
    # need not wait for the FID table: on one GPU the two overlap, on a fleet they run on two nodes at once.
    distilling = spec.distill_enabled and distill.state is not State.SUCCEEDED
    if evaluate.state is not State.SUCCEEDED:
        take(_next_for(EVALUATE, evaluate, stage_retries, spec, now))
        if distilling:
            take(_next_for(DISTILL, distill, stage_retries, spec, now))
        message = _describe("evaluation", evaluate) + (f", {_describe('distillation', distill)}" if distilling else "")
        return finish("Evaluating", "Evaluating", message, actions, waiting)
    if distilling:
        take(_next_for(DISTILL, distill, stage_retries, spec, now))
        return finish("Distilling", "Distilling", _describe("distillation", distill), actions, waiting)
    # ---- the student's row: both committed, so the table it joins is final and its weights exist. The evaluation
    # stage runs again with one more row; the committed rows are read back, only the student is sampled.
    if spec.distill_enabled and student_eval.state is not State.SUCCEEDED:
        take(_next_for(STUDENT_EVAL, student_eval, stage_retries, spec, now))
        return finish("Evaluating", "EvaluatingStudent", _describe("the student's evaluation", student_eval), actions,
                      waiting)

    if dead:
        return finish("Degraded", "FinishedDegraded",
                      f"finished with {len(succeeded)}/{k_total} experts (lost: {dead})", actions, waiting)
    return finish("Succeeded", "Succeeded", f"finished with {k_total}/{k_total} experts", actions, waiting)


def _inherited(k: int, parent: ParentObservation) -> StageObservation:
    """Expert k of a grown run that belongs to its parent: committed there (used by reference), or lost there."""
    if k in parent.experts:
        return StageObservation(State.SUCCEEDED, message=f"the parent's, by reference: {parent.uri}")
    return StageObservation(State.FAILED, attempts=1, retryable=False,
                            message=f"not committed in the parent run {parent.uri}; a grown run trains only new experts")


def _next_probe(spec: DecentralizedDiffusionSpec, observed: Observed, ready: int, max_retries: int,
                now: float) -> _Next:
    """The partial ensemble's lightweight evaluation: one for each count of committed experts, the latest only,
    one at a time (a probe that failed for good is given up: it is advice, the run goes on)."""
    probes = {k: o for k, o in observed.stages.items() if k.stage == "probe"}
    suspended = [k for k, o in probes.items() if o.state is State.SUSPENDED]
    if suspended:  # spec.suspend was lifted: it goes on before any other starts
        return _Next(action=Unsuspend(max(suspended)))
    if ready == 0 or any(o.state is State.RUNNING for o in probes.values()):
        return _Next()
    key = probe_key(ready)
    obs = observed.get(key)
    if obs.state is State.SUCCEEDED:
        return _Next()
    return _next_for(key, obs, max_retries, spec, now)


def _describe(what: str, obs: StageObservation) -> str:
    if obs.state is State.FAILED:
        return f"{what} attempt {obs.attempts} failed, retrying: {obs.message}".rstrip(": ")
    return f"{what} {obs.state.value}" + (f" (attempt {obs.attempts})" if obs.attempts > 1 else "")


def _failure(
    spec: DecentralizedDiffusionSpec,
    cluster: StageObservation,
    router: StageObservation,
    evaluate: StageObservation,
    distill: StageObservation,
    stage_retries: int,
    k_total: int,
    n_dead: int,
    min_experts: int,
    baseline: StageObservation = ABSENT,
    student_eval: StageObservation = ABSENT,
) -> tuple[str, str] | None:
    """(reason, message) when the run can no longer succeed."""
    for name, reason, obs in (
        ("clustering", "ClusteringFailed", cluster),
        ("router", "RouterFailed", router),
        ("baseline", "BaselineFailed", baseline),
        ("evaluation", "EvaluationFailed", evaluate),
        ("distillation", "DistillationFailed", distill),
        ("the student's evaluation", "StudentEvaluationFailed", student_eval),
    ):
        if (name in ("distillation", "the student's evaluation") and not spec.distill_enabled) \
                or (name == "baseline" and not spec.baseline_enabled):
            continue
        if _is_dead(obs, stage_retries):
            why = "permanent error" if not obs.retryable else f"retries exhausted ({obs.attempts} attempts)"
            return reason, f"{name} failed: {why}" + (f": {obs.message}" if obs.message else "")
    if k_total - n_dead < min_experts:
        return ("TooFewExperts",
                f"{n_dead}/{k_total} experts failed permanently; at most {k_total - n_dead} can succeed "
                f"but spec.failurePolicy.minExperts is {min_experts}")
    return None


def _assemble(
    spec: DecentralizedDiffusionSpec,
    phase: Phase,
    reason: str,
    message: str,
    actions: list[Action],
    waiting: list[Retry],
    now: float,
    expert_status: list[ExpertStatus],
    n_ready: int,
    dead: list[int],
    stages: StagesStatus,
    router_status: RouterStatus,
) -> Plan:
    done = phase in ("Succeeded", "Degraded")
    conditions = [
        ConditionUpdate("Ready", "True" if done else "False", reason, message),
        ConditionUpdate("Progressing", "True" if phase not in ("Succeeded", "Degraded", "Failed", "Suspended") else "False",
                        reason, message),
        ConditionUpdate("Degraded", "True" if dead else "False", "ExpertsLost" if dead else "AllExpertsHealthy",
                        f"experts failed permanently: {dead}" if dead else ""),
        ConditionUpdate("Suspended", "True" if phase == "Suspended" else "False",
                        "Suspended" if phase == "Suspended" else "Running"),
        ConditionUpdate("Failed", "True" if phase == "Failed" else "False", reason if phase == "Failed" else "NoFailure",
                        message if phase == "Failed" else ""),
    ]
    requeue = min((r.not_before - now for r in waiting), default=None)
    return Plan(
        actions=actions,
        phase=phase,
        reason=reason,
        message=message,
        conditions=conditions,
        experts=expert_status,
        experts_ready=n_ready,
        experts_total=spec.num_experts,
        stages=stages,
        router=router_status,
        waiting=waiting,
        requeue_after=max(requeue, 0.0) if requeue is not None else None,
    )


def merge_conditions(
    old: list[Condition], updates: list[ConditionUpdate], now_rfc3339: str, generation: int | None
) -> list[Condition]:
    """Apply condition updates; lastTransitionTime changes only when a condition's status changes."""
    by_type = {c.type: c for c in old}
    merged = []
    for u in updates:
        prev = by_type.pop(u.type, None)
        changed = prev is None or prev.status != u.status
        merged.append(Condition(
            type=u.type, status=u.status, reason=u.reason, message=u.message[:4096],
            last_transition_time=now_rfc3339 if changed or prev is None else prev.last_transition_time,
            observed_generation=generation,
        ))
    return merged + list(by_type.values())
