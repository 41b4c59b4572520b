"""operator/ddm_operator/k8s/core_api.py against a real API server: the seven core/v1 requests the operator makes,
answered as the JSON the server sent, errors as kubernetes' ApiException (the operator's 409 adoption and 404
handling depend on it), without importing kubernetes' CoreV1Api (20 MiB of the operator's memory)."""
from __future__ import annotations

import base64
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.k8s]


def test_core_requests_answer_the_servers_json(k8s_cluster: Any, k8s_namespace: str) -> None:
    from kubernetes import client

    from ddm_operator.k8s.core_api import CoreApi

    ns, admin = k8s_namespace, client.CoreV1Api(k8s_cluster.api_client())
    core = CoreApi(k8s_cluster.api_client())
    labels = {"ddm.io/uid": "u1"}
    made = core.create_namespaced_config_map(ns, {"metadata": {"name": "c1", "labels": labels}, "data": {"k": "v"}},
                                             _request_timeout=10)
    assert made["metadata"]["name"] == "c1" and made["data"] == {"k": "v"} and made["metadata"]["uid"]
    with pytest.raises(client.ApiException) as conflict:  # what _create_or_adopt turns into a read
        core.create_namespaced_config_map(ns, {"metadata": {"name": "c1"}, "data": {}})
    assert conflict.value.status == 409
    assert core.read_namespaced_config_map("c1", ns)["metadata"]["uid"] == made["metadata"]["uid"]
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c2"}, "data": {}})  # no label: must survive

    admin.create_namespaced_secret(ns, {"metadata": {"name": "s1"}, "data": {"kubeconfig": base64.b64encode(
        b"apiVersion: v1").decode()}})
    secret = core.read_namespaced_secret("s1", ns)
    assert base64.b64decode(secret["data"]["kubeconfig"]) == b"apiVersion: v1"
    assert secret["metadata"]["resourceVersion"]  # what ClusterClients and StoreClients key their clients on
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_secret("nope", ns)
    assert missing.value.status == 404

    admin.create_namespaced_pod(ns, {"metadata": {"name": "p1", "labels": {"training.kubeflow.org/job-name": "j1"}},
                                     "spec": {"containers": [{"name": "pytorch", "image": "x"}]}})
    admin.create_namespaced_pod(ns, {"metadata": {"name": "p2"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})
    pods = core.list_namespaced_pod(ns, label_selector="training.kubeflow.org/job-name=j1")["items"]
    assert [p["metadata"]["name"] for p in pods] == ["p1"]
    assert pods[0]["spec"]["containers"][0]["name"] == "pytorch"

    for name, reason in (("e1", "ExitedWithCode"), ("e2", "Other")):
        admin.create_namespaced_event(ns, {"metadata": {"name": name}, "reason": reason,
                                           "message": "Pod: x.y exited with code 137",
                                           "involvedObject": {"name": "j1", "namespace": ns, "kind": "PyTorchJob"}})
    events = core.list_namespaced_event(ns, field_selector="involvedObject.name=j1,reason=ExitedWithCode")["items"]
    assert [(e["metadata"]["name"], e["reason"]) for e in events] == [("e1", "ExitedWithCode")]

    core.delete_collection_namespaced_config_map(ns, label_selector="ddm.io/uid=u1")
    left = {c.metadata.name for c in admin.list_namespaced_config_map(ns).items}
    assert "c1" not in left and "c2" in left


def test_the_operator_never_imports_core_v1_api() -> None:
    """The operator's handlers and every client they build: kubernetes' CoreV1Api stays unimported."""
    code = ("import sys\nfrom ddm_operator.k8s import handlers\nhandlers._core(handlers.own_client())\n"
            "print(sorted(m for m in sys.modules if m.endswith('core_v1_api')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"KUBECONFIG": "/nonexistent", "PATH": "/usr/bin:/bin", **_pythonpath()})
    assert out.stdout.strip() == "[]", out.stdout


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME")}


@pytest.mark.parametrize("prompts", [1, 80], ids=["config in the job", "config too large: a ConfigMap"])
def test_the_stage_pod_template_passes_the_api_servers_pod_validation(k8s_cluster: Any, k8s_namespace: str,
                                                                       prompts: int) -> None:
    """The pod template of a stage's PyTorchJob, created as a Pod on the real API server: the CRD does not check
    its nested pod spec, the training operator's pods do, so a template the server refuses would fail only once
    a job ran. A config that fits rides in the annotation a downward API volume mounts (the server checks the
    fieldRef and the annotations' 256 KiB); a larger one names its ConfigMap, and the server takes the ConfigMap."""
    from kubernetes import client

    from ddm_operator.k8s import builders as b

    ns, admin = k8s_namespace, client.CoreV1Api(k8s_cluster.api_client())
    config = {"run_uri": "s3://bucket/run", "prompts": ["a photo of a cat " * 60] * prompts}  # ~1 KiB each
    req = b.JobRequest(owner=b.Owner(name="d", namespace=ns, uid="u-1"), key="evaluate", attempt=1,
                       image="registry.example/ddm-trainer:1", command=["ddm-train", "evaluate", "--config",
                                                                        f"{b.CONFIG_DIR}/{b.CONFIG_FILE}"],
                       config=config)
    in_job = b.config_in_job(req)
    assert in_job == (prompts == 1)
    if not in_job:  # the server's answer, not a later read: its owner (a made-up DDM) does not exist, so the
        # garbage collector of the test's control plane may delete it at any moment
        made = admin.create_namespaced_config_map(ns, b.build_configmap(req))
        assert made.data[b.CONFIG_FILE] == req.config_text
    template = b.build_pytorchjob(req)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    pod = admin.create_namespaced_pod(ns, {"metadata": {"name": "stage", **template["metadata"]},
                                           "spec": template["spec"]})
    volume = next(v for v in pod.spec.volumes if v.name == "config")
    if in_job:
        assert volume.downward_api.items[0].field_ref.field_path == f"metadata.annotations['{b.ANNOTATION_CONFIG}']"
        assert pod.metadata.annotations[b.ANNOTATION_CONFIG] == req.config_text
    else:
        assert volume.config_map.name == req.name and b.ANNOTATION_CONFIG not in (pod.metadata.annotations or {})
