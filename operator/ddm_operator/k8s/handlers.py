"""kopf handlers: read the DDM and its children, call the planner, carry out its actions, patch status.

Run: ``kopf run --standalone -m ddm_operator.k8s.handlers --namespace NS`` (or ``ddm-operator``).

Level-triggered: every reconcile recomputes everything from the spec and the observed PyTorchJobs, so a missed
event or a killed operator costs nothing. Event-driven: each DDM that is not finished has one async daemon
(``reconciler``) that runs a pass, then sleeps until it is woken or a deadline passes. It is woken by a change of
the DDM's spec and by a change of the phase of any of its PyTorchJobs, in this cluster or a member cluster (one
list+watch thread per cluster in use, remote_watch.py; the parent is found by the ``ddm.io/uid`` label every child
carries). A pass costs few requests: its children are read from those watches' in-memory index, the DDM from
kopf's watch of DDMs (or the answer to our own last status write), the member's kubeconfig Secret from a cache;
what remains is what it writes. Deadlines: a retry's backoff expiring, a
stage live in another cluster whose watch is down (polled every DDM_REMOTE_INTERVAL_S until it is back), else a
safety net (DDM_RECONCILE_INTERVAL_S). A Succeeded, Degraded or Failed DDM whose spec was handled has no daemon at all: nothing
polls it until its spec changes. Children have deterministic names; creating one that exists (409) adopts it, so a
re-run never duplicates.

Backend (operator setting DDM_JOB_BACKEND, the chart's ``jobBackend``): ``pytorchjob`` (Kubeflow training operator
v1, the default) or ``trainjob`` (Kubeflow Trainer v2: a TrainingRuntime + TrainJob per stage attempt). The same
planner drives both; only the child objects and how their state is read differ (builders.py, observe.py). A
setting of the operator, not of a DDM: which controller a cluster runs is the installer's choice, and the one watch
on children must name one kind. Change it only when no DDM is running (children of the other kind are not seen).
"""
from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import datetime
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from urllib3.exceptions import HTTPError as ApiTransportError

from ddm_trainer import layout
from ddm_trainer.errors import DDMError, MissingArtifactError

from .. import planner as pl
from .. import stages
from ..comparison import STUDENT, best_fid, compare, compare_student
from ..partial import latest_partial
from ..api.models import (
    GROUP,
    PLURAL,
    VERSION,
    DecentralizedDiffusionSpec,
    DecentralizedDiffusionStatus,
    PartialEnsembleStatus,
    Placement,
    Results,
    StrategyResult,
)
from . import builders as b
from . import kueue
from .admission import check_trainer_image
from .core_api import CoreApi
from .multicluster import ClusterClients
from .observe import JobState, exit_code_of_events, exit_code_of_pods, has_failed, job_state, latest_attempts
from .observe import parse_time as observe_time
from .remote_watch import RemoteWatches
from .storage import StoreClients, check_storage

INTERVAL_S = float(os.environ.get("DDM_RECONCILE_INTERVAL_S", "30"))  # safety net: events wake a DDM at once
REMOTE_INTERVAL_S = float(os.environ.get("DDM_REMOTE_INTERVAL_S", "5"))  # a member cluster whose watch is down
WAKE_ON_CHILDREN = os.environ.get("DDM_WAKE_ON_CHILDREN", "1") != "0"  # 0: timer only (for benchmarks)
BACKEND = b.backend_named(os.environ.get("DDM_JOB_BACKEND", b.PYTORCHJOB.name))  # PyTorchJob or TrainJob children
# Every request to another cluster has a deadline: a member whose API server stops answering (a firewall dropping
# packets, a half-dead load balancer) must not hold a pass, or the deletion of a DDM, for ever.
REMOTE_REQUEST_TIMEOUT_S = float(os.environ.get("DDM_REMOTE_REQUEST_TIMEOUT_S", "10"))
ERROR_BACKOFF_S = 10.0
MAX_WORKERS = int(os.environ.get("DDM_MAX_WORKERS", "8"))  # passes at once (each mostly waits on API requests)
TERMINAL_PHASES = ("Succeeded", "Degraded", "Failed")
# Creates (a stage's job, after its ConfigMap for a config too large for the job) of every pass share one bounded
# pool: a pass that launches K experts + router sends all of them at once (one request deep, not ceil(9 / 4)), and
# the operator as a whole never has more than this many creates in flight, however many passes launch together.
LAUNCH_THREADS = int(os.environ.get("DDM_LAUNCH_THREADS", "32"))
CONFIG_PATH = f"{b.CONFIG_DIR}/{b.CONFIG_FILE}"
log = logging.getLogger("ddm_operator")

_clusters = ClusterClients()
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
_stores = StoreClients()
_parents: dict[str, pl.ParentObservation] = {}  # DDM uid -> its parent, once its clustering has committed


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


# ---------------------------------------------------------------- API access (thin wrappers)


POOL_SIZE = 64  # connections kept per cluster: LAUNCH_THREADS creates, MAX_WORKERS passes, and the watches
_own: list[Any] = []  # the one ApiClient of the operator's own cluster
_launcher: list[ThreadPoolExecutor] = []  # the one pool of creates, shared by every pass


def launcher() -> ThreadPoolExecutor:
    if not _launcher:
        with _locks_guard:
            if not _launcher:
                _launcher.append(ThreadPoolExecutor(max_workers=LAUNCH_THREADS, thread_name_prefix="ddm-launch"))
    return _launcher[0]


def own_client() -> Any:
    """One ApiClient for the operator's own cluster, shared by every pass and watch: ``CustomObjectsApi()`` without
    one makes a new ApiClient, hence a new connection pool and a TLS handshake, at every call."""
    if not _own:
        with _locks_guard:
            if not _own:
                configuration = k8s.Configuration.get_default_copy()
                configuration.connection_pool_maxsize = POOL_SIZE
                _own.append(k8s.ApiClient(configuration))
    return _own[0]


def _custom(api_client: Any = None) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api_client or own_client())


def _core(api_client: Any = None) -> CoreApi:
    return CoreApi(api_client or own_client())


def _create_or_adopt(create: Any, read: Any) -> dict[str, Any]:
    """Create; on 409 Conflict read the existing object: running a handler twice creates nothing twice."""
    try:
        out = create()
    except k8s.ApiException as exc:
        if exc.status != 409:
            raise
        out = read()
    return out


def _client_for(namespace: str, cluster: str | None) -> Any:
    return own_client() if cluster is None else _clusters.get(_core(), namespace, cluster)


def _deadline(cluster: str | None) -> dict[str, Any]:
    """Keyword arguments of a request to ``cluster``: a timeout for another cluster, none for our own."""
    return {} if cluster is None else {"_request_timeout": REMOTE_REQUEST_TIMEOUT_S}


