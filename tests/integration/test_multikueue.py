"""Kueue's MultiKueue as a second way to place experts in another cluster, on two real control planes.

The manager is the fleet plane with Kueue (``k8s_kueue``); the worker is a second plane with its own scheduler, kwok
GPU nodes, training operator and Kueue (``worker``). On the manager: an AdmissionCheck of controller
``kueue.x-k8s.io/multikueue`` whose MultiKueueConfig lists the MultiKueueCluster ``worker``, whose kubeconfig is a
Secret in kueue-system; a ClusterQueue with that check. What the DDM operator does: nothing but put the experts on
that queue. From Kueue v0.17's source:
- its webhook sets ``spec.runPolicy.managedBy: kueue.x-k8s.io/multikueue`` on a job whose queue's ClusterQueue has
  a MultiKueue check (pkg/controller/jobframework/defaults.go ApplyDefaultForManagedBy; KubeflowJob
  CanDefaultManagedBy in pkg/controller/jobs/kubeflow/kubeflowjob/kubeflowjob_controller.go), so the manager's
  training operator leaves the job alone (training-operator v1.9.4 pkg/controller.v1/common/job.go
  ManagedByExternalController);
- once the manager admits the workload, MultiKueue creates the job in the worker under the same name and namespace,
  labels and all, without managedBy and with a prebuilt workload (pkg/controller/jobs/kubeflow/kubeflowjob/
  kubeflowjob_multikueue_adapter.go SyncJob), and copies the worker job's status back to the manager's job;
- the Workload's ``status.clusterName`` names the worker that runs it.
So the operator reads a MultiKueue expert from its own cluster's job, like any other.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.k8s import (
    EXIT_CODE_ANNOTATION,
    KUEUE_API,
    KUEUE_FLAVOR,
    KUEUE_NAMESPACE,
    RUN_MS_ANNOTATION,
    ControlPlane,
    inline_kubeconfig,
    start_control_plane,
)
from integration.test_kueue_suspend import JOB_NAME_LABEL, TOLERATE_GPU
from integration.test_operator import Harness, Operator, chart_account, ddm_spec, render_rbac, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

MULTIKUEUE = "kueue.x-k8s.io/multikueue"  # apis/kueue/v1beta2 MultiKueueControllerName
WORKER = "worker"  # the MultiKueueCluster's name, which Workload.status.clusterName reports
QUEUE = "mk"
WORKER_SECRET = "worker-kubeconfig"  # the worker's kubeconfig in the DDM's namespace (placement.multiKueueWorkers)


def _docs(*docs: dict[str, Any]) -> str:
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The worker cluster: its own control plane, scheduler, 2 kwok nodes of 8 GPUs (pool "tainted"), training
    operator and Kueue."""
    plane = start_control_plane("ddm-worker", tmp_path_factory.mktemp("k8s-worker"))
    try:
        plane.start_fleet()
        plane.add_gpu_nodes("tainted", 2, taints=[{"key": "nvidia.com/gpu", "value": "present",
                                                   "effect": "NoSchedule"}])
        plane.start_kueue()
        plane.apply_yaml(_docs({"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": KUEUE_FLAVOR}}))
    except BaseException:
        plane.stop()
        raise
    yield plane
    plane.stop()


