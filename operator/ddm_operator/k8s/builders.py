"""Pure builders: a DecentralizedDiffusion's stage -> the child manifests as plain dicts: either a PyTorchJob
(Kubeflow training operator v1) or a TrainingRuntime + TrainJob (Kubeflow Trainer v2), by ``Backend``, and a
ConfigMap only for a stage config too large to travel in the job itself (``config_in_job``).

No API calls here. Names are deterministic (``<ddm>-<stage-key>-a<attempt>``) so a handler that runs twice
creates nothing twice: the second create gets 409 Conflict and adopts the existing object.

Stage keys: ``cluster``, ``expert-003``, ``router``, ``evaluate``, ``distill`` (the expert key carries its index).
"""
from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..api.models import STORE_MOUNT_PATH

GROUP = "ddm.io"
API_VERSION = "ddm.io/v1alpha1"
KIND = "DecentralizedDiffusion"
PYTORCHJOB_API_VERSION = "kubeflow.org/v1"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
TRAINER_API_VERSION = f"{TRAINER_GROUP}/{TRAINER_VERSION}"
TRAININGRUNTIME_PLURAL = "trainingruntimes"

LABEL_NAME = "ddm.io/name"
LABEL_UID = "ddm.io/uid"
LABEL_STAGE = "ddm.io/stage"
LABEL_EXPERT = "ddm.io/expert"
LABEL_ATTEMPT = "ddm.io/attempt"
LABEL_KEY = "ddm.io/key"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_ORIGIN = "ddm.io/origin"  # "<namespace>/<name>/<uid>" of the DDM, on children in remote clusters
ANNOTATION_CONFIG = "ddm.io/config"  # the stage config (YAML) on the pod template, a file through the downward API

CONFIG_DIR = "/etc/ddm"
CONFIG_FILE = "config.yaml"
# A pod's annotations may hold 256 KiB in all (apimachinery TotalAnnotationSizeLimitB) and placement.podAnnotations
# up to 32 x 4 KiB of them: a config up to this size rides in the pod template, a larger one (evaluation.prompts:
# 64 prompts of 1,024 characters, escaped when not ASCII) in a ConfigMap. Stage configs are about 0.5 KiB.
CONFIG_IN_JOB_MAX_BYTES = 64 * 1024
CONTAINER_NAME = "pytorch"  # the training operator requires this container name
# Trainer v2 (pkg/constants/constants.go): the torch plugin finds the trainer's container as the container "node" of
# the replicated job labelled with the ancestor step "trainer", and injects PET_* there (plugins/torch/torch.go).
TRAINER_NODE = "node"
TRAINER_ANCESTOR_LABEL, TRAINER_ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer"
STORE_VOLUME = "store"  # spec.storage.volumeClaim, mounted at STORE_MOUNT_PATH
# Pods of a PyTorchJob are "<job>-worker-<i>" and get a headless Service of the same name: keep room for it.
MAX_CHILD_NAME = 52
MAX_LABEL_VALUE = 63
# The `restricted` Pod Security Standard, met by every pod we create (GPUs are resources, not privileges): the
# trainer image runs as a numeric non-root USER (Dockerfile.trainer), so runAsNonRoot can be checked by the kubelet.
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class Backend:
    """The kind of job a stage attempt becomes: where it lives in the API and how its pods are found."""

    name: str  # the operator setting DDM_JOB_BACKEND
    kind: str
    group: str
    version: str
    plural: str
    container: str  # the trainer's container in the job's pods
    pod_job_label: str  # the label that names the job on each of its pods

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


# The training operator labels its pods training.kubeflow.org/job-name (apis/kubeflow.org/v1 common_types.go).
PYTORCHJOB = Backend("pytorchjob", "PyTorchJob", PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL,
                     CONTAINER_NAME, "training.kubeflow.org/job-name")
# A TrainJob becomes a JobSet of the same name (plugins/jobset/jobset.go Build), whose Jobs and pods carry
# jobset.sigs.k8s.io/jobset-name (sigs.k8s.io/jobset api/jobset/v1alpha2/jobset_types.go JobSetNameKey).
TRAINJOB = Backend("trainjob", "TrainJob", TRAINER_GROUP, TRAINER_VERSION, "trainjobs", TRAINER_NODE,
                   "jobset.sigs.k8s.io/jobset-name")
BACKENDS = {b.name: b for b in (PYTORCHJOB, TRAINJOB)}


