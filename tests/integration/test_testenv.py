"""The test control plane is a real Kubernetes: version, CRDs, status subresource, GC, namespace deletion, RBAC."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures.k8s import ControlPlane, KubectlError

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

EXPECTED_MINOR = "37"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def pytorchjob(name: str) -> dict[str, Any]:
    container = {"name": "pytorch", "image": "ddm-trainer:test", "command": ["ddm-train", "expert"]}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {"containers": [container]}}}}},
    }


def test_server_and_kubectl_report_v1_37(k8s_cluster: ControlPlane) -> None:
    versions = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    for side in ("clientVersion", "serverVersion"):
        assert versions[side]["gitVersion"].startswith(f"v1.{EXPECTED_MINOR}."), versions[side]
        assert versions[side]["minor"] == EXPECTED_MINOR


def test_kubeflow_crd_established_and_pytorchjob_status_patchable(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    with k8s_cluster.api_client() as api:
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition("pytorchjobs.kubeflow.org")
        established = {c.type: c.status for c in crd.status.conditions}
        assert established.get("Established") == "True"

        custom = client.CustomObjectsApi(api)
        group, version, plural = "kubeflow.org", "v1", "pytorchjobs"
        custom.create_namespaced_custom_object(group, version, k8s_namespace, plural, pytorchjob("expert-0"))
        status = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Test", "message": "done",
                                  "lastTransitionTime": "2026-01-01T00:00:00Z"}], "replicaStatuses": {}}
        custom.patch_namespaced_custom_object_status(
            group, version, k8s_namespace, plural, "expert-0", {"status": status}
        )
        job = custom.get_namespaced_custom_object(group, version, k8s_namespace, plural, "expert-0")
        assert job["status"]["conditions"][0]["type"] == "Succeeded"
        # The status subresource ignores status on the main resource: a spec-side write cannot clear it.
        custom.patch_namespaced_custom_object(
            group, version, k8s_namespace, plural, "expert-0", {"metadata": {"labels": {"a": "b"}}, "status": None}
        )
        job = custom.get_namespaced_custom_object(group, version, k8s_namespace, plural, "expert-0")
        assert job["status"]["conditions"][0]["type"] == "Succeeded"


def test_schema_of_real_crd_rejects_bad_field(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    bad = pytorchjob("bad")
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    with k8s_cluster.api_client() as api, pytest.raises(ApiException) as err:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "kubeflow.org", "v1", k8s_namespace, "pytorchjobs", bad
        )
    assert err.value.status == 422


def test_owner_reference_garbage_collection(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "owner"}})
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
        core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}})
        core.delete_namespaced_config_map("owner", k8s_namespace)

        def child_gone() -> bool:
            try:
                core.read_namespaced_config_map("child", k8s_namespace)
            except ApiException as err:
                return err.status == 404
            return False

        wait_for(child_gone, 90, "the garbage collector to delete the child ConfigMap")


def test_namespace_deletion_completes(k8s_cluster: ControlPlane) -> None:
    with k8s_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "ddm-doomed"}})
        core.create_namespaced_config_map("ddm-doomed", {"metadata": {"name": "inside"}})
        core.delete_namespace("ddm-doomed")

        def namespace_gone() -> bool:
            try:
                core.read_namespace("ddm-doomed")
            except ApiException as err:
                return err.status == 404
            return False

        wait_for(namespace_gone, 90, "namespace ddm-doomed to finish Terminating")


def test_rbac_user_only_gets_what_is_granted(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    k8s_cluster.apply_yaml(
        f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-reader, namespace: {k8s_namespace}}}
rules:
- {{apiGroups: [""], resources: [configmaps], verbs: [get, list]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: readers, namespace: {k8s_namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-reader}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: ddm-readers}}
"""
    )
    reader = k8s_cluster.user_kubeconfig("alice", ["ddm-readers"])
    outsider = k8s_cluster.user_kubeconfig("bob")
    assert k8s_cluster.kubectl("get", "configmaps", "-n", k8s_namespace, kubeconfig=reader).returncode == 0
    denied = k8s_cluster.kubectl("create", "configmap", "x", "-n", k8s_namespace, kubeconfig=reader, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    assert 'User "alice" cannot create resource "configmaps"' in denied.stderr
    with pytest.raises(KubectlError, match="forbidden"):
        k8s_cluster.kubectl("get", "configmaps", "-n", k8s_namespace, kubeconfig=outsider)


def test_serviceaccount_token_authenticates(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    kubeconfig = k8s_cluster.serviceaccount_kubeconfig(k8s_namespace, "runner")
    who = json.loads(k8s_cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{k8s_namespace}:runner"


def test_second_control_plane_is_independent(k8s_cluster: ControlPlane, k8s_cluster_b: ControlPlane) -> None:
    assert k8s_cluster.server != k8s_cluster_b.server
    k8s_cluster.kubectl("create", "namespace", "only-in-a")
    assert k8s_cluster_b.kubectl("get", "namespace", "only-in-a", check=False).returncode != 0
    # CRDs are installed in both, and each plane's CA is its own: B does not accept A's admin client certificate.
    k8s_cluster_b.kubectl("get", "crd", "pytorchjobs.kubeflow.org")
    foreign = json.loads(k8s_cluster.kubeconfig.read_text())
    foreign["clusters"][0]["cluster"] = {"server": k8s_cluster_b.server, "certificate-authority": str(k8s_cluster_b.ca_path)}
    foreign_path = k8s_cluster_b.workdir / "foreign.kubeconfig"
    foreign_path.write_text(json.dumps(foreign))
    rejected = k8s_cluster_b.kubectl("get", "namespaces", kubeconfig=foreign_path, check=False)
    assert rejected.returncode != 0 and ("forbidden" in rejected.stderr or "Unauthorized" in rejected.stderr)
    k8s_cluster.kubectl("delete", "namespace", "only-in-a", "--wait=false")
