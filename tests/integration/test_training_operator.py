"""The operator against the real Kubeflow training operator on a simulated GPU fleet: no part of Kubernetes is played.

``k8s_fleet`` (tests/fixtures/k8s.py) runs kube-apiserver, kube-controller-manager, kube-scheduler, kwok GPU nodes and
the training operator v1.9.4's own PyTorchJob controller, built from their Go modules. The DDM operator creates
PyTorchJobs; the training operator makes their pods and writes their conditions; the scheduler binds the pods to GPU
nodes; kwok runs them for a moment and ends their container with the exit code a test put in a pod annotation
(``placement.podAnnotations``, which the DDM carries to the pod template). No trainer runs: these tests are about
what the control plane does with exit codes, retries and placement (tests/e2e trains for real).

The essential ones run with either backend (the operator setting DDM_JOB_BACKEND): ``pytorchjob`` against the
training operator v1.9.4, ``trainjob`` against Kubeflow Trainer v2.3 and JobSet v0.12 (``k8s_trainer_v2``), whose
TrainJob becomes a JobSet, whose Jobs the kube-controller-manager's Job controller turns into the pods kwok runs.
"""
from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ddm_operator.k8s.builders import BACKENDS, Backend
from fixtures.k8s import EXIT_CODE_ANNOTATION, RUN_MS_ANNOTATION, inline_kubeconfig
from integration.test_operator import Harness, Operator, chart_account, ddm_spec, render_rbac, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

EITHER_BACKEND = pytest.mark.parametrize("job_backend", ["pytorchjob", "trainjob"])
JOB_NAME_LABEL = BACKENDS["pytorchjob"].pod_job_label  # the training operator's JobNameLabel (apis/kubeflow.org/v1)
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}]


@pytest.fixture
def fleet(k8s_fleet: Any, k8s_fleet_namespace: str, job_backend: str, request: pytest.FixtureRequest,
          tmp_path: Path) -> Iterator[Harness]:
    """The DDM operator for one namespace with ``job_backend`` (EITHER_BACKEND runs a test with both), as the chart's
    ServiceAccount with the chart's RBAC for that backend."""
    backend = job_backend
    if backend == "trainjob":
        request.getfixturevalue("k8s_trainer_v2")
    ns = k8s_fleet_namespace
    release, account = chart_account(ns)
    k8s_fleet.apply_yaml(render_rbac(ns, release, (f"jobBackend={backend}",)))
    op = Operator(k8s_fleet.serviceaccount_kubeconfig(ns, account), ns, tmp_path / "operator.log",
                  env={"DDM_JOB_BACKEND": backend})
    op.start()
    h = Harness(k8s_fleet, ns)
    yield h
    op.stop()
    print(op.log())
    h.api.close()


def pods_by_job(h: Harness, backend: Backend = BACKENDS["pytorchjob"]) -> dict[str, list[dict[str, Any]]]:
    """Every pod the controllers made, by its PyTorchJob or TrainJob (the label that names it: the training
    operator's training.kubeflow.org/job-name, JobSet's jobset.sigs.k8s.io/jobset-name), with its node."""
    label = backend.pod_job_label
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for pod in h.core.list_namespaced_pod(h.ns, label_selector=label).items:
        out[pod.metadata.labels[label]].append(
            {"node": pod.spec.node_name, "phase": pod.status.phase, "uid": pod.metadata.uid})
    return out


def jobs_of(h: Harness, backend: Backend) -> dict[str, dict[str, Any]]:
    items = h.custom.list_namespaced_custom_object(backend.group, backend.version, h.ns, backend.plural)["items"]
    return {j["metadata"]["name"]: j for j in items}


def fleet_spec(k: int, tmp: Path, **over: Any) -> dict[str, Any]:
    """A DDM whose experts want one GPU each on the tainted pool; router and evaluation on the plain one."""
    expert_placement = {"nodeSelector": {"pool": "tainted"}, "tolerations": TOLERATE_GPU,
                        "podAnnotations": {RUN_MS_ANNOTATION: "1000"}}
    spec = ddm_spec(k, tmp, experts={"modelPreset": "DiT-T/4", "steps": 100, "gpusPerNode": 1,
                                     "placement": expert_placement},
                    router={"gpusPerNode": 1, "placement": {"nodeSelector": {"pool": "gpu"}}},
                    evaluation={"gpusPerNode": 1, "placement": {"nodeSelector": {"pool": "gpu"}}})
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