def _list_jobs(namespace: str, uid: str, cluster: str | None) -> list[JobState]:
    selector = f"{b.LABEL_UID}={uid}"
    api_client = _client_for(namespace, cluster)
    items = _remote.jobs(namespace, cluster, uid, api_client)  # the watch's index, when it can be trusted
    if items is None:  # its watch is not connected, or has not listed since it broke: ask the API server
        items = _custom(api_client).list_namespaced_custom_object(
            BACKEND.group, BACKEND.version, namespace, BACKEND.plural, label_selector=selector,
            **_deadline(cluster))["items"]
    states = []
    for job in items:
        pods = _pods_of(api_client, namespace, job, **_deadline(cluster)) if has_failed(job) else None
        if (state := job_state(job, cluster, pods)) is not None:
            states.append(state)
    waiting = [s.uid for s in states if s.queued and s.phase not in ("Succeeded", "Failed")]
    if waiting:  # a queued job paused by spec.suspend is paused through its Workload (k8s/kueue.py): read it there
        inactive = kueue.inactive_jobs(_custom(api_client), namespace, waiting, **_deadline(cluster))
        states = [dataclasses.replace(s, phase="Suspended") if s.uid in inactive else s for s in states]
    return states


def _pods_of(api_client: Any, namespace: str, job: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    """A failed job's pods, where its exit codes are (the training operator keeps them: cleanPodPolicy None; a
    failed JobSet's Jobs and their pods stay until the TrainJob is deleted)."""
    selector = f"{BACKEND.pod_job_label}={job['metadata']['name']}"
    return _core(api_client).list_namespaced_pod(namespace, label_selector=selector, **kw).get("items") or []


def _placements(spec: DecentralizedDiffusionSpec) -> list[Placement]:
    placements = [spec.experts.placement_for(k) for k in range(spec.num_experts)]
    placements += [spec.router.placement, spec.evaluation.placement]
    if spec.distillation is not None:
        placements.append(spec.distillation.placement)
    if spec.baseline is not None:
        placements.append(spec.baseline.placement or spec.experts.placement)
    return placements


def workers_of(spec: DecentralizedDiffusionSpec) -> set[str]:
    """The kubeconfig Secrets of every MultiKueue worker a stage names (placement.multiKueueWorkers): the operator
    puts a too-large stage config's ConfigMap there and reads exit codes there, never lists jobs there (Kueue mirrors
    their status)."""
    return {secret for p in _placements(spec) for secret in (p.multi_kueue_workers or {}).values()}


def clusters_of(spec: DecentralizedDiffusionSpec) -> set[str | None]:
    """Every cluster a stage of this DDM runs in (None: the operator's own), from every stage's placement."""
    return {None} | {p.target_cluster for p in _placements(spec)}


# ---------------------------------------------------------------- spec -> children


def _placement_of(spec: DecentralizedDiffusionSpec, key: pl.StageKey) -> tuple[Placement, int]:
    """(placement, gpus per node) of a stage. Clustering runs with the experts' default placement."""
    if key.stage == "expert":
        return spec.experts.placement_for(key.index or 0), spec.experts.gpus_per_node
    if key.stage == "router":
        return spec.router.placement, spec.router.gpus_per_node
    # a probe: the partial ensemble's lightweight evaluation; evaluate-student: the student's row added
    if key.stage in ("evaluate", "probe", "evaluate-student"):
        return spec.evaluation.placement, spec.evaluation.gpus_per_node
    if key.stage == "distill" and spec.distillation is not None:
        return spec.distillation.placement, 1
    if key.stage == "baseline" and spec.baseline is not None and spec.baseline.placement is not None:
        return spec.baseline.placement, spec.experts.gpus_per_node
    return spec.experts.placement, spec.experts.gpus_per_node


def job_request(spec: DecentralizedDiffusionSpec, owner: b.Owner, key: pl.StageKey, attempt: int) -> b.JobRequest:
    """The job (PyTorchJob or TrainJob) inputs of one stage attempt, its config included (pure)."""
    placement_model, gpus = _placement_of(spec, key)
    placement = b.placement_from_dict(placement_model.to_wire())
    resources = dict(placement.resources)
    limits = dict(resources.get("limits") or {})
    if gpus > 0 and "nvidia.com/gpu" not in limits:
        limits["nvidia.com/gpu"] = gpus
        resources["limits"] = limits
    placement = b.Placement(**{**placement.__dict__, "resources": resources})
    nodes, _ = stages.world_size(spec, key)
    run = stages.run_uri(spec, owner.namespace, owner.name)
    return b.JobRequest(
        owner=owner, key=key.id, attempt=attempt, image=spec.trainer_image,
        command=stages.stage_command(spec, key, CONFIG_PATH), config=stages.stage_config(spec, key, run),
        nodes=nodes, placement=placement, credentials_secret=spec.storage.credentials_secret,
        volume_claim=spec.storage.volume_claim,
        termination_grace_period_seconds=stages.grace_period_seconds(spec, key),
    )


def _launch(req: b.JobRequest) -> None:
    api_client = _client_for(req.owner.namespace, req.placement.target_cluster)
    ns, name, kw = req.owner.namespace, req.name, _deadline(req.placement.target_cluster)
    custom = _custom(api_client)
    if not b.config_in_job(req):  # the job mounts it: it exists first (here and in every MultiKueue worker)
        core, cm = _core(api_client), b.build_configmap(req)
        _create_or_adopt(lambda: core.create_namespaced_config_map(ns, cm, **kw),
                         lambda: core.read_namespaced_config_map(name, ns, **kw))
        for worker, secret in sorted(req.placement.multi_kueue_workers.items()):
            _put_config_in_worker(req, worker, secret)
    for obj in b.build_job(req, BACKEND):  # a TrainingRuntime before the TrainJob that names it
        made = _create_or_adopt_custom(custom, ns, obj, kw)
        if obj["kind"] == BACKEND.kind:  # the next pass sees it even before the watch delivers it
            _remote.record(ns, req.placement.target_cluster, made)


def _create_or_adopt_custom(custom: k8s.CustomObjectsApi, namespace: str, obj: dict[str, Any],
                            kw: dict[str, Any]) -> dict[str, Any]:
    group, version = obj["apiVersion"].split("/")
    plural = b.TRAININGRUNTIME_PLURAL if obj["kind"] == "TrainingRuntime" else BACKEND.plural
    name = obj["metadata"]["name"]
    return _create_or_adopt(lambda: custom.create_namespaced_custom_object(group, version, namespace, plural, obj, **kw),
                     lambda: custom.get_namespaced_custom_object(group, version, namespace, plural, name, **kw))


def _put_config_in_worker(req: b.JobRequest, worker: str, secret: str) -> None:
    """MultiKueue copies the job alone to the worker it picks (kueue pkg/controller/jobs/kubeflow/kubeflowjob/
    kubeflowjob_multikueue_adapter.go SyncJob); when its pods mount a ConfigMap (a config too large for the job),
    each worker the placement names gets one (no owner reference there: the deletion finalizer removes it). Best
    effort: a worker that cannot be reached now is logged; kubelet keeps retrying the mount should the job land
    there."""
    ns, kw = req.owner.namespace, _deadline(secret)
    remote = dataclasses.replace(req, placement=dataclasses.replace(req.placement, target_cluster=secret))
    try:
        core = _core(_client_for(ns, secret))
        _create_or_adopt(lambda: core.create_namespaced_config_map(ns, b.build_configmap(remote), **kw),
                         lambda: core.read_namespaced_config_map(req.name, ns, **kw))
    except Exception as exc:  # noqa: BLE001 (any failure to reach the worker: logged, the launch goes on)
        log.warning("ConfigMap %s/%s not put in MultiKueue worker %s (Secret %s): %s", ns, req.name, worker, secret,
                    _why(exc))


def _worker_exit_code(spec: DecentralizedDiffusionSpec, namespace: str, key: pl.StageKey, job: JobState
                      ) -> int | None:
    """The exit code of a failed job that MultiKueue ran in a worker (no pods here): read in the worker its Workload
    names (status.clusterName), with the kubeconfig Secret placement.multiKueueWorkers gives for it; its pods if
    they are still there, else the training operator's ExitedWithCode Events, which outlive them. None when the
    worker is not named or cannot be read (the failure then counts as retryable)."""
    workers = _placement_of(spec, key)[0].multi_kueue_workers or {}
    if not workers or not job.queued or not job.uid:
        return None
    try:
        worker = kueue.worker_of(_custom(_client_for(namespace, job.cluster)), namespace, job.uid,
                                 **_deadline(job.cluster))
        if worker is None or worker not in workers:
            return None
        api_client, kw = _client_for(namespace, workers[worker]), _deadline(workers[worker])
        pods = _pods_of(api_client, namespace, {"metadata": {"name": job.name}}, **kw)
        code, source = exit_code_of_pods(pods, BACKEND.container), "pods"
        if code is None:
            events = _core(api_client).list_namespaced_event(
                namespace, field_selector=f"involvedObject.name={job.name},reason=ExitedWithCode", **kw)
            code, source = exit_code_of_events(events.get("items") or []), "Events"
        log.info("exit code %s of %s read from its %s in MultiKueue worker %s", code, job.name, source, worker)
        return code
    except Exception as exc:  # noqa: BLE001 (worker unreachable, Secret missing: no code, the failure is retryable)
        log.warning("exit code of %s in MultiKueue worker not read: %s", job.name, _why(exc))
        return None


def _set_suspend(namespace: str, job: JobState, suspend: bool) -> None:
    if job.queued:  # Kueue admits, suspends and evicts it; writing the field would bypass its quota
        patched = kueue.set_active(_custom(_client_for(namespace, job.cluster)), namespace, job.uid, not suspend,
                                   **_deadline(job.cluster))
        log.info("%s is on a Kueue queue: suspend=%s through its Workload's spec.active (%d patched)", job.name,
                 suspend, patched)
        return
    _custom(_client_for(namespace, job.cluster)).patch_namespaced_custom_object(
        BACKEND.group, BACKEND.version, namespace, BACKEND.plural, job.name, b.suspend_patch(suspend, BACKEND))


# ---------------------------------------------------------------- observation


def _progress_report(spec: DecentralizedDiffusionSpec, namespace: str, name: str, key: str) -> dict[str, Any]:
    """The latest progress event of a running stage, ``<run>/progress/<key>.json``: step, total, images_per_s,
    last_checkpoint, time (advisory: empty when unreadable)."""
    try:
        report = _run_store(spec, namespace, name).get_json(f"progress/{key}.json")
        return report if isinstance(report, dict) else {}
    except Exception as exc:  # no report yet, store unreachable from the operator, ...: progress is advisory
        _store_failed(spec, namespace, name, exc)
        return {}


def _router_facts(spec: DecentralizedDiffusionSpec, namespace: str, name: str, unread: list[str] | None = None,
                  ) -> tuple[float | None, str | None]:
    """(held-out accuracy averaged over t, URI) of the committed router (None, None when unreadable; why, when the
    store did not answer, appended to ``unread``)."""
    try:
        store = _run_store(spec, namespace, name)
        bins = store.get_json(f"{layout.ROUTER}/eval/accuracy.json").get("bins") or []
        accuracy = round(sum(b["accuracy"] for b in bins) / len(bins), 4) if bins else None
        return accuracy, store.url(layout.final(layout.ROUTER))
    except Exception as exc:  # store unreachable, or a router committed without its evaluation: stays empty
        _store_failed(spec, namespace, name, exc)
        _unreadable(exc, "the router's accuracy", unread)
        return None, None


RESULTS_READ = "ResultsRead"  # condition: False while a committed result could not be read (the store did not answer)


def _unreadable(exc: Exception, what: str, unread: list[str] | None) -> None:
    """A read of a committed result failed for another reason than the object being absent (not committed yet)."""
    if unread is not None and not isinstance(exc, MissingArtifactError):
        unread.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


STORE_RETRY_S = float(os.environ.get("DDM_STORE_RETRY_S", "30"))
_store_down: dict[str, tuple[float, Any]] = {}  # run URI -> (monotonic time, client) before which it is not read


class StoreResting(Exception):
    """The run's store failed lately: the operator's advisory reads skip it until DDM_STORE_RETRY_S have passed."""


def _run_store(spec: DecentralizedDiffusionSpec, namespace: str, name: str) -> Any:
    """The run's store, with the same credentials Secret the stage pods get (never the operator's own), re-read
    when the Secret changes (storage.StoreClients). StoreResting while that client rests after a failure (a client
    rebuilt from a changed Secret does not rest)."""
    run = stages.run_uri(spec, namespace, name)
    store = _stores.get(_core(), spec, namespace, name)
    until, client = _store_down.get(run, (0.0, None))
    if client is store and time.monotonic() < until:
        raise StoreResting(f"{run}: not read for {STORE_RETRY_S:g} s after a failure")
    # a new client (rotated keys) starts without the old one's rest, and keeps that on its second read too
    _store_down[run] = (until if client is store else 0.0, store)
    return store


def _store_failed(spec: DecentralizedDiffusionSpec, namespace: str, name: str, exc: Exception) -> None:
    """After a read that failed because the store did not answer, the run's store rests: such a read can cost
    seconds (storage.operator_http_client: a 3 s connect timeout, one retry), and every pass of the DDM, which reads
    the progress of each running stage, would wait on it. A missing object, or an answer such as AccessDenied (keys
    being rotated), costs one quick request and rests nothing."""
    from minio.error import S3Error

    if isinstance(exc, (MissingArtifactError, StoreResting)) or isinstance(exc.__cause__, S3Error):
        return
    run = stages.run_uri(spec, namespace, name)
    if run in _store_down:  # the client that failed (set by _run_store before the read)
        _store_down[run] = (time.monotonic() + STORE_RETRY_S, _store_down[run][1])


def _results(spec: DecentralizedDiffusionSpec, namespace: str, name: str, unread: list[str] | None = None,
             ) -> Results | None:
    """The committed evaluation table as status results (None until the evaluation's manifest is readable; why, when
    the store did not answer, appended to ``unread``)."""
    try:
        store = _run_store(spec, namespace, name)
        manifest = store.read_manifest(layout.EVALUATION)
    except Exception as exc:  # store unreachable from the operator: results stay empty, the run is unaffected
        _store_failed(spec, namespace, name, exc)
        _unreadable(exc, "the evaluation table", unread)
        return None
    if manifest is None:
        return None
    rows = [StrategyResult(strategy=r["strategy"], fid=r["fid"], kid=r.get("kid_mean"), num_samples=r.get("n"),
                           nfe=r.get("nfe"), gflops_per_sample=r.get("gflops_per_sample"))
            for r in manifest.get("table", []) if r.get("fid") is not None]
    artifacts = {f"expert-{k:03d}": store.url(layout.final(layout.expert(k))) for k in range(spec.num_experts)}
    artifacts["router"] = store.url(layout.final(layout.ROUTER))
    artifacts["evaluation"] = store.url(f"{layout.EVALUATION}/results.json")
    if spec.distill_enabled:
        artifacts["student"] = store.url(layout.final(layout.DISTILLATION))
    if spec.baseline_enabled:
        artifacts["baseline"] = store.url(layout.final(layout.MONOLITH))
    parent = manifest.get("parent")
    if parent:  # a grown run: its parent's experts are where the parent committed them
        for k in parent.get("experts") or []:
            artifacts[f"expert-{k:03d}"] = f"{parent['uri'].rstrip('/')}/{layout.final(layout.expert(k))}"
    vs = compare((r.strategy, r.fid) for r in rows)
    student = compare_student((r.strategy, r.fid) for r in rows)
    return Results(fid=rows, artifacts=artifacts, best_vs_monolith=round(vs.ratio, 4) if vs else None,
                   student_vs_monolith=round(student.ratio, 4) if student else None,
                   experts=manifest.get("experts"), missing_experts=manifest.get("missing_experts"),
                   parent_uri=parent.get("uri") if parent else None)


def _table_to_read(latest: dict[str, JobState], old: DecentralizedDiffusionStatus) -> bool:
    """Whether the committed evaluation table is read on this pass: once the evaluation succeeded, and once more
    when the student's evaluation succeeded (it commits the table again with the student's row); a committed table
    does not change otherwise."""
    have = {r.strategy for r in old.results.fid} if old.results else set()
    done = {key for key in (pl.EVALUATE.id, pl.STUDENT_EVAL.id) if key in latest and latest[key].phase == "Succeeded"}
    return (pl.EVALUATE.id in done and not have) or (pl.STUDENT_EVAL.id in done and STUDENT not in have)


def _parent(spec: DecentralizedDiffusionSpec, namespace: str, name: str, uid: str) -> pl.ParentObservation | None:
    """A grown run's parent as its committed clustering recorded it; read once (a committed clustering does not
    change), None while the store is unreadable (the planner then waits)."""
    if uid not in _parents:
        try:
            found = pl.parent_from_manifest(_run_store(spec, namespace, name).read_manifest(layout.CLUSTERING))
        except Exception:  # store unreachable from the operator: try again on the next pass
            return None
        if found is None:
            return None
        _parents[uid] = found
    return _parents[uid]


def _partial(spec: DecentralizedDiffusionSpec, namespace: str, name: str) -> PartialEnsembleStatus | None:
    """The latest committed lightweight evaluation of the partial ensemble (None when unreadable)."""
    try:
        return latest_partial(_run_store(spec, namespace, name))
    except Exception:  # advisory, like progress
        return None


WAITING_FOR_ADMISSION = "waiting for admission by Kueue"


def _just_launched(spec: DecentralizedDiffusionSpec, key: pl.StageKey, job: JobState) -> pl.StageObservation:
    """A stage created in this pass: running, or, on a Kueue queue, held until admitted (Kueue's webhook suspends
    every new job with a queue label: sigs.k8s.io/kueue pkg/controller/jobframework/defaults.go)."""
    queued = bool(b.placement_from_dict(_placement_of(spec, key)[0].to_wire()).queue_name)
    return pl.StageObservation(pl.State.RUNNING, attempts=job.attempt, cluster=job.cluster, waiting=queued,
                               message=WAITING_FOR_ADMISSION if queued else "")


class ClusterUnreachable(Exception):
    """A member cluster did not answer (refused, timed out) or refused our credentials (401, 403) while its jobs
    were read or created. ``reason``: the condition's reason, Unauthorized or Forbidden for an answer that names
    the credentials (expired, revoked, not allowed), else Unreachable."""

    def __init__(self, cluster: str, exc: Exception) -> None:
        status = getattr(exc, "status", None)
        self.reason = {401: "Unauthorized", 403: "Forbidden"}.get(status, "Unreachable") if isinstance(
            exc, k8s.ApiException) else "Unreachable"
        what = "rejected our credentials" if self.reason != "Unreachable" else "unreachable"
        super().__init__(f"cluster {cluster} {what}: {_why(exc)}")
        self.cluster = cluster


REACHABLE = "ClustersReachable"  # condition: False while a member cluster does not answer; True again, saying when


def observe(spec: DecentralizedDiffusionSpec, namespace: str, name: str, uid: str) -> tuple[pl.Observed, dict[str, JobState]]:
    jobs: list[JobState] = []
    for cluster in sorted(clusters_of(spec), key=lambda c: c or ""):
        try:
            jobs += _list_jobs(namespace, uid, cluster)
        except DDMError:
            raise
        except Exception as exc:  # without its jobs the plan could relaunch or skip them: no plan this pass
            if cluster is None:
                raise
            _clusters.invalidate(namespace, cluster)  # the next try reads its Secret again (it may be fixed)
            raise ClusterUnreachable(cluster, exc) from exc
    latest = latest_attempts(jobs)
    # Queued: suspended by Kueue until admitted; to the plan it is launched and waiting (never unsuspended by us)
    state_of = {"Pending": pl.State.RUNNING, "Queued": pl.State.RUNNING, "Running": pl.State.RUNNING,
                "Suspended": pl.State.SUSPENDED,
                "Succeeded": pl.State.SUCCEEDED, "Failed": pl.State.FAILED}
    observed: dict[pl.StageKey, pl.StageObservation] = {}
    for key_id, job in latest.items():
        try:
            key = stages.parse_key(key_id)
        except ValueError:
            continue
        if job.phase == "Failed" and job.exit_code is None and job.queued:
            code = _worker_exit_code(spec, namespace, key, job)
            if code is not None:
                latest[key_id] = job = dataclasses.replace(job, exit_code=code, permanent=1 <= code <= 127)
        report = _progress_report(spec, namespace, name, key_id) if job.phase == "Running" else {}
        if report:
            latest[key_id] = job = dataclasses.replace(job, progress=report)
        step = int(report.get("step") or 0)
        message = job.message if job.phase == "Failed" else ""
        if job.phase == "Failed":
            code = (f"exit code {job.exit_code} ({'permanent' if job.permanent else 'retryable'})"
                    if job.exit_code is not None else "no exit code (pods gone or never ran)")
            message = f"{code}: {message}".rstrip(": ")
        elif job.phase == "Queued":
            message = WAITING_FOR_ADMISSION
        observed[key] = pl.StageObservation(
            state=state_of[job.phase], attempts=job.attempt, step=step, total=int(report.get("total") or 0),
            retryable=not job.permanent,
            failed_at=job.finished_at, message=message, cluster=job.cluster, waiting=job.phase == "Queued")
    parent = None
    if spec.growth is not None and pl.CLUSTER in observed and observed[pl.CLUSTER].state is pl.State.SUCCEEDED:
        parent = _parent(spec, namespace, name, uid)
    return pl.Observed(now=time.time(), stages=observed, parent=parent), latest


# ---------------------------------------------------------------- status


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _status_of(plan: pl.Plan, old: DecentralizedDiffusionStatus, latest: dict[str, JobState],
               generation: int | None, results: Results | None = None, global_batch: int = 1,
               router_facts: tuple[float | None, str | None] = (None, None)) -> DecentralizedDiffusionStatus:
    """The status from the plan and the latest job of each stage: job names, when each stage's job started and
    ended, every expert's last committed checkpoint (from its progress report), the training ETA, the router's
    accuracy and URI once it is committed (``router_facts``, read once), and the results."""
    stage_jobs = plan.stages.model_copy(deep=True)
    for field, key in (("clustering", "cluster"), ("router", "router"), ("evaluation", "evaluate"),
                       ("distillation", "distill"), ("baseline", "baseline"),
                       ("student_evaluation", "evaluate-student")):
        st = getattr(stage_jobs, field)
        if st is not None and key in latest:
            job = latest[key]
            st.job_name, st.started_at = job.name, _rfc3339(job.started_at)
            st.finished_at = _rfc3339(job.finished_at) if job.phase in ("Succeeded", "Failed") else None
    old_experts = {e.index: e for e in old.experts}
    experts = []
    for e in plan.experts:
        job = latest.get(b.expert_key(e.index))
        checkpoint = (job.progress or {}).get("last_checkpoint") if job else None
        previous = old_experts.get(e.index)
        experts.append(e.model_copy(update={
            "job_name": job.name if job else None,
            "last_checkpoint": checkpoint or (previous.last_checkpoint if previous else None)}))
    router = plan.router
    if router is not None and router.phase == "Succeeded":
        accuracy, uri = router_facts if router_facts != (None, None) else (
            (old.router.accuracy, old.router.uri) if old.router else (None, None))
        router = router.model_copy(update={"accuracy": accuracy, "uri": uri})
    return DecentralizedDiffusionStatus(
        phase=plan.phase, message=plan.message,
        conditions=pl.merge_conditions(old.conditions, plan.conditions, _now_rfc3339(), generation),
        observed_generation=generation, stages=stage_jobs, experts=experts,
        experts_ready=plan.experts_ready, experts_total=plan.experts_total, router=router,
        eta=training_eta(plan, latest, global_batch),
        best_fid=_best_fid(results.fid) if results else old.best_fid, results=results or old.results,
    )


def training_eta(plan: pl.Plan, latest: dict[str, JobState], global_batch: int) -> str | None:
    """How long the running experts still need, from their last progress reports (steps left at their measured
    images/s); None when none runs or none has reported a rate. Experts still waiting for a slot are not counted."""
    left = []
    for e in plan.experts:
        job = latest.get(b.expert_key(e.index))
        rate = (job.progress or {}).get("images_per_s") if job and e.phase == "Running" else None
        if rate:
            left.append(max(e.total_steps - e.step, 0) * global_batch / float(rate))
    if not left:
        return None
    seconds = int(max(left))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _best_fid(rows: list[StrategyResult]) -> float | None:
    """The best routing strategy's FID (the monolith baseline row is a reference, not a DDM result)."""
    best = best_fid((r.strategy, r.fid) for r in rows)
    return best[1] if best else None


def _transitions(old: DecentralizedDiffusionStatus, new: DecentralizedDiffusionStatus) -> list[tuple[str, str]]:
    """(reason, message) for every stage, expert or phase that changed phase."""
    out = []
    if old.phase != new.phase:
        out.append(("PhaseChanged", f"phase {old.phase} -> {new.phase}: {new.message}"))
    for field in ("clustering", "router", "evaluation", "distillation", "student_evaluation"):
        before, after = getattr(old.stages, field), getattr(new.stages, field)
        if after is not None and (before is None or before.phase != after.phase or before.attempts != after.attempts):
            was = before.phase if before else "Pending"
            if was != after.phase or (before and before.attempts != after.attempts):
                out.append(("StageChanged", f"{field.replace('_', ' ')} {was} -> {after.phase} "
                                                f"(attempt {after.attempts})"))
    old_experts = {e.index: e for e in old.experts}
    changed: dict[tuple[str, str], list[Any]] = {}  # one Event per transition, not per expert (K at once at scale)
    for e in new.experts:
        prev = old_experts.get(e.index)
        was = prev.phase if prev else "Pending"
        if prev and prev.job_name and e.job_name and prev.job_name != e.job_name:
            out.append(("ExpertRetried", f"expert {e.index} retried as {e.job_name} (after {prev.job_name})"))
        elif was != e.phase:
            changed.setdefault((was, e.phase), []).append(e)
    for (was, phase), experts in changed.items():
        if len(experts) == 1:
            e = experts[0]
            out.append(("ExpertChanged", f"expert {e.index} {was} -> {phase}" + (f" ({e.job_name})" if e.job_name else "")))
        else:
            out.append(("ExpertChanged", f"experts {', '.join(str(e.index) for e in experts)} {was} -> {phase}"))
    return out


def events_of(transitions: list[tuple[str, str]]) -> list[tuple[bool, str, str]]:
    """(warning, reason, message): the transitions one pass made visible as one Event, plus one Warning if any of
    them is a failure or a retry. A pass is one step of the DDM the user sees (K experts finishing together are one
    step); an Event per stage or expert made a fleet's API server write 26 Events per DDM. The reason is the first
    transition's (the phase's when it changed), the message lists them all."""
    out = []
    for warning in (False, True):
        picked = [(r, m) for r, m in transitions if (("Failed" in m or "Retrying" in m) == warning)]
        if picked:
            out.append((warning, picked[0][0], "; ".join(m for _, m in picked)[:1000]))
    return out


def _compact(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "kopf"}


# ---------------------------------------------------------------- reconcile


_queued: set[str] = set()


def reconcile(namespace: str, name: str, coalesce: bool = False) -> float | None:
    """One level-triggered pass over a DDM; returns seconds until the next pass is due without an event (or None).

    With ``coalesce``, a pass is skipped when another is already waiting for this DDM: that one reads the DDM and its
    children after we were called, so it sees everything we would (K experts finishing together cost one pass).
    """
    key = f"{namespace}/{name}"
    with _locks_guard:
        if coalesce and key in _queued:
            return None
        _queued.add(key)
    with _lock(key):  # read inside the lock: a pass never plans from a status another just replaced
        with _locks_guard:
            _queued.discard(key)
        return _reconcile_locked(namespace, name)


_bodies: dict[str, dict[str, Any]] = {}  # "ns/name" -> the newest DDM seen: kopf's watch, our own status writes
_bodies_guard = threading.Lock()


def _version(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


def remember(body: dict[str, Any]) -> None:
    """Keep ``body`` as the DDM's newest copy unless a newer one is held (etcd revisions: both copies come from
    the same API server, kopf's watch event and our own write's answer can arrive in either order)."""
    meta = body.get("metadata") or {}
    key = f"{meta.get('namespace')}/{meta.get('name')}"
    with _bodies_guard:
        held = _bodies.get(key)
        if held is None or _version(body) < 0 or _version(held) <= _version(body):
            _bodies[key] = body


def _ddm_body(namespace: str, name: str) -> dict[str, Any] | None:
    """The DDM as kopf's watch last delivered it, or as our own last status write returned it, whichever is newer:
    no request. The pass never writes with a resourceVersion precondition (status is a merge patch of what the pass
    computed from this copy, under the DDM's lock), so a copy a moment old cannot make a write fail; a spec change
    not yet delivered arrives with the watch event that wakes the next pass. A fresh GET only when no copy is held
    (the first pass may start before kopf hands over the object) or its version is not a number."""
    with _bodies_guard:
        body = _bodies.get(f"{namespace}/{name}")
    if body is not None and _version(body) >= 0:
        return body
    try:
        body = _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    remember(body)
    return body


def _reconcile_locked(namespace: str, name: str) -> float | None:
    body = _ddm_body(namespace, name)
    if body is None:
        return None
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return None
    uid, generation = meta["uid"], meta.get("generation")
    old = DecentralizedDiffusionStatus.model_validate(body.get("status") or {})
    try:
        spec = DecentralizedDiffusionSpec.model_validate(body.get("spec") or {})
        check_trainer_image(spec.trainer_image)  # the installer's allow-list: no child for another image
        check_storage(spec)  # a store every stage's pod can reach: no child otherwise
    except ValueError as exc:
        first = str(exc).splitlines()
        message = f"invalid spec: {'; '.join(first[:3])}"[:1000]
        if old.phase != "Failed" or old.message != message:
            _patch_status(namespace, name, {"phase": "Failed", "message": message, "observedGeneration": generation})
            kopf.warn(body, reason="InvalidSpec", message=message)
        return None
    owner = b.Owner(name=name, namespace=namespace, uid=uid)
    _remote.use(namespace, clusters_of(spec), uid)  # the watches (and index) of its jobs in every cluster it uses
    try:
        observed, latest = observe(spec, namespace, name, uid)
    except DDMError as exc:  # e.g. a targetCluster Secret missing or unsafe: the user must fix it
        if old.message != str(exc):
            _patch_status(namespace, name, {"message": str(exc)})
            kopf.warn(body, reason="ClusterUnavailable", message=str(exc))
        return REMOTE_INTERVAL_S
    except ClusterUnreachable as exc:  # nothing is planned until it answers: no stage is relaunched or skipped
        return _unreachable(body, old, generation, exc)
    plan = pl.plan(spec, observed)
    launches = [a for a in plan.actions if isinstance(a, (pl.Launch, pl.Retry))]
    if launches:  # independent children: create them side by side (K experts + router at once)
        try:
            _launch_all(spec, owner, launches)
        except ClusterUnreachable as exc:  # what was created is adopted by the next pass (409)
            return _unreachable(body, old, generation, exc)
    def holds_quota(action: pl.Action) -> bool:
        job = latest.get(action.key.id)
        return isinstance(action, (pl.Suspend, pl.Cancel)) and job is not None and job.phase in ("Pending", "Running")

    # a pause deactivates the waiting Workloads before the admitted ones: the quota an eviction frees must not go to
    # a Workload about to be deactivated (Kueue would start its pods only to stop them); sorted() keeps the order else
    for action in sorted(plan.actions, key=holds_quota):
        if isinstance(action, (pl.Launch, pl.Retry)):
            latest[action.key.id] = JobState(key=action.key.id, attempt=action.attempt,
                                             name=b.child_name(name, action.key.id, action.attempt),
                                             phase="Pending", cluster=_placement_of(spec, action.key)[0].target_cluster)
        elif isinstance(action, (pl.Suspend, pl.Cancel)):
            job = latest.get(action.key.id)
            if job is not None and job.phase in ("Pending", "Queued", "Running"):  # already suspended: no request
                _set_suspend(namespace, job, True)
        elif isinstance(action, pl.Unsuspend) and action.key.id in latest:
            _set_suspend(namespace, latest[action.key.id], False)
    launched = {a.key for a in plan.actions if isinstance(a, (pl.Launch, pl.Retry))}
    if launched:  # show the launched stages as running (or queued) now rather than on the next pass
        plan = pl.plan(spec, pl.Observed(now=observed.now, stages={
            **observed.stages, **{k: _just_launched(spec, k, latest[k.id]) for k in launched}}))
    results, unread = None, []
    if _table_to_read(latest, old):
        results = _results(spec, namespace, name, unread)
    router_facts: tuple[float | None, str | None] = (None, None)
    if (latest.get(pl.ROUTER.id) and latest[pl.ROUTER.id].phase == "Succeeded"
            and not (old.router and old.router.uri)):
        router_facts = _router_facts(spec, namespace, name, unread)  # once: a committed router does not change
    new = _status_of(plan, old, latest, generation, results, spec.experts.batch_size, router_facts)
    new.conditions = _results_read(new.conditions, unread, generation)
    was = next((c for c in old.conditions if c.type == REACHABLE), None)
    if was is not None and was.status == "False":  # back: the final status keeps when and what
        message = f"reachable again at {_now_rfc3339()}; since {was.last_transition_time}: {was.message}"[:4096]
        new.conditions = pl.merge_conditions(new.conditions, [pl.ConditionUpdate(REACHABLE, "True", "Reconnected",
                                                                                  message)], _now_rfc3339(), generation)
        kopf.info(body, reason="ClusterReachable", message=message[:1000])
    probes = [j for k, j in latest.items() if k.startswith("probe-") and j.phase == "Succeeded"]
    newest = max((int(j.key.split("-")[1]) for j in probes), default=0)
    if newest and (old.partial is None or not (old.partial.uri or "").endswith(f"/{newest:03d}/results.json")):
        new.partial = _partial(spec, namespace, name) or old.partial  # a probe landed: read its row once
    else:
        new.partial = old.partial
    wire = new.to_wire()
    if wire != _compact(old.to_wire()):
        _patch_status(namespace, name, wire)
        for warning, reason, message in events_of(_transitions(old, new)):
            (kopf.warn if warning else kopf.info)(body, reason=reason, message=message)
    return next_look(plan.requeue_after, latest, _remote.watched(namespace))


def _results_read(conditions: list[Any], unread: list[str], generation: int | None) -> list[Any]:
    """Condition ResultsRead: False (StoreUnreachable) while a committed result could not be read because the store
    did not answer, True again once a pass reads without such a failure. While it is False the DDM keeps its
    reconciler even when finished (needs_reconciler), so a table committed while the store was down still reaches the
    status when the store comes back; the message is written once per outage (no status write per pass)."""
    held = next((c for c in conditions if c.type == RESULTS_READ), None)
    if unread and (held is None or held.status != "False"):
        update = pl.ConditionUpdate(RESULTS_READ, "False", "StoreUnreachable",
                                    f"not read, tried again while the store does not answer: {'; '.join(unread)}")
    elif not unread and held is not None and held.status == "False":
        update = pl.ConditionUpdate(RESULTS_READ, "True", "StoreAnswered",
                                    f"read at {_now_rfc3339()}; before: {held.message}"[:4096])
    else:
        return conditions
    return pl.merge_conditions(conditions, [update], _now_rfc3339(), generation)


def _launch_all(spec: DecentralizedDiffusionSpec, owner: b.Owner, launches: list[pl.Launch | pl.Retry]) -> None:
    """Launch every stage at once in the shared pool; return when all are done (the pass ends with no create of
    its own in flight, so the next pass of this DDM never races one), then raise the first failure in plan order.
    A stage's ConfigMap (a config too large for its job) precedes the job that mounts it; names are deterministic,
    so a create cut short (an error, a SIGKILL) is adopted by the next pass (409)."""
    futures = [launcher().submit(_launch_in, spec, owner, action) for action in launches]
    wait(futures)
    for future in futures:
        if (exc := future.exception()) is not None:
            raise exc


def _launch_in(spec: DecentralizedDiffusionSpec, owner: b.Owner, action: pl.Launch | pl.Retry) -> None:
    """Create one stage's children; a member cluster that refuses or rejects the creation is ClusterUnreachable
    (the status says so, as for a failed read), not an error of the pass."""
    req = job_request(spec, owner, action.key, action.attempt)
    try:
        _launch(req)
    except (DDMError, ClusterUnreachable):
        raise
    except (ApiTransportError, OSError, k8s.ApiException) as exc:
        cluster = req.placement.target_cluster
        answered = isinstance(exc, k8s.ApiException) and exc.status not in (401, 403) and 0 < (exc.status or 0) < 500
        if cluster is None or answered:
            raise  # our own cluster, or an answer that is not about reaching it (e.g. 422): an error of the pass
        _clusters.invalidate(owner.namespace, cluster)
        raise ClusterUnreachable(cluster, exc) from exc


def _unreachable(body: dict[str, Any], old: DecentralizedDiffusionStatus, generation: int | None,
                 exc: ClusterUnreachable) -> float:
    """Condition ClustersReachable=False (reason Unreachable, Unauthorized or Forbidden) and one Warning, once per
    outage (again if the reason changes); the DDM waits and looks again every DDM_REMOTE_INTERVAL_S."""
    meta = body["metadata"]
    was = next((c for c in old.conditions if c.type == REACHABLE), None)
    if was is None or was.status != "False" or was.reason != exc.reason:
        message = f"{exc}; this DDM waits for it (its stages there keep running or wait)"
        conditions = pl.merge_conditions(old.conditions, [pl.ConditionUpdate(REACHABLE, "False", exc.reason,
                                                                             message)], _now_rfc3339(), generation)
        _patch_status(meta["namespace"], meta["name"], {"message": message,
                                                        "conditions": [c.to_wire() for c in conditions]})
        kopf.warn(body, reason="ClusterUnreachable", message=message)
    return REMOTE_INTERVAL_S


def next_look(requeue_after: float | None, latest: dict[str, JobState], watched: set[str] | frozenset[str] = frozenset(),
              ) -> float | None:
    """Seconds until a pass is due even if no event comes: a retry's backoff expiring, or a stage live in another
    cluster whose watch is not connected (``watched``: those that are): polled every REMOTE_INTERVAL_S while it
    runs, never once it is done."""
    remote = any(j.cluster is not None and j.cluster not in watched and j.phase not in ("Succeeded", "Failed")
                 for j in latest.values())
    due = [d for d in (requeue_after, REMOTE_INTERVAL_S if remote else None) if d is not None]
    return min(due, default=None)


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    body = _custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})
    body.get("metadata", {}).pop("managedFields", None)
    remember(body)