def backend_named(name: str) -> Backend:
    """The backend of the operator setting DDM_JOB_BACKEND; a clear error for anything else."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"DDM_JOB_BACKEND={name!r}: expected one of {', '.join(sorted(BACKENDS))}") from None


def parse_key(key: str) -> tuple[str, int | None]:
    """``"expert-003"`` -> ``("expert", 3)``; ``"router"`` -> ``("router", None)``."""
    stage, sep, index = key.partition("-")
    if sep and index.isdigit():
        return stage, int(index)
    return key, None


def expert_key(k: int) -> str:
    return f"expert-{k:03d}"


def _shorten(value: str, limit: int) -> str:
    """Keep a name within ``limit`` characters; a long one keeps a readable head and a hash of the whole."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[: limit - 9].rstrip('-.')}-{digest}"


def child_name(ddm_name: str, key: str, attempt: int) -> str:
    """The one name of a stage's attempt: ``mnist-expert-003-a1``. Long DDM names are shortened with a hash."""
    suffix = f"-{key}-a{attempt}"
    return _shorten(ddm_name, MAX_CHILD_NAME - len(suffix)) + suffix


@dataclass(frozen=True)
class Owner:
    """The DecentralizedDiffusion a child belongs to."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Placement:
    """Where a stage's pods run (Kubernetes field names, passed through as given)."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # {"requests": {...}, "limits": {"nvidia.com/gpu": 1}}
    priority_class_name: str | None = None
    queue_name: str | None = None  # Kueue LocalQueue
    target_cluster: str | None = None  # Secret (in the DDM's namespace) holding the kubeconfig of another cluster
    multi_kueue_workers: dict[str, str] = field(default_factory=dict)  # MultiKueueCluster name -> kubeconfig Secret
    pod_labels: dict[str, str] = field(default_factory=dict)
    pod_annotations: dict[str, str] = field(default_factory=dict)


def placement_from_dict(d: dict[str, Any] | None) -> Placement:
    """Accept the spec's camelCase (or snake_case) placement mapping."""
    d = d or {}

    def get(camel: str, snake: str) -> Any:
        return d.get(camel, d.get(snake))

    return Placement(
        node_selector=dict(get("nodeSelector", "node_selector") or {}),
        tolerations=list(get("tolerations", "tolerations") or []),
        affinity=get("affinity", "affinity") or None,
        resources=dict(get("resources", "resources") or {}),
        priority_class_name=get("priorityClassName", "priority_class_name"),
        queue_name=get("kueueQueueName", "kueue_queue_name") or get("queueName", "queue_name"),
        target_cluster=get("targetCluster", "target_cluster"),
        multi_kueue_workers=dict(get("multiKueueWorkers", "multi_kueue_workers") or {}),
        pod_labels=dict(get("podLabels", "pod_labels") or {}),
        pod_annotations=dict(get("podAnnotations", "pod_annotations") or {}),
    )


@dataclass(frozen=True)
class JobRequest:
    """Everything needed to build one stage attempt's children."""

    owner: Owner
    key: str
    attempt: int
    image: str
    command: list[str]  # e.g. ["ddm-train", "expert", "--config", "/etc/ddm/config.yaml"]
    config: dict[str, Any]  # the trainer stage config, read by the container at CONFIG_DIR/CONFIG_FILE
    nodes: int = 1
    placement: Placement = field(default_factory=Placement)
    credentials_secret: str | None = None  # envFrom: DDM_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    volume_claim: str | None = None  # a ReadWriteMany PVC holding a file:// store, mounted at STORE_MOUNT_PATH
    suspend: bool = False
    image_pull_policy: str = "IfNotPresent"
    service_account_name: str | None = None
    termination_grace_period_seconds: int | None = None  # after SIGTERM: time for the checkpoint to commit

    @property
    def name(self) -> str:
        return child_name(self.owner.name, self.key, self.attempt)

    @property
    def remote(self) -> bool:
        return self.placement.target_cluster is not None

    @functools.cached_property
    def config_text(self) -> str:
        """The stage config as the container reads it, dumped once: a launch asks whether it fits in the job and
        then builds the job with it (~0.6 ms a dump, 900 launches at the clustering boundary of 100 DDMs)."""
        return yaml.safe_dump(self.config, sort_keys=True)


def label_value(value: str) -> str:
    return _shorten(value, MAX_LABEL_VALUE)


def selector_labels(owner: Owner) -> dict[str, str]:
    """Labels that select every child of one DDM (by uid: a recreated DDM of the same name is a new run)."""
    return {LABEL_NAME: label_value(owner.name), LABEL_UID: owner.uid}


def child_labels(owner: Owner, key: str, attempt: int) -> dict[str, str]:
    stage, index = parse_key(key)
    labels = {**selector_labels(owner), LABEL_STAGE: stage, LABEL_KEY: key, LABEL_ATTEMPT: str(attempt)}
    if index is not None and stage == "expert":  # probe-NNN's number counts experts, it names none
        labels[LABEL_EXPERT] = f"{index:03d}"
    return labels