@pytest.fixture
def multikueue(k8s_kueue: ControlPlane, worker: ControlPlane, k8s_fleet_namespace: str, tmp_path: Path
               ) -> Iterator[tuple[Harness, Harness]]:
    """The DDM operator on the manager for a fresh namespace, a MultiKueue queue ``mk`` there whose ClusterQueue
    dispatches to ``worker``, and the same namespace and queue on the worker; the worker's kubeconfig also in the
    Secret WORKER_SECRET of that namespace, for DDMs that name it. Yields (manager, worker) harnesses."""
    ns = k8s_fleet_namespace
    manager = k8s_kueue
    kubeconfig = inline_kubeconfig(worker.user_kubeconfig("multikueue", ["system:masters"]))
    check, config, secret = f"{ns}-mk", f"{ns}-mk", f"{ns}-worker"
    manager.apply_yaml(_docs(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": KUEUE_NAMESPACE},
         "data": {"kubeconfig": base64.b64encode(kubeconfig.encode()).decode()}},
        {"apiVersion": KUEUE_API, "kind": "MultiKueueCluster", "metadata": {"name": WORKER},
         "spec": {"clusterSource": {"kubeConfig": {"locationType": "Secret", "location": secret}}}},
        {"apiVersion": KUEUE_API, "kind": "MultiKueueConfig", "metadata": {"name": config},
         "spec": {"clusters": [WORKER]}},
        {"apiVersion": KUEUE_API, "kind": "AdmissionCheck", "metadata": {"name": check},
         "spec": {"controllerName": MULTIKUEUE,
                  "parameters": {"apiGroup": "kueue.x-k8s.io", "kind": "MultiKueueConfig", "name": config}}},
        {"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": f"{ns}-{QUEUE}"},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                  "admissionChecksStrategy": {"admissionChecks": [{"name": check}]},
                  "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                      {"name": KUEUE_FLAVOR, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 8}]}]}]}},
        {"apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": QUEUE, "namespace": ns},
         "spec": {"clusterQueue": f"{ns}-{QUEUE}"}},
    ))
    worker.kubectl("create", "namespace", ns)
    worker.add_kueue_queue(ns, QUEUE, gpus=8)
    release, account = chart_account(ns)
    manager.apply_yaml(render_rbac(ns, release))
    op = Operator(manager.serviceaccount_kubeconfig(ns, account), ns, tmp_path / "operator.log")
    op.start()
    h, w = Harness(manager, ns), Harness(worker, ns)
    h.core.create_namespaced_secret(ns, {"metadata": {"name": WORKER_SECRET}, "stringData": {"kubeconfig": kubeconfig}})
    wait_for(lambda: _active(h, "admissionchecks", check), f"AdmissionCheck {check} Active", timeout=60)
    yield h, w
    op.stop()
    print(op.log())
    h.api.close()
    w.api.close()


