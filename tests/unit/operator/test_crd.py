"""The generated CRD: committed copies match the models, and the schema is structural."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, get_args

import pytest
import yaml

from ddm_operator.api import models
from ddm_operator.api.crd import CRD_PATHS, RENDERERS, generate_crd
from ddm_operator.cli import main

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("rel", CRD_PATHS, ids=str)
def test_committed_crd_matches_the_models(rel: Path) -> None:
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing: run `make crd`"
    assert path.read_text() == RENDERERS[rel](), f"{rel} differs from the models: run `make crd`"


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, sub in node.get("properties", {}).items():
            yield from _nodes(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _nodes(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def schema() -> dict[str, Any]:
    return generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural() -> None:
    for path, node in _nodes(schema()):
        bad = {"$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"} & node.keys()
        assert not bad, f"{path}: {bad}"
        assert node.get("type") != "null", path
        if not (node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if "properties" in node:
            assert "additionalProperties" not in node, f"{path}: properties and additionalProperties"
        if node.get("type") == "array":
            assert "items" in node, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_bounds_enums_defaults_and_free_form_objects() -> None:
    spec = schema()["properties"]["spec"]
    clustering = spec["properties"]["clustering"]["properties"]
    assert clustering["numClusters"]["minimum"] == 1 and clustering["fineClusters"]["default"] == 1024
    experts = spec["properties"]["experts"]["properties"]
    assert experts["modelPreset"]["enum"] == list(models.DIT_PRESETS)
    assert {k: v for k, v in experts["steps"].items() if k != "description"} == {
        "type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 100_000_000}
    placement = experts["placement"]["properties"]
    affinity = placement["affinity"]["properties"]
    assert set(affinity) == {"nodeAffinity", "podAffinity", "podAntiAffinity"}
    assert affinity["nodeAffinity"]["type"] == "object" and affinity["nodeAffinity"]["x-kubernetes-preserve-unknown-fields"]
    assert placement["resources"]["properties"]["limits"]["additionalProperties"] == {
        "x-kubernetes-int-or-string": True, "pattern": models.QUANTITY_PATTERN, "minimum": 0, "maxLength": 64}
    strategies = spec["properties"]["evaluation"]["properties"]["strategies"]
    assert strategies["items"]["pattern"] == models.STRATEGY_PATTERN and strategies["maxItems"] == 16
    assert models.STRATEGY_GRAMMAR in strategies["description"]
    assert experts["overrides"]["items"]["properties"]["experts"]["items"]["minimum"] == 0
    assert spec["properties"]["router"]["default"] == {}
    # strings are bounded so the CEL cost estimator accepts the rules
    for path, node in _nodes(spec):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path


def test_every_rule_and_immutable_field_is_in_the_schema() -> None:
    spec = schema()["properties"]["spec"]
    rules = [(path, v) for path, node in _nodes(spec) for v in node.get("x-kubernetes-validations", [])]
    for rule in models.RULES:
        where = "".join(f".{p}" for p in rule.at)
        assert (where, {"rule": rule.cel, "message": rule.message, "fieldPath": f".{rule.field}"}) in rules
    immutable = {path for path, v in rules if v["rule"] == "self == oldSelf"}
    assert immutable == {".dataset", ".clustering", ".storage.uri", ".storage.volumeClaim", ".experts.modelPreset",
                         ".experts.classConditional", ".textEncoder", ".growth", ".vae"}
    # a model's own rules sit on every node made from it (tolerations of each placement, each override's resources)
    toleration_rules = [path for path, v in rules if v["message"] == models.Toleration.rules[0].message]
    assert ".experts.placement.tolerations[]" in toleration_rules
    assert ".experts.overrides[].placement.tolerations[]" in toleration_rules and len(toleration_rules) == 6
    assert ".baseline.placement.tolerations[]" in toleration_rules


def test_every_field_is_described_with_its_default_and_range() -> None:
    spec = schema()["properties"]["spec"]
    for path, node in [*_nodes(spec, "spec"), *_nodes(schema()["properties"]["status"], "status")]:
        if not path.endswith(("[]", "}")):  # list items and map values are described by their field
            assert node.get("description"), f"{path} has no description"
    clustering = spec["properties"]["clustering"]["properties"]
    assert clustering["fineClusters"]["description"].endswith("Default: 1024. Range: 1 to 65536.")
    assert spec["properties"]["experts"]["properties"]["steps"]["description"].endswith("Range: > 0, <= 100000000.")


def test_status_subresource_printer_columns_and_names() -> None:
    crd = generate_crd()
    assert crd["metadata"]["name"] == "decentralizeddiffusions.ddm.io"
    assert crd["spec"]["names"]["shortNames"] == ["ddm"] and crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"] if not c.get("priority")}
    assert columns == {"Phase": ".status.phase", "Ready": ".status.expertsReady", "K": ".spec.clustering.numClusters",
                       "Router": ".status.router.phase", "Best FID": ".status.bestFid",
                       "Partial FID": ".status.partial.fid", "vs Monolith": ".status.results.bestVsMonolith", "Age": ".metadata.creationTimestamp"}
    wide = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"] if c.get("priority") == 1}
    assert wide["Progress"] == ".status.message" and wide["Preset"] == ".spec.experts.modelPreset"
    status = schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True  # kopf keeps its bookkeeping there
    assert status["properties"]["phase"]["enum"][0] == "Pending"


def test_crd_command_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == generate_crd()
    assert main(["crd", "--write", "--root", str(tmp_path)]) == 0
    for rel in CRD_PATHS:
        assert (tmp_path / rel).read_text() == RENDERERS[rel]()


def test_optional_fields_default_to_none() -> None:
    """to_wire() drops None values, which is lossless only while every nullable field defaults to None."""
    seen = set()
    stack: list[type[models.ApiModel]] = [models.DecentralizedDiffusionSpec]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, info in cls.model_fields.items():
            text = str(info.annotation)
            if type(None) in get_args(info.annotation):
                assert info.default is None, f"{cls.__name__}.{name}"
            for sub in vars(models).values():
                if isinstance(sub, type) and issubclass(sub, models.ApiModel) and sub.__name__ in text:
                    stack.append(sub)
    assert models.DatasetSpec in seen and models.Toleration in seen
