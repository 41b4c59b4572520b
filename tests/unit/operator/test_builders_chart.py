"""The Helm chart: documented values, a hardened Deployment, least-privilege RBAC, and the kept RBAC rendering."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

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