def owner_reference(owner: Owner) -> dict[str, Any]:
    """Garbage collection deletes the child with the DDM; blockOwnerDeletion keeps foreground deletion honest."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(req: JobRequest, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": req.name, "namespace": req.owner.namespace, "labels": labels}
    if req.remote:  # owner references cannot cross clusters: the deletion finalizer removes these
        meta["annotations"] = {ANNOTATION_ORIGIN: f"{req.owner.namespace}/{req.owner.name}/{req.owner.uid}"}
    else:
        meta["ownerReferences"] = [owner_reference(req.owner)]
    return meta


def config_in_job(req: JobRequest) -> bool:
    """Whether the stage config travels in the job's pod template (an annotation the downward API mounts as the
    config file): one create per stage attempt, and a MultiKueue worker needs nothing but the job. Otherwise it is
    a ConfigMap of the job's name (``build_configmap``), created before the job."""
    return len(req.config_text.encode()) <= CONFIG_IN_JOB_MAX_BYTES


def build_configmap(req: JobRequest) -> dict[str, Any]:
    """The stage config the container reads at /etc/ddm/config.yaml, when it is too large for the job itself."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(req, child_labels(req.owner, req.key, req.attempt)),
        "data": {CONFIG_FILE: req.config_text},
    }


def _config_volume(req: JobRequest) -> tuple[dict[str, Any], dict[str, str]]:
    """The volume that holds CONFIG_FILE, and the pod annotations it reads (none for a ConfigMap)."""
    if not config_in_job(req):
        return {"name": "config", "configMap": {"name": req.name}}, {}
    item = {"path": CONFIG_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_CONFIG}']"}}
    return {"name": "config", "downwardAPI": {"items": [item]}}, {ANNOTATION_CONFIG: req.config_text}


def _pod_template(req: JobRequest, labels: dict[str, str], container_name: str = CONTAINER_NAME) -> dict[str, Any]:
    p = req.placement
    container: dict[str, Any] = {
        "name": container_name,
        "image": req.image,
        "imagePullPolicy": req.image_pull_policy,
        "command": list(req.command),
        "env": [{"name": "DDM_STAGE_KEY", "value": req.key}, {"name": "DDM_ATTEMPT", "value": str(req.attempt)}],
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if req.credentials_secret:  # the whole Secret as env, read when the pod starts; values never in the manifest
        container["envFrom"] = [{"secretRef": {"name": req.credentials_secret}}]
    config_volume, config_annotations = _config_volume(req)
    volumes: list[dict[str, Any]] = [config_volume]
    if req.volume_claim:  # the run store shared by every stage (a PVC volume is allowed by `restricted`)
        container["volumeMounts"].append({"name": STORE_VOLUME, "mountPath": STORE_MOUNT_PATH})
        volumes.append({"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": req.volume_claim}})
    if p.resources:
        container["resources"] = p.resources
    spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": volumes,
    }
    if p.node_selector:
        spec["nodeSelector"] = dict(p.node_selector)
    if p.tolerations:
        spec["tolerations"] = list(p.tolerations)
    if p.affinity:
        spec["affinity"] = p.affinity
    if p.priority_class_name:
        spec["priorityClassName"] = p.priority_class_name
    if req.service_account_name:
        spec["serviceAccountName"] = req.service_account_name
    if req.termination_grace_period_seconds is not None:
        spec["terminationGracePeriodSeconds"] = req.termination_grace_period_seconds
    metadata: dict[str, Any] = {"labels": {**p.pod_labels, **labels}}  # ours win: they select the children
    if annotations := {**p.pod_annotations, **config_annotations}:  # ours win: the container reads it
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def build_pytorchjob(req: JobRequest) -> dict[str, Any]:
    """A PyTorchJob: one Master, ``nodes - 1`` Workers, ``restartPolicy: Never``.

    One retry layer, the DDM operator's: a failed pod fails the job, and the operator makes a new attempt (a new
    job) when the exit code is retryable and ``spec.failurePolicy`` allows one, so a stage's pods run exactly
    1 + max retries times at most. Not ``ExitCode``: the training operator v1.9 then deletes and recreates a pod
    that exited 128-255 with no limit at all (pkg/controller.v1/common/pod.go; ``backoffLimit`` only counts
    container restarts, which a recreated pod does not have), so a stage preempted for ever would never fail.

    A job placed on a Kueue queue is created without ``runPolicy.suspend``: Kueue's webhook suspends it and Kueue
    alone unsuspends it on admission.
    """
    labels = child_labels(req.owner, req.key, req.attempt)
    job_labels = dict(labels)
    if req.placement.queue_name:
        job_labels[LABEL_QUEUE] = req.placement.queue_name
    template = _pod_template(req, labels)
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if req.nodes > 1:
        replicas["Worker"] = {"replicas": req.nodes - 1, "restartPolicy": "Never", "template": template}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None"}  # failed pods stay: their exit codes are read
    if not req.placement.queue_name:
        run_policy["suspend"] = req.suspend
    return {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": "PyTorchJob",
        "metadata": _metadata(req, job_labels),
        "spec": {
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


# torchrun's rendezvous address: the training operator sets MASTER_ADDR/MASTER_PORT, Trainer v2's torch plugin sets
# PET_MASTER_ADDR/PET_MASTER_PORT (pkg/constants TorchEnvMasterAddr/Port, plugins/torch/torch.go EnforceMLPolicy).
_RDZV_V1, _RDZV_V2 = "$(MASTER_ADDR):$(MASTER_PORT)", "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"


def build_training_runtime(req: JobRequest) -> dict[str, Any]:
    """The TrainingRuntime of one stage attempt (same name, owner and labels as its TrainJob): torch
    distributed, one replicated job ``node`` whose pod template is the stage's whole pod (placement, security
    context, config volume, the credentials Secret as envFrom, priority class). One per attempt rather than one
    shared runtime because a TrainJob's own overrides (spec.runtimePatches, PodSpecPatch/ContainerPatch in
    pkg/apis/trainer/v1alpha1/trainjob_types.go) cannot carry envFrom, priorityClassName or imagePullPolicy.

    One retry layer, the DDM operator's, as for the PyTorchJob: pods ``restartPolicy: Never``, the Job
    ``backoffLimit: 0`` and no JobSet failurePolicy (JobSet then fails on the first failed Job, maxRestarts 0:
    sigs.k8s.io/jobset pkg/controllers/failure_policy.go), so a failed pod fails the TrainJob and the operator
    decides on a new attempt from the pod's exit code.
    """
    labels = child_labels(req.owner, req.key, req.attempt)
    template = _pod_template(req, labels, TRAINER_NODE)
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": TRAINER_API_VERSION,
        "kind": "TrainingRuntime",
        "metadata": _metadata(req, labels),
        "spec": {
            "mlPolicy": {"numNodes": req.nodes, "torch": {}},
            "template": {"spec": {"replicatedJobs": [{
                "name": TRAINER_NODE, "replicas": 1,
                "template": {"metadata": {"labels": {TRAINER_ANCESTOR_LABEL: TRAINER_ANCESTOR}},
                             "spec": {"backoffLimit": 0, "template": template}},
            }]}},
        },
    }


def build_trainjob(req: JobRequest) -> dict[str, Any]:
    """A TrainJob on its own TrainingRuntime (``build_training_runtime``): the trainer image, command and node
    count in spec.trainer, where Trainer v2 expects them; GPUs in resourcesPerNode. On a Kueue queue it is created
    without spec.suspend (Kueue's webhook suspends it), as the PyTorchJob is."""
    job_labels = child_labels(req.owner, req.key, req.attempt)
    if req.placement.queue_name:
        job_labels[LABEL_QUEUE] = req.placement.queue_name
    trainer: dict[str, Any] = {"image": req.image, "numNodes": req.nodes,
                               "command": [arg.replace(_RDZV_V1, _RDZV_V2) for arg in req.command]}
    if req.placement.resources:
        trainer["resourcesPerNode"] = req.placement.resources
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": "TrainingRuntime", "name": req.name},
        "trainer": trainer,
    }
    if not req.placement.queue_name:
        spec["suspend"] = req.suspend
    return {"apiVersion": TRAINER_API_VERSION, "kind": "TrainJob", "metadata": _metadata(req, job_labels), "spec": spec}


def build_job(req: JobRequest, backend: Backend) -> list[dict[str, Any]]:
    """The job objects of one stage attempt, in creation order (a runtime before its TrainJob); a ConfigMap, when
    the config does not travel in the job (``config_in_job``), precedes them all."""
    if backend is TRAINJOB:
        return [build_training_runtime(req), build_trainjob(req)]
    return [build_pytorchjob(req)]


def suspend_patch(suspend: bool, backend: Backend = PYTORCHJOB) -> dict[str, Any]:
    """Merge patch for suspend/resume of a running job (PyTorchJob runPolicy.suspend, TrainJob spec.suspend)."""
    if backend is TRAINJOB:
        return {"spec": {"suspend": suspend}}
    return {"spec": {"runPolicy": {"suspend": suspend}}}