def _active(h: Harness, plural: str, name: str) -> bool:
    obj = h.custom.get_cluster_custom_object("kueue.x-k8s.io", "v1beta2", plural, name)
    return any(c["type"] == "Active" and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def _spec(tmp_path: Path, **placement: Any) -> dict[str, Any]:
    """Clustering and experts (1 GPU each) on the MultiKueue queue; router and evaluation local."""
    base = {"nodeSelector": {"pool": "tainted"}, "tolerations": TOLERATE_GPU, "kueueQueueName": QUEUE,
            "podAnnotations": {RUN_MS_ANNOTATION: "500"}, **placement}
    return ddm_spec(2, tmp_path, experts={"modelPreset": "DiT-T/4", "steps": 100, "gpusPerNode": 1, "placement": base},
                    router={"gpusPerNode": 1, "placement": {"nodeSelector": {"pool": "gpu"}}},
                    evaluation={"gpusPerNode": 1, "placement": {"nodeSelector": {"pool": "gpu"}}})


def test_experts_through_multikueue_run_in_the_worker(multikueue: tuple[Harness, Harness], tmp_path: Path) -> None:
    """Clustering and 2 experts on the MultiKueue queue run as PyTorchJobs in the worker (pods on its kwok nodes);
    the router and evaluation run in the manager; the DDM Succeeds from the status Kueue mirrors back."""
    h, w = multikueue
    h.create("mk", _spec(tmp_path))
    uid = h.ddm("mk")["metadata"]["uid"]  # type: ignore[index]
    seen_jobs: dict[str, dict[str, Any]] = {}  # in the worker, while they exist: MultiKueue deletes them when done
    seen_pods: dict[str, tuple[str, str, str]] = {}  # worker pod uid -> (job, node, last phase seen)

    def done() -> bool:
        seen_jobs.update(w.jobs())
        for p in w.core.list_namespaced_pod(w.ns, label_selector=JOB_NAME_LABEL).items:
            seen_pods[p.metadata.uid] = (p.metadata.labels[JOB_NAME_LABEL], p.spec.node_name or "", p.status.phase)
        return h.status("mk").get("phase") == "Succeeded"

    wait_for(done, "mk Succeeded", timeout=150)
    status = h.status("mk")
    remote = ["mk-cluster-a1", "mk-expert-000-a1", "mk-expert-001-a1"]
    local_jobs = h.jobs()
    # Kueue's webhook set managedBy on the queued jobs; the manager's training operator made no pod for them
    assert all(local_jobs[n]["spec"]["runPolicy"].get("managedBy") == MULTIKUEUE for n in remote), local_jobs
    local_pods = {p.metadata.labels[JOB_NAME_LABEL] for p in h.core.list_namespaced_pod(
        h.ns, label_selector=JOB_NAME_LABEL).items}
    assert local_pods == {"mk-router-a1", "mk-evaluate-a1"}, local_pods
    # in the worker: the same jobs, run by its training operator on its nodes
    assert sorted(seen_jobs) == sorted(remote), seen_jobs
    assert all(seen_jobs[n]["metadata"]["labels"]["ddm.io/uid"] == uid for n in remote)
    assert all("managedBy" not in seen_jobs[n]["spec"]["runPolicy"] for n in remote)  # the worker's to run
    assert sorted(job for job, _, _ in seen_pods.values()) == sorted(remote), seen_pods  # one pod run each
    assert all(node.startswith("tainted-") for _, node, _ in seen_pods.values()), seen_pods
    assert "Succeeded" in {phase for _, _, phase in seen_pods.values()}, seen_pods
    # the manager's jobs carry the worker's final status (its conditions, copied by MultiKueue)
    assert all(any(c["type"] == "Succeeded" and c["reason"] == "PyTorchJobSucceeded"
                   for c in local_jobs[n]["status"]["conditions"]) for n in remote)
    # the manager's Workloads say where each ran
    workloads = h.custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", h.ns, "workloads")["items"]
    assert {wl["metadata"]["ownerReferences"][0]["name"]: wl["status"].get("clusterName") for wl in workloads} == {
        n: WORKER for n in remote}
    assert status["expertsReady"] == 2


def test_a_permanent_exit_code_in_the_worker_is_read_there(multikueue: tuple[Harness, Harness], tmp_path: Path
                                                           ) -> None:
    """With placement.multiKueueWorkers naming the worker's kubeconfig Secret, the operator reads the exit code of
    expert 1, which exits 3 there (a bad config): permanent, one pod run, no retry, the message names the code; the
    DDM ends Degraded on expert 0. MultiKueue copies only the job, and the job is all the worker's pods need: their
    stage config is their ddm.io/config annotation (no ConfigMap in the worker)."""
    h, w = multikueue
    spec = _spec(tmp_path, multiKueueWorkers={WORKER: WORKER_SECRET})
    spec["failurePolicy"] = {"maxRetriesPerExpert": 2, "backoffSeconds": 0, "minExperts": 1}
    base = spec["experts"]["placement"]
    spec["experts"]["overrides"] = [{"experts": [1], "placement": {**base, "podAnnotations": {EXIT_CODE_ANNOTATION: "3"}}}]
    h.create("mx", spec)
    uid = h.ddm("mx")["metadata"]["uid"]  # type: ignore[index]
    seen_pods: dict[str, str] = {}  # worker pod uid -> job
    seen_configmaps: set[str] = set()
    configured: set[str] = set()  # jobs whose worker pods carry their stage config

    def done() -> bool:
        for p in w.core.list_namespaced_pod(w.ns, label_selector=JOB_NAME_LABEL).items:
            seen_pods[p.metadata.uid] = p.metadata.labels[JOB_NAME_LABEL]
            if "run_uri" in (p.metadata.annotations or {}).get("ddm.io/config", ""):
                configured.add(p.metadata.labels[JOB_NAME_LABEL])
        seen_configmaps.update(w.configmaps(f"ddm.io/uid={uid}"))
        return h.status("mx").get("phase") == "Degraded"

    wait_for(done, "mx Degraded", timeout=150)
    experts = {e["index"]: e for e in h.status("mx")["experts"]}
    assert experts[1]["phase"] == "Failed" and experts[1]["retries"] == 0, experts[1]
    assert "exit code 3 (permanent)" in experts[1]["message"], experts[1]
    assert experts[0]["phase"] == "Succeeded"
    assert sorted(seen_pods.values()).count("mx-expert-001-a1") == 1 and "mx-expert-001-a2" not in h.jobs(), seen_pods
    # the manager's copy of the job never had a pod or a code: its condition is the worker's, mirrored
    failed = h.jobs()["mx-expert-001-a1"]["status"]["conditions"]
    assert any(c["type"] == "Failed" and "exit code" not in c["message"] for c in failed), failed
    assert {"mx-cluster-a1", "mx-expert-000-a1", "mx-expert-001-a1"} <= configured, configured
    assert not seen_configmaps, seen_configmaps
    h.custom.delete_namespaced_custom_object("ddm.io", "v1alpha1", h.ns, "decentralizeddiffusions", "mx")
    wait_for(lambda: h.ddm("mx") is None, "mx deleted")