# ---------------------------------------------------------------- kopf wiring


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    settings.posting.level = logging.INFO
    logging.getLogger("kopf.objects").addFilter(_quiet_event_handlers)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    settings.execution.max_workers = MAX_WORKERS
    memo.executor = settings.execution.executor  # passes run in kopf's own pool for sync handlers (max_workers)


def _quiet_event_handlers(record: logging.LogRecord) -> bool:
    """kopf logs every handler's success at INFO: for the event handlers that is a line per child or DDM event
    (thousands a minute on a fleet). Those lines become DEBUG (shown with --verbose)."""
    if record.levelno == logging.INFO and record.getMessage().startswith(EVENT_HANDLER_SUCCESS):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


EVENT_HANDLER_SUCCESS = ("Handler 'on_ddm_event' succeeded",)


@kopf.on.probe(id="reconciled")
def probe(**_: Any) -> int:
    return len(_locks)


def _uses_remote(spec: Any, **_: Any) -> bool:
    spec = spec or {}
    experts = spec.get("experts") or {}
    placements = [experts.get("placement") or {}] + [(o or {}).get("placement") or {} for o in experts.get("overrides") or []]
    placements += [((spec.get(section) or {}).get("placement") or {}) for section in ("router", "evaluation", "distillation")]
    return any(p.get("targetCluster") or p.get("multiKueueWorkers") for p in placements)


