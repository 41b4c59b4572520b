"""The generated CRD in a real kube-apiserver: examples are accepted, malformed specs are rejected naming their
field (OpenAPI, CEL, strict field validation), immutable fields cannot change, and a planner status fits the schema."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddm_operator.api.models import GROUP, PLURAL, VERSION, DecentralizedDiffusionSpec, DecentralizedDiffusionStatus
from ddm_operator.planner import CLUSTER, Observed, StageObservation, State, merge_conditions, plan

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD_SPECS = sorted((ROOT / "tests" / "unit" / "operator" / "bad_specs").glob("*.yaml"))


def load(path: Path, namespace: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = namespace
    return doc


def create(api: Any, namespace: str, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    from kubernetes import client

    extra = {"dry_run": "All"} if dry_run else {}
    result: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict", **extra
    )
    return result


def rejection(call: Any) -> str:
    """The API server's complaint, with list indices written as dots (tolerations[0] -> tolerations.0)."""
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status in (400, 422), info.value.body
    body = json.loads(info.value.body)
    fields = " ".join(c.get("field", "") + " " + c.get("message", "") for c in body.get("details", {}).get("causes", []))
    return re.sub(r"\[(\d+)\]", r".\1", f"{body.get('message', '')} {fields}")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_accepted(k8s_cluster: Any, k8s_namespace: str, path: Path) -> None:
    with k8s_cluster.api_client() as api:
        created = create(api, k8s_namespace, load(path, k8s_namespace))
    # what the server stored (with its defaults applied) is still a valid spec for the models
    spec = DecentralizedDiffusionSpec.model_validate(created["spec"])
    assert spec == DecentralizedDiffusionSpec.model_validate(yaml.safe_load(path.read_text())["spec"])


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_specs_are_rejected_naming_the_field(k8s_cluster: Any, k8s_namespace: str, path: Path) -> None:
    field = re.search(r"^# expect: (\S+)$", path.read_text(), re.MULTILINE).group(1)  # type: ignore[union-attr]
    with k8s_cluster.api_client() as api:
        message = rejection(lambda: create(api, k8s_namespace, load(path, k8s_namespace), dry_run=True))
    assert field in message, message


@pytest.mark.parametrize(("strategies", "ok"), [(["top-8", "sample-8", "oracle-7", "nucleus-1"], True),
                                               (["top-9"], False), (["oracle-8"], False)])
def test_strategy_bounds_follow_num_clusters_in_cel(k8s_cluster: Any, k8s_namespace: str, strategies: list[str],
                                                    ok: bool) -> None:
    """The CEL twin of the model's rule, at its edges (K = 8 in the example)."""
    doc = load(ROOT / "examples" / "ddm-laion.yaml", k8s_namespace)
    doc["spec"]["evaluation"]["strategies"] = strategies
    with k8s_cluster.api_client() as api:
        if ok:
            create(api, k8s_namespace, doc, dry_run=True)
        else:
            assert "spec.evaluation.strategies" in rejection(lambda: create(api, k8s_namespace, doc, dry_run=True))


@pytest.mark.parametrize(("image_size", "student", "blamed"), [
    (32, "DiT-S/4", None), (30, "DiT-S/2", None), (30, "DiT-S/4", "spec.distillation.studentPreset")])
def test_patch_rules_in_cel(k8s_cluster: Any, k8s_namespace: str, image_size: int, student: str,
                            blamed: str | None) -> None:
    """The CEL twins of the models' patch rules (the example's experts and router are /2)."""
    doc = load(ROOT / "examples" / "ddm-laion.yaml", k8s_namespace)
    doc["spec"]["dataset"]["imageSize"] = image_size
    doc["spec"]["distillation"].update(enabled=True, studentPreset=student)
    with k8s_cluster.api_client() as api:
        if blamed is None:
            create(api, k8s_namespace, doc, dry_run=True)
        else:
            assert blamed in rejection(lambda: create(api, k8s_namespace, doc, dry_run=True))


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda s: s["clustering"].update(fineClusters=2048), "spec.clustering"),
        (lambda s: s["dataset"].update(imageSize=512), "spec.dataset"),
        (lambda s: s["storage"].update(uri="s3://ddm-runs/elsewhere"), "spec.storage.uri"),
        (lambda s: s["experts"].update(modelPreset="DiT-L/2"), "spec.experts.modelPreset"),
    ],
    ids=["clustering", "dataset", "storage-uri", "model-preset"],
)
def test_immutable_fields_cannot_change(k8s_cluster: Any, k8s_namespace: str, change: Any, field: str) -> None:
    from kubernetes import client

    with k8s_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        created = create(api, k8s_namespace, load(ROOT / "examples" / "ddm-laion.yaml", k8s_namespace))
        name = created["metadata"]["name"]
        # mutable fields may change
        created["spec"]["experts"]["steps"] = 500_000
        created["spec"]["suspend"] = True
        updated = custom.replace_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, name, created)
        assert updated["spec"]["suspend"] is True
        changed = copy.deepcopy(updated)
        change(changed["spec"])
        message = rejection(
            lambda: custom.replace_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, name, changed)
        )
    assert f"{field} is immutable" in message, message


def test_planner_status_fits_the_status_subresource(k8s_cluster: Any, k8s_namespace: str) -> None:
    from kubernetes import client

    with k8s_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        created = create(api, k8s_namespace, load(ROOT / "examples" / "ddm-laion.yaml", k8s_namespace))
        spec = DecentralizedDiffusionSpec.model_validate(created["spec"])
        p = plan(spec, Observed(now=0.0, stages={CLUSTER: StageObservation(State.SUCCEEDED, attempts=1)}))
        status = DecentralizedDiffusionStatus(
            phase=p.phase, message=p.message, experts=p.experts, experts_ready=p.experts_ready,
            experts_total=p.experts_total, stages=p.stages, router=p.router,
            conditions=merge_conditions([], p.conditions, "2026-12-01T00:00:00Z", created["metadata"]["generation"]),
        )
        created["status"] = {**status.to_wire(), "kopf": {"progress": {}}}
        stored = custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, k8s_namespace, PLURAL, created["metadata"]["name"], created
        )
    assert stored["status"]["phase"] == "Training" and stored["status"]["expertsTotal"] == 8
    assert len(stored["status"]["experts"]) == 8 and "kopf" in stored["status"]
    assert DecentralizedDiffusionStatus.model_validate(stored["status"]).experts_total == 8


def test_explicit_nulls_in_nullable_fields_are_accepted(k8s_cluster: Any, k8s_namespace: str) -> None:
    """CEL rules guard optional fields with has(); an explicit null must not trip them."""
    doc = load(ROOT / "examples" / "ddm-laion.yaml", k8s_namespace)
    doc["spec"]["clustering"]["maxClusterFraction"] = None
    doc["spec"]["failurePolicy"]["minExperts"] = None
    doc["spec"]["storage"]["credentialsSecret"] = None
    doc["spec"]["parallelism"] = None
    DecentralizedDiffusionSpec.model_validate(doc["spec"])  # the models agree
    with k8s_cluster.api_client() as api:
        create(api, k8s_namespace, doc, dry_run=True)
