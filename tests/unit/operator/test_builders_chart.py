"""The Helm chart: documented values, a hardened Deployment, least-privilege RBAC, and the kept RBAC rendering."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.k8s import helm_binary

CHART = Path(__file__).resolve().parents[3] / "charts" / "ddm-operator"


def test_every_values_key_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[int] = []  # indents of documented ancestors
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([\w./-]+):", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match.group(1))
        documented = [d for d in documented if d < indent]
        comments = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.append(lines[j].strip())
            j -= 1
        if any(c.startswith("# --") for c in comments):
            documented.append(indent)
            continue
        following = next((l for l in lines[i + 1:] if l.strip() and not l.strip().startswith("#")), "")
        is_parent = len(following) - len(following.lstrip()) > indent and line.rstrip().endswith(":")
        if not documented and not is_parent:
            undocumented.append(match.group(2))
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


def test_deployment_template_is_hardened() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text()
    for needle in ("replicas: 1", "type: Recreate", "--liveness=", "livenessProbe:", "--standalone"):
        assert needle in text, needle
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def rules_of(text: str) -> list[dict[str, object]]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    return [r for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]


def test_rendered_rbac_is_least_privilege() -> None:
    rules = rules_of((CHART / "rbac-rendered.yaml").read_text())
    verbs = {v for r in rules for v in r["verbs"]}  # type: ignore[attr-defined]
    by_resource = {res: set(r["verbs"]) for r in rules for res in r["resources"]}  # type: ignore[attr-defined]
    assert "*" not in verbs and "delete" not in verbs
    assert [res for res, v in by_resource.items() if "update" in v] == ["decentralizeddiffusions/finalizers"]
    assert by_resource["pods"] == {"list"}
    assert by_resource["secrets"] == {"get"} and by_resource["configmaps"] == {"get", "create"}
    assert by_resource["decentralizeddiffusions/status"] == {"patch"}
    assert all("*" not in r["resources"] and "*" not in r["apiGroups"] for r in rules)  # type: ignore[operator]


@pytest.mark.skipif(helm_binary() is None, reason="helm not built (scripts/testenv-build.sh --extras)")
def test_kept_rendering_matches_helm_template() -> None:
    shows = ["serviceaccount", "clusterrole-framework", "clusterrolebinding-framework", "role-application",
             "rolebinding-application"]
    args = [helm_binary(), "template", "ddm-operator", str(CHART), "--kube-version", "1.37.2", "--namespace", "ddm-system",
            "--set", "watchNamespaces={ddm-system}"] + [a for s in shows for a in ("--show-only", f"templates/{s}.yaml")]
    rendered = subprocess.run(args, check=True, capture_output=True, text=True).stdout  # type: ignore[arg-type]
    kept = (CHART / "rbac-rendered.yaml").read_text()
    assert [d for d in yaml.safe_load_all(rendered) if d] == [d for d in yaml.safe_load_all(kept) if d]
    cluster_wide = subprocess.run([helm_binary(), "template", "x", str(CHART), "--kube-version", "1.37.2"], check=True,  # type: ignore[list-item]
                                  capture_output=True, text=True).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(cluster_wide) if d}
    assert {"ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"} <= kinds and "Role" not in kinds


def helm_template(*args: str, release: str = "ddm", namespace: str = "ddm-system") -> list[dict[str, Any]]:
    out = subprocess.run([helm_binary(), "template", release, str(CHART), "--kube-version", "1.37.2",  # type: ignore[list-item]
                          "--namespace", namespace, *args], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


needs_helm = pytest.mark.skipif(helm_binary() is None, reason="helm not built (scripts/testenv-build.sh --extras)")


@needs_helm
@pytest.mark.parametrize(("release", "extra", "fullname"), [
    ("ddm", [], "ddm-operator"),  # no doubled ddm-ddm-operator
    ("ddm-operator", [], "ddm-operator"),
    ("ddm-operator-team-a", [], "ddm-operator-team-a"),
    ("team-a", [], "team-a-ddm-operator"),
    ("team-a", ["--set", "nameOverride=trainer-op"], "team-a-trainer-op"),
    ("team-a", ["--set", "fullnameOverride=ops"], "ops"),
])
def test_object_names_follow_helm_conventions(release: str, extra: list[str], fullname: str) -> None:
    docs = helm_template(*extra, release=release)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", fullname) in names and ("ServiceAccount", fullname) in names
    assert ("ClusterRole", f"{fullname}-application") in names
    assert not any("ddm-ddm" in n for _, n in names), names


@needs_helm
def test_crd_is_a_kept_template_behind_crds_enabled_and_allowed_images_reach_the_operator() -> None:
    from ddm_operator.api.crd import generate_crd

    docs = helm_template()
    (crd,) = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert crd["spec"] == generate_crd()["spec"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DDM_ALLOWED_TRAINER_IMAGES"] == "ghcr.io/ddm/ddm-trainer:*"
    kinds = {d["kind"] for d in helm_template("--set", "crds.enabled=false")}
    assert "CustomResourceDefinition" not in kinds
    (crd,) = [d for d in helm_template("--set", "crds.keep=false") if d["kind"] == "CustomResourceDefinition"]
    assert "annotations" not in crd["metadata"]
    (deployment,) = [d for d in helm_template("--set-json", 'allowedTrainerImages=["a/b:1","c/*"]') if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DDM_ALLOWED_TRAINER_IMAGES"] == "a/b:1,c/*"


@needs_helm
def test_single_namespace_install_has_no_cluster_wide_application_rules() -> None:
    docs = helm_template("--set", "watchNamespaces={team-a,team-b}", "--set", "crds.enabled=false")
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [d["metadata"]["name"] for d in cluster_roles] == ["ddm-operator-framework"]
    assert {r for d in cluster_roles for rule in d["rules"] for r in rule["resources"]} == {
        "customresourcedefinitions", "namespaces"}
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert roles == bindings == {"team-a", "team-b"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    no_secrets = helm_template("--set", "rbac.readSecrets=false")
    assert "secrets" not in {r for d in no_secrets if "rules" in d for rule in d["rules"] for r in rule["resources"]}


@needs_helm
def test_packaged_chart_has_notes_and_leaves_out_test_files(tmp_path: Path) -> None:
    import tarfile

    subprocess.run([helm_binary(), "package", str(CHART), "-d", str(tmp_path)], check=True, capture_output=True)  # type: ignore[list-item]
    (package,) = tmp_path.glob("ddm-operator-*.tgz")
    with tarfile.open(package) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames()}
    assert "templates/NOTES.txt" in names and "templates/crd.yaml" in names
    assert "rbac-rendered.yaml" not in names and not any(n.startswith(("tests/", "crds/")) for n in names)
    notes = subprocess.run([helm_binary(), "install", "ddm", str(CHART), "--dry-run", "--kube-version", "1.37.2",  # type: ignore[list-item]
                            "--namespace", "ddm-system", "--set", "watchNamespaces={team-a}"],
                           capture_output=True, text=True)
    assert "It watches DecentralizedDiffusions in: team-a." in notes.stdout or notes.returncode != 0


def test_every_values_key_is_in_the_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART.parents[1] / "README.md").read_text()
    missing = []
    for key, value in values.items():
        keys = [key] + ([f"{key}.{sub}" for sub in value] if isinstance(value, dict) and key in (
            "image", "serviceAccount", "rbac", "crds", "livenessProbe") else [])
        missing += [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"values keys not documented in README.md: {missing}"