# ---- wake-ups: one daemon per unfinished DDM; child and spec events set its Event (in-memory, no API request)

_wakes: dict[str, asyncio.Event] = {}  # DDM uid -> its reconciler's wake-up


def needs_reconciler(status: Any, meta: Any, **_: Any) -> bool:
    """A DDM gets a reconciler unless it finished (Succeeded, Degraded, Failed) with its current spec handled.
    kopf evaluates this on every event of the DDM: the pass that writes a terminal phase stops the daemon, a spec
    change (generation > observedGeneration) starts it again (kopf docs/daemons.rst, Filtering). A finished DDM whose
    committed results could not be read (condition ResultsRead=False) keeps it until the pass that reads them."""
    status, meta = dict(status or {}), dict(meta or {})
    handled = status.get("observedGeneration") is not None and status.get("observedGeneration") == meta.get("generation")
    unread = any(c.get("type") == RESULTS_READ and c.get("status") == "False" for c in status.get("conditions") or [])
    return not (status.get("phase") in TERMINAL_PHASES and handled) or unread


def child_wakes_parent(event_type: str | None, job: dict[str, Any], seen: dict[str, str]) -> bool:
    """Whether this event of one of our PyTorchJobs should wake its DDM; records the job's phase in ``seen``.

    Only a change the planner sees wakes it: a deletion, or a new phase (observe.job_state) other than Pending <->
    Running, which the planner reads alike (a started pod's progress shows at the next pass). A job first seen
    Pending or Running was just created by a pass that already counts it."""
    uid = (job.get("metadata") or {}).get("uid", "")
    if event_type == "DELETED":
        seen.pop(uid, None)
        return True
    state = job_state(job)
    if state is None:
        return False
    phase = "Running" if state.phase == "Pending" else state.phase
    before = seen.get(uid, "Running")
    seen[uid] = phase
    return before != phase