@EITHER_BACKEND
def test_a_k4_ddm_runs_through_real_jobs_on_gpu_nodes(fleet: Harness, job_backend: str, tmp_path: Path) -> None:
    """Cluster, 4 experts and the router, evaluation: each a PyTorchJob (or TrainJob) whose pod the controllers
    create and the scheduler places by the stage's own placement; Succeeded from the controllers' own conditions."""
    h, backend, kind = fleet, job_backend, BACKENDS[job_backend]
    h.create("k4", fleet_spec(4, tmp_path))
    status = h.wait_phase("k4", "Succeeded", timeout=180)
    pods = pods_by_job(h, kind)
    stages = ["cluster", *(f"expert-{k:03d}" for k in range(4)), "router", "evaluate"]
    assert sorted(pods) == sorted(f"k4-{s}-a1" for s in stages), pods
    assert all(len(p) == 1 and p[0]["phase"] == "Succeeded" for p in pods.values()), pods
    for k in range(4):  # experts on the tainted GPU pool (their toleration), router and evaluation on the other
        assert pods[f"k4-expert-{k:03d}-a1"][0]["node"].startswith("tainted-"), pods
    assert pods["k4-router-a1"][0]["node"].startswith("gpu-") and pods["k4-evaluate-a1"][0]["node"].startswith("gpu-")
    assert status["expertsReady"] == 4 and condition(status, "Ready")["status"] == "True"
    jobs = jobs_of(h, kind)
    if backend == "pytorchjob":
        assert {r["restartPolicy"] for j in jobs.values() for r in j["spec"]["pytorchReplicaSpecs"].values()} == {"Never"}
        # the conditions are the training operator's, not ours: its reason names the kind
        assert all(any(c["type"] == "Succeeded" and c["reason"] == "PyTorchJobSucceeded"
                       for c in j["status"]["conditions"]) for j in jobs.values())
        return
    # TrainJob -> JobSet -> Job: one retry layer (ours) all the way down, in the Jobs JobSet made from our runtime
    batch = h.plane.api_client()
    from kubernetes import client

    made = client.BatchV1Api(batch).list_namespaced_job(h.ns, label_selector=kind.pod_job_label).items
    batch.close()
    assert sorted(j.metadata.labels[kind.pod_job_label] for j in made) == sorted(jobs), made
    assert {(j.spec.backoff_limit, j.spec.template.spec.restart_policy) for j in made} == {(0, "Never")}
    # Complete is copied from the JobSet's Completed condition, reason and all (plugins/jobset/jobset.go Status;
    # AllJobsCompleted: sigs.k8s.io/jobset pkg/constants/constants.go)
    assert all(any(c["type"] == "Complete" and c["status"] == "True" and c["reason"] == "AllJobsCompleted"
                   for c in j["status"]["conditions"]) for j in jobs.values()), jobs


