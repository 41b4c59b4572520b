"""The chart installed for real (helm install/upgrade into the test control plane) and least privilege checked by the
API server itself: RBAC answers for the operator's ServiceAccount, PodSecurity admission of every pod template the
operator creates, and the operator (run as that ServiceAccount, with the Deployment's env) refusing an image."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.k8s import fresh_namespace, helm_binary

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ddm-operator"
CASES = ROOT / "tests" / "api_cases" / "valid"
GROUP, VERSION, PLURAL = "ddm.io", "v1alpha1", "decentralizeddiffusions"
UPGRADE_GROUP = "upgrade-test.ddm.example"  # the upgrade test's own copy of the CRD: the shared one stays untouched


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if last := check():
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture
def helm(k8s_cluster: Any) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not built (scripts/testenv-build.sh --extras)")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, "--kubeconfig", str(k8s_cluster.kubeconfig), *args], check=check,
                              capture_output=True, text=True)
    return run


def can_i(plane: Any, sa: str, *args: str) -> bool:
    out = plane.kubectl("auth", "can-i", *args, f"--as={sa}", check=False)
    return out.stdout.strip() == "yes"


def chart_copy(tmp_path: Path, name: str, extra_field: bool) -> Path:
    """The chart with its CRD in UPGRADE_GROUP, optionally with one more spec field (`notes`)."""
    from ddm_operator.api.crd import CRD_NAME, generate_crd, render_chart_crd

    dest = tmp_path / name
    shutil.copytree(CHART, dest)
    crd = generate_crd()
    crd["metadata"]["name"] = CRD_NAME.replace(GROUP, UPGRADE_GROUP)
    crd["spec"]["group"] = UPGRADE_GROUP
    if extra_field:
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["notes"] = {"type": "string", "maxLength": 200, "description": "Free text (added by the upgrade)."}
        chart = yaml.safe_load((dest / "Chart.yaml").read_text())
        chart["version"] = "0.1.1"
        (dest / "Chart.yaml").write_text(yaml.safe_dump(chart))
    (dest / "templates" / "crd.yaml").write_text(render_chart_crd(crd))
    return dest


def test_default_install_then_upgrade_makes_a_new_crd_field_usable(k8s_cluster: Any, k8s_namespace: str, helm: Any,
                                                                  tmp_path: Path) -> None:
    """Default values; release `ddm` names everything `ddm-operator`; the ServiceAccount may get a named Secret but
    never list or watch Secrets; `helm upgrade` to a chart whose CRD gained a field makes it usable; uninstall keeps
    the CRD."""
    ns, release = k8s_namespace, "ddm"
    crd_name = f"{PLURAL}.{UPGRADE_GROUP}"
    helm("install", release, str(chart_copy(tmp_path, "v1", extra_field=False)), "--namespace", ns)
    try:
        manifest = [d for d in yaml.safe_load_all(helm("get", "manifest", release, "--namespace", ns).stdout) if d]
        names = {(d["kind"], d["metadata"]["name"]) for d in manifest}
        assert {("Deployment", "ddm-operator"), ("ServiceAccount", "ddm-operator"),
                ("ClusterRole", "ddm-operator-application"), ("CustomResourceDefinition", crd_name)} <= names, names
        crd = json.loads(k8s_cluster.kubectl("get", "crd", crd_name, "-o", "json").stdout)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        sa = f"system:serviceaccount:{ns}:ddm-operator"
        assert not can_i(k8s_cluster, sa, "list", "secrets", "--all-namespaces")
        assert not can_i(k8s_cluster, sa, "watch", "secrets", "--all-namespaces")
        assert not can_i(k8s_cluster, sa, "list", "secrets", "--namespace", ns)
        assert can_i(k8s_cluster, sa, "get", "secrets", "--namespace", ns)  # by name: a DDM's credentialsSecret
        assert not can_i(k8s_cluster, sa, "delete", "pytorchjobs.kubeflow.org", "--all-namespaces")

        body = yaml.safe_load((CASES / "minimal.yaml").read_text())
        body["apiVersion"] = f"{UPGRADE_GROUP}/{VERSION}"
        body["metadata"] = {"name": "with-notes", "namespace": ns}
        body["spec"]["notes"] = "added in 0.1.1"
        refused = k8s_cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(body), check=False)
        assert refused.returncode != 0 and 'unknown field "spec.notes"' in refused.stderr, refused.stderr

        helm("upgrade", release, str(chart_copy(tmp_path, "v2", extra_field=True)), "--namespace", ns)
        # the API server serves the new schema a moment after the CRD is updated
        wait_for(lambda: k8s_cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(body), check=False).returncode == 0,
                 "a DDM with spec.notes accepted after the upgrade", timeout=30)
        got = json.loads(k8s_cluster.kubectl("get", crd_name, "with-notes", "-n", ns, "-o", "json").stdout)
        assert got["spec"]["notes"] == "added in 0.1.1"  # stored, not pruned
    finally:
        helm("uninstall", release, "--namespace", ns, check=False)
    assert k8s_cluster.kubectl("get", "crd", crd_name, check=False).returncode == 0  # kept
    k8s_cluster.kubectl("delete", "crd", crd_name, "--wait=false", check=False)


class OperatorProcess:
    """The operator with the command, args and env of the Deployment the release installed."""

    def __init__(self, deployment: dict[str, Any], kubeconfig: Path, log: Path) -> None:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.command = [str(Path(sys.executable).parent / container["command"][0]), *container["args"]]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DDM_"))}
        env.update({e["name"]: e["value"] for e in container["env"] if "value" in e}, KUBECONFIG=str(kubeconfig))
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OperatorProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def __exit__(self, *_: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def test_single_namespace_install_confines_the_operator_and_refuses_other_images(
        k8s_cluster: Any, k8s_namespace: str, helm: Any, tmp_path: Path) -> None:
    """watchNamespaces={ns}, crds.enabled=false (the shared CRD is not this release's): Roles only in ns, nothing on
    Secrets elsewhere; the operator, run as its ServiceAccount with the Deployment's env, refuses a DDM whose image
    is outside allowedTrainerImages (Failed, no job, the image and the setting named) and launches an allowed one."""
    from kubernetes import client

    ns = k8s_namespace
    release = f"ddm-{ns}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    helm("install", release, str(CHART), "--namespace", ns, "--set", f"watchNamespaces={{{ns}}}",
         "--set", "crds.enabled=false", "--set", f"livenessProbe.port={port}")
    try:
        manifest = [d for d in yaml.safe_load_all(helm("get", "manifest", release, "--namespace", ns).stdout) if d]
        kinds = {d["kind"] for d in manifest}
        assert "CustomResourceDefinition" not in kinds and {"Role", "RoleBinding"} <= kinds
        (deployment,) = [d for d in manifest if d["kind"] == "Deployment"]
        fullname = deployment["metadata"]["name"]
        assert fullname == f"{release}-ddm-operator"
        sa = f"system:serviceaccount:{ns}:{fullname}"
        assert not can_i(k8s_cluster, sa, "list", "secrets", "--all-namespaces")
        assert not can_i(k8s_cluster, sa, "get", "secrets", "--namespace", "default")
        assert not can_i(k8s_cluster, sa, "list", "decentralizeddiffusions.ddm.io", "--namespace", "default")
        assert can_i(k8s_cluster, sa, "create", "pytorchjobs.kubeflow.org", "--namespace", ns)

        api = k8s_cluster.api_client()
        custom = client.CustomObjectsApi(api)

        def create(name: str, image: str) -> None:
            body = yaml.safe_load((CASES / "minimal.yaml").read_text())
            body["metadata"] = {"name": name, "namespace": ns}
            body["spec"]["trainerImage"] = image
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

        def status(name: str) -> dict[str, Any]:
            return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}

        def jobs() -> list[str]:
            items = custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")["items"]
            return [j["metadata"]["name"] for j in items]

        kubeconfig = k8s_cluster.serviceaccount_kubeconfig(ns, fullname)
        with OperatorProcess(deployment, kubeconfig, tmp_path / "operator.log") as op:
            create("evil", "evil.example/miner:latest")
            try:
                st = wait_for(lambda: (s := status("evil")).get("phase") == "Failed" and s, "the DDM refused")
                create("good", "ghcr.io/ddm/ddm-trainer:0.1.0")
                wait_for(lambda: [j for j in jobs() if j.startswith("good-")], "the allowed DDM's first job")
            except AssertionError:
                raise AssertionError((tmp_path / "operator.log").read_text()[-3000:]) from None
            assert op.proc is not None and op.proc.poll() is None
        message = st["message"]
        for needle in ("spec.trainerImage", "evil.example/miner:latest", "DDM_ALLOWED_TRAINER_IMAGES",
                       "allowedTrainerImages", "ghcr.io/ddm/ddm-trainer:*"):
            assert needle in message, message
        assert not [j for j in jobs() if j.startswith("evil-")]
        events = client.CoreV1Api(api).list_namespaced_event(ns, field_selector="involvedObject.name=evil").items
        assert any("evil.example/miner:latest" in (e.message or "") for e in events)
    finally:
        helm("uninstall", release, "--namespace", ns, check=False)


@pytest.fixture
def restricted_namespace(k8s_cluster: Any) -> Iterator[str]:
    with fresh_namespace(k8s_cluster, "psa") as ns:
        k8s_cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
                            "pod-security.kubernetes.io/enforce-version=latest")
        yield ns


def test_restricted_namespace_admits_every_pod_template_the_operator_creates(k8s_cluster: Any,
                                                                           restricted_namespace: str) -> None:
    """Every stage's PyTorchJob and TrainingRuntime (GPUs, multi-node workers, the placement case's tolerations and
    affinity), their pod templates created as Pods with dryRun=All in a namespace enforcing `restricted`; a pod
    without our security context is refused there (the check is live)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from ddm_operator import planner as pl
    from ddm_operator.api.models import DecentralizedDiffusionSpec
    from ddm_operator.k8s import builders as b
    from ddm_operator.k8s.handlers import job_request

    ns = restricted_namespace
    raw = yaml.safe_load((CASES / "placement.yaml").read_text())["spec"]
    raw["experts"]["nodes"] = 2
    raw["experts"]["placement"]["resources"]["requests"] = {"cpu": "500m"}
    raw["experts"]["overrides"] = []
    raw["distillation"] = raw.get("distillation") or {}
    spec = DecentralizedDiffusionSpec.model_validate(raw)
    owner = b.Owner(name="psa", namespace=ns, uid="00000000-0000-0000-0000-000000000001")
    keys = [pl.CLUSTER, pl.expert_key(0), pl.ROUTER, pl.EVALUATE, pl.DISTILL, pl.BASELINE]
    pods, seen = [], []
    for key in keys:
        job = b.build_pytorchjob(job_request(spec, owner, key, 1))
        for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
            template = replica["template"]
            pods.append({"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
                         "metadata": {**template["metadata"], "name": f"{job['metadata']['name']}-{role.lower()}"}})
            seen.append((key.id, role, template["spec"]["containers"][0].get("resources", {})))
        runtime = b.build_training_runtime(job_request(spec, owner, key, 1))  # the Trainer v2 backend's pod
        template = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        pods.append({"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
                     "metadata": {**template["metadata"], "name": f"{runtime['metadata']['name']}-node"}})
    assert {k for k, _, _ in seen} == {k.id for k in keys} and ("expert-000", "Worker") in {a[:2] for a in seen}
    assert any("nvidia.com/gpu" in (r.get("limits") or {}) for _, _, r in seen)
    out = k8s_cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", check=False,
                              input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("created (server dry run)") == len(pods), out.stdout
    core = client.CoreV1Api(k8s_cluster.api_client())
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "c", "image": "ghcr.io/ddm/ddm-trainer:0.1.0"}]}}
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(ns, bare, dry_run="All")
    assert refused.value.status == 403 and "PodSecurity" in str(refused.value.body)