def _wake(ddm_uid: str | None) -> None:
    wake = _wakes.get(ddm_uid or "")
    if wake is not None:  # no reconciler: the DDM is finished, or not yet seen (its reconciler will look anyway)
        wake.set()


_loop: asyncio.AbstractEventLoop | None = None  # kopf's loop, where the wake-up Events live


def _wake_from_thread(ddm_uid: str) -> None:
    """_wake from a member cluster's watch thread (asyncio Events are set on their own loop only)."""
    if _loop is not None and not _loop.is_closed():
        _loop.call_soon_threadsafe(_wake, ddm_uid)


def _watch_failed(namespace: str, cluster: str | None) -> None:
    if cluster is not None:  # its Secret is read again at the next use (it may have been fixed)
        _clusters.invalidate(namespace, cluster)


_remote = RemoteWatches(lambda namespace, cluster: _client_for(namespace, cluster),
                        lambda event_type, job, seen: WAKE_ON_CHILDREN and child_wakes_parent(event_type, job, seen),
                        _wake_from_thread, BACKEND, on_failure=_watch_failed)


@kopf.daemon(GROUP, VERSION, PLURAL, id="reconciler", when=needs_reconciler, cancellation_backoff=5.0,
             cancellation_timeout=60.0)
async def reconciler(namespace: str, name: str, uid: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                     **_: Any) -> None:
    """Pass, sleep until woken or due, repeat. A wake-up during a pass leaves the Event set: exactly one more pass
    follows, which reads everything that changed meanwhile (K experts finishing together cost one or two passes).
    When kopf stops it (the DDM finished or is deleted) it returns after its pass; cancellation is only a backstop."""
    global _loop
    wake = _wakes[uid] = asyncio.Event()
    loop = _loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        while not stopped:
            wake.clear()
            try:
                due = await loop.run_in_executor(memo.get("executor"), contextvars.copy_context().run,
                                                 reconcile, namespace, name)
            except Exception:  # an API error, a bug: logged, and the next pass comes after a backoff or an event
                log.exception("reconcile of %s/%s failed; next pass in %.0f s or on an event",
                              namespace, name, ERROR_BACKOFF_S)
                due = ERROR_BACKOFF_S
            timeout = INTERVAL_S if due is None else min(due, INTERVAL_S)
            log.debug("reconciled %s/%s; next pass on an event or in %.1f s", namespace, name, timeout)
            woken = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({woken, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
    finally:
        stopping.cancel()
        _remote.release(uid)
        if _wakes.get(uid) is wake:
            del _wakes[uid]


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_ddm_event(event: dict[str, Any], meta: kopf.Meta, status: kopf.Status, uid: str, **_: Any) -> None:
    """Every DDM event: its body is kept for the next pass (no GET per pass), and a spec change wakes the DDM's
    reconciler at once (a finished DDM's reconciler is started by kopf instead). kopf lists again whenever its
    watch restarts, so the copy held is never older than the last (re)list."""
    if event.get("type") == "DELETED":
        with _bodies_guard:
            _bodies.pop(f"{meta.get('namespace')}/{meta.get('name')}", None)
    elif isinstance(event.get("object"), dict):
        body = copy.deepcopy(event["object"])
        body.get("metadata", {}).pop("managedFields", None)  # never read; most of a DDM's size after a few writes
        remember(body)
    if meta.get("generation") != status.get("observedGeneration"):
        _wake(uid)


def _why(exc: BaseException) -> str:
    """A short cause of a failed request to another cluster: urllib3's MaxRetryError carries the last try's error
    (a read timeout, a refused connection) after a long URL, which would crowd the cause out of an Event."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        exc = reason
    if isinstance(exc, k8s.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


CLEANUP_TIMEOUT_S = float(os.environ.get("DDM_REMOTE_CLEANUP_TIMEOUT_S", "300"))  # then the DDM goes anyway
CLEANUP_RETRY_S = 15.0


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_uses_remote)
def on_delete(namespace: str, uid: str, spec: Any, meta: kopf.Meta, body: kopf.Body, **_: Any) -> None:
    """Children in other clusters have no owner reference there: delete them before the DDM goes. A cluster that
    cannot be reached is retried for DDM_REMOTE_CLEANUP_TIMEOUT_S after the deletion was asked for; then the DDM
    is released anyway and a Warning Event names the cluster and the label selector of what was left behind."""
    parsed = DecentralizedDiffusionSpec.model_validate(dict(spec))
    clusters: set[str | None] = (clusters_of(parsed) | workers_of(parsed)) - {None}  # workers: our ConfigMaps
    selector = f"{b.LABEL_UID}={uid}"
    unreachable: dict[str, str] = {}
    for cluster in sorted(c for c in clusters if c):
        try:
            api_client = _client_for(namespace, cluster)
        except DDMError as exc:  # the Secret is gone: nothing we can reach to clean up
            log.warning("cleanup of cluster %s skipped: %s", cluster, exc)
            continue
        custom, core, kw = _custom(api_client), _core(api_client), _deadline(cluster)
        try:
            custom.delete_collection_namespaced_custom_object(
                BACKEND.group, BACKEND.version, namespace, BACKEND.plural, label_selector=selector, **kw)
            if BACKEND is b.TRAINJOB:  # their runtimes: no owner reference across clusters either
                custom.delete_collection_namespaced_custom_object(
                    b.TRAINER_GROUP, b.TRAINER_VERSION, namespace, b.TRAININGRUNTIME_PLURAL, label_selector=selector,
                    **kw)
            core.delete_collection_namespaced_config_map(namespace, label_selector=selector, **kw)
        except Exception as exc:  # unreachable, refused, expired credentials: retried until the deadline
            unreachable[cluster] = _why(exc)
    if not unreachable:
        return
    asked = observe_time(meta.get("deletionTimestamp"))
    waited = time.time() - asked if asked is not None else 0.0
    if waited < CLEANUP_TIMEOUT_S:  # the last try comes at the deadline, not up to CLEANUP_RETRY_S after it
        raise kopf.TemporaryError(f"cleanup of clusters {sorted(unreachable)} failed ({waited:.0f} s of "
                                  f"{CLEANUP_TIMEOUT_S:.0f} s): {unreachable}",
                                  delay=max(1.0, min(CLEANUP_RETRY_S, CLEANUP_TIMEOUT_S - waited)))
    left = "; ".join(f"cluster {c}: {BACKEND.kind}s and ConfigMaps in namespace {namespace} with label {selector} "
                     f"({why})" for c, why in sorted(unreachable.items()))
    kopf.warn(body, reason="CleanupIncomplete", message=f"gave up after {waited:.0f} s; left behind: {left}")