@EITHER_BACKEND
def test_exit_codes_from_pods_decide_retries_and_pod_runs_equal_the_policy(fleet: Harness, job_backend: str,
                                                                          tmp_path: Path) -> None:
    """Expert 1 exits 3 (a bad config): one pod run, no retry, the message names the code. Expert 2 is preempted for
    ever (143): 1 + maxRetriesPerExpert pod runs, then it is lost. minExperts 2 of 4: the DDM finishes Degraded."""
    h, backend, kind = fleet, job_backend, BACKENDS[job_backend]
    spec = fleet_spec(4, tmp_path, failurePolicy={"maxRetriesPerExpert": 2, "backoffSeconds": 0, "minExperts": 2})
    base = spec["experts"]["placement"]
    spec["experts"]["overrides"] = [
        {"experts": [1], "placement": {**base, "podAnnotations": {EXIT_CODE_ANNOTATION: "3"}}},
        {"experts": [2], "placement": {**base, "podAnnotations": {EXIT_CODE_ANNOTATION: "143"}}},
    ]
    h.create("codes", spec)
    status = h.wait_phase("codes", "Degraded", timeout=240)
    pods = pods_by_job(h, kind)
    runs = {k: sum(len(v) for name, v in pods.items() if name.startswith(f"codes-expert-{k:03d}-")) for k in range(4)}
    assert runs == {0: 1, 1: 1, 2: 3, 3: 1}, pods
    experts = {e["index"]: e for e in status["experts"]}
    assert experts[1]["phase"] == "Failed" and experts[1]["retries"] == 0
    assert "exit code 3 (permanent)" in experts[1]["message"], experts[1]
    assert experts[2]["phase"] == "Failed" and experts[2]["retries"] == 2
    assert "exit code 143 (retryable)" in experts[2]["message"], experts[2]
    assert experts[0]["phase"] == experts[3]["phase"] == "Succeeded"
    assert condition(status, "Degraded")["status"] == "True"
    # the controllers' own message carries no code: the operator read it from the pods
    failed = jobs_of(h, kind)["codes-expert-001-a1"]["status"]["conditions"]
    # JobSet's "jobset failed due to one or more job failures" (pkg/constants FailedJobsMessage, failure_policy.go)
    own = "replica(s) failed" if backend == "pytorchjob" else "jobset failed"
    assert any(c["type"] == "Failed" and "exit code" not in c["message"] and own in c["message"]
               for c in failed), failed


def test_scheduler_holds_experts_that_do_not_fit(fleet: Harness, tmp_path: Path) -> None:
    """Experts asking for 8 GPUs each on a pool of 4 nodes x 8: the scheduler runs 4 at once, the rest wait Pending
    (not failed, not retried) and run as GPUs free up; all 6 finish."""
    h = fleet
    spec = fleet_spec(6, tmp_path)
    spec["experts"]["gpusPerNode"] = 8
    spec["experts"]["placement"]["podAnnotations"] = {RUN_MS_ANNOTATION: "4000"}
    h.create("big", spec)
    peak = 0

    def done() -> bool:
        nonlocal peak
        running = [p for name, ps in pods_by_job(h).items() if "-expert-" in name for p in ps if p["phase"] == "Running"]
        peak = max(peak, len(running))
        return h.status("big").get("phase") == "Succeeded"

    wait_for(done, "big Succeeded", timeout=240)
    pods = pods_by_job(h)
    assert all(len(pods[f"big-expert-{k:03d}-a1"]) == 1 for k in range(6)), pods  # no attempt a2: waiting is not failing
    assert 1 <= peak <= 4, peak


@pytest.mark.parametrize("job_backend", ["trainjob"])  # PyTorchJob suspension: test_operator.test_suspend_and_resume
def test_suspend_stops_the_running_pods_and_resume_finishes_the_same_attempts(fleet: Harness, job_backend: str,
                                                                              tmp_path: Path) -> None:
    """spec.suspend while the experts run: Trainer v2 suspends the JobSet, JobSet the Jobs, the Job controller
    deletes their pods, and the DDM reads Suspended; suspend false resumes the same attempts (no a2, no retry
    counted) with new pods, and the run finishes."""
    h, kind = fleet, BACKENDS[job_backend]
    spec = fleet_spec(2, tmp_path)
    # long enough to be caught running and suspended through every hop (operator, Trainer, JobSet, Job controller)
    # on a loaded 2-core machine: a pod that finishes first is not deleted by the suspension
    spec["experts"]["placement"]["podAnnotations"] = {RUN_MS_ANNOTATION: "15000"}
    h.create("sus", spec)
    experts = [f"sus-expert-{k:03d}-a1" for k in range(2)]

    def running() -> dict[str, set[str]]:
        pods = pods_by_job(h, kind)
        return {n: {p["uid"] for p in pods.get(n, []) if p["phase"] == "Running"} for n in experts}

    first = wait_for(lambda: (r := running()) and all(r.values()) and r, "both experts' pods running", timeout=60)
    h.patch_spec("sus", {"suspend": True})
    h.wait_phase("sus", "Suspended", timeout=30)
    wait_for(lambda: not any(pods_by_job(h, kind).get(n) for n in experts), "the experts' pods deleted", timeout=60)
    jobs = jobs_of(h, kind)  # Trainer v2's own condition (pkg/apis/trainer/v1alpha1/trainjob_types.go)
    assert all(jobs[n]["spec"]["suspend"] is True and any(
        c["type"] == "Suspended" and c["status"] == "True" and c["reason"] == "Suspended"
        for c in jobs[n]["status"]["conditions"]) for n in experts), jobs
    h.patch_spec("sus", {"suspend": False})
    second = wait_for(lambda: (r := running()) and all(r.values()) and r, "the experts' pods running again", timeout=60)
    assert all(not (first[n] & second[n]) for n in experts), (first, second)  # new pods, the same jobs
    status = h.wait_phase("sus", "Succeeded", timeout=120)
    assert sorted(n for n in jobs_of(h, kind) if "-expert-" in n) == experts  # no new attempt
    assert all(e["retries"] == 0 and e["phase"] == "Succeeded" for e in status["experts"]), status["experts"]


def test_the_encode_step_spreads_over_clustering_nodes_pods(fleet: Harness, tmp_path: Path) -> None:
    """clustering.nodes 3: the cluster stage is one PyTorchJob of a Master and 2 Workers on GPU nodes, and the
    training operator gives each pod the torch environment (pkg/controller.v1/pytorch/envvar.go setPodEnv:
    WORLD_SIZE = replicas x nprocPerNode (unset: 1), RANK and PET_NODE_RANK = 0 for the master, 1 + index for a
    worker, PET_NNODES = replicas; master.go: MASTER_ADDR = <job>-master-0); the command rendezvouses there with
    --nnodes=3, so ddm-launch gives every process of every pod its own rank and encode.py a disjoint share of
    the parts."""
    h, kind = fleet, BACKENDS["pytorchjob"]
    spec = fleet_spec(2, tmp_path, clustering={"nodes": 3})
    h.create("enc", spec)
    h.wait_phase("enc", "Succeeded", timeout=120)
    name = "enc-cluster-a1"
    replicas = jobs_of(h, kind)[name]["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2), replicas
    pods = h.core.list_namespaced_pod(h.ns, label_selector=f"{kind.pod_job_label}={name}").items
    assert len(pods) == 3 and {p.status.phase for p in pods} == {"Succeeded"}, pods
    ranks = []
    for pod in pods:
        [container] = pod.spec.containers
        env = {e.name: e.value for e in container.env}
        assert (env["WORLD_SIZE"], env["PET_NNODES"], env["MASTER_ADDR"]) == ("3", "3", f"{name}-master-0"), env
        assert env["RANK"] == env["PET_NODE_RANK"]
        ranks.append(int(env["RANK"]))
        assert pod.spec.node_name.startswith("tainted-")  # the experts' placement, with their GPU
        assert container.resources.limits["nvidia.com/gpu"] == "1"
        command = container.command + (container.args or [])
        assert command[:4] == ["ddm-launch", "--nnodes=3", "--nproc-per-node=1", "--rdzv-backend=c10d"], command
        assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in command and command[-3] == "cluster", command
    assert sorted(ranks) == [0, 1, 2]


@pytest.mark.parametrize("job_backend", ["trainjob"])
def test_trainjob_multi_node_experts_rendezvous_where_trainer_v2_says(fleet: Harness, tmp_path: Path) -> None:
    """Experts on 2 nodes: Trainer v2 makes one indexed Job of 2 pods per expert and injects the torch
    environment (plugins/torch/torch.go: PET_NNODES, PET_NODE_RANK from the completion index, PET_MASTER_ADDR of
    pod 0); the command the operator wrote rendezvouses at $(PET_MASTER_ADDR):$(PET_MASTER_PORT), which the kubelet
    expands from that environment."""
    h, kind = fleet, BACKENDS["trainjob"]
    spec = fleet_spec(2, tmp_path)
    spec["experts"]["nodes"] = 2
    h.create("mn", spec)
    h.wait_phase("mn", "Succeeded", timeout=120)
    for k in range(2):
        name = f"mn-expert-{k:03d}-a1"
        pods = h.core.list_namespaced_pod(h.ns, label_selector=f"{kind.pod_job_label}={name}").items
        assert len(pods) == 2 and {p.status.phase for p in pods} == {"Succeeded"}, pods
        for pod in pods:
            [container] = pod.spec.containers
            env = {e.name: e for e in container.env}
            assert env["PET_NNODES"].value == "2" and env["PET_MASTER_ADDR"].value == f"{name}-node-0-0.{name}"
            assert env["PET_NODE_RANK"].value_from.field_ref.field_path.endswith("job-completion-index']")
            assert "--rdzv-endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)" in container.command, container.command
    # deleting the DDM takes everything with it: TrainJobs and runtimes by their owner reference (a runtime's
    # resource-in-use finalizer goes once no TrainJob names it: pkg/controller/trainingruntime_controller.go), and
    # the JobSets, Jobs and pods by theirs
    def left() -> dict[str, int]:
        counts = {plural: len(h.custom.list_namespaced_custom_object(group, version, h.ns, plural)["items"])
                  for group, version, plural in (("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
                                                 ("trainer.kubeflow.org", "v1alpha1", "trainingruntimes"),
                                                 ("jobset.x-k8s.io", "v1alpha2", "jobsets"))}
        counts["pods"] = len(h.core.list_namespaced_pod(h.ns, label_selector=kind.pod_job_label).items)
        return counts

    before = left()
    # cluster, 2 experts, router, evaluate; the experts on 2 pods each
    assert before == {"trainjobs": 5, "trainingruntimes": 5, "jobsets": 5, "pods": 7}, before
    h.custom.delete_namespaced_custom_object("ddm.io", "v1alpha1", h.ns, "decentralizeddiffusions", "mn")
    wait_for(lambda: not any(left().values()), "every child of the DDM gone", timeout=90)


@pytest.mark.parametrize("job_backend", ["trainjob"])
def test_trainjob_in_a_target_cluster_is_watched_classified_and_cleaned_up(fleet: Harness, tmp_path: Path) -> None:
    """Expert 1 in a targetCluster (a kubeconfig Secret; here the fleet plane itself reached as a member, so its
    jobs are also seen as local ones) exits 3: created through the member's client (no owner reference), watched
    there as TrainJobs, a permanent failure, no retry; deleting the DDM removes its TrainJob and TrainingRuntime
    there by label (nothing else would: without an owner reference the garbage collector leaves them)."""
    h, kind = fleet, BACKENDS["trainjob"]
    member = inline_kubeconfig(h.plane.user_kubeconfig("ddm-member", ["system:masters"]))
    h.core.create_namespaced_secret(h.ns, {"metadata": {"name": "member"}, "stringData": {"kubeconfig": member}})
    spec = fleet_spec(2, tmp_path, failurePolicy={"maxRetriesPerExpert": 2, "backoffSeconds": 0, "minExperts": 1})
    base = spec["experts"]["placement"]
    spec["experts"]["overrides"] = [{"experts": [1], "placement": {
        **base, "targetCluster": "member", "podAnnotations": {EXIT_CODE_ANNOTATION: "3"}}}]
    h.create("mc", spec)
    status = h.wait_phase("mc", "Degraded", timeout=120)
    expert = status["experts"][1]
    assert expert["retries"] == 0 and "exit code 3 (permanent)" in expert["message"], expert
    assert "watching TrainJobs of cluster member in" in (tmp_path / "operator.log").read_text()
    jobs = jobs_of(h, kind)
    assert "ownerReferences" not in jobs["mc-expert-001-a1"]["metadata"]  # made through the member's client
    assert "ownerReferences" in jobs["mc-expert-000-a1"]["metadata"]
    selector = "ddm.io/key=expert-001"
    h.custom.delete_namespaced_custom_object("ddm.io", "v1alpha1", h.ns, "decentralizeddiffusions", "mc")
    wait_for(lambda: h.ddm("mc") is None, "the DDM gone after its cleanup of the member", timeout=60)
    for plural in ("trainjobs", "trainingruntimes"):
        left = h.custom.list_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", h.ns, plural,
                                                      label_selector=selector)["items"]
        assert not left, (plural, [o["metadata"]["name"] for o in left])
