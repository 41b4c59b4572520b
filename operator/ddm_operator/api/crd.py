"""Generate the DecentralizedDiffusion CRD from the pydantic models (one source; `make crd` writes the files).

pydantic's JSON Schema is turned into a *structural* Kubernetes OpenAPI v3 schema: $refs inlined, ``X | None``
becomes ``nullable``, ``const`` becomes a one-value enum, free-form objects get
``x-kubernetes-preserve-unknown-fields``, int-or-string quantities get ``x-kubernetes-int-or-string``, and the
cross-field ``RULES`` and ``IMMUTABLE_FIELDS`` of ``models`` become CEL ``x-kubernetes-validations``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .models import (
    GROUP,
    IMMUTABLE_FIELDS,
    KIND,
    PLURAL,
    RULES,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    DecentralizedDiffusionSpec,
    DecentralizedDiffusionStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"
# Written by `ddm crd --write`, relative to the repository root; a unit test fails when they drift.
CRD_PATHS = (Path("crds") / CRD_FILENAME, Path("charts/ddm-operator/crds") / CRD_FILENAME)

_DROP_KEYS = {"title", "additionalProperties", "$defs", "discriminator", "examples"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref (our models have no recursion)."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _is_null(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "null"


def _is_int_or_string(options: list[Any]) -> bool:
    return sorted(o.get("type", "") for o in options if isinstance(o, dict)) == ["integer", "string"]


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """One JSON-Schema node -> one structural OpenAPI v3 node (recursively)."""
    node = dict(node)
    out: dict[str, Any] = {}
    options = node.pop("anyOf", None)
    if options is not None:
        non_null = [o for o in options if not _is_null(o)]
        if len(non_null) < len(options):
            out["nullable"] = True
        if len(non_null) == 1:
            inner = _structural(non_null[0])
            node = {**inner, **node}  # the outer node's description/default win
            out.update({k: v for k, v in inner.items() if k not in node})
        elif _is_int_or_string(non_null):
            out["x-kubernetes-int-or-string"] = True
        else:
            raise ValueError(f"cannot express anyOf {non_null} structurally")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "default" in node and node["default"] is None:
        del node["default"]
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), (int, float)) and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    free_form = node.get("type") == "object" and "properties" not in node and node.get("additionalProperties") in (True, None, {})
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: _structural(prop) for name, prop in value.items()}
        elif key == "items":
            out["items"] = _structural(value)
        else:
            out[key] = value
    additional = node.get("additionalProperties")
    if isinstance(additional, dict) and additional:
        out["additionalProperties"] = _structural(additional)
    if free_form or node == {} and not out.get("x-kubernetes-int-or-string"):
        out["x-kubernetes-preserve-unknown-fields"] = True
        if node == {}:
            out.setdefault("type", "object")
    return _ordered(out)


_FIRST = ("type", "description", "nullable", "default", "enum", "format", "pattern", "minimum", "exclusiveMinimum",
          "maximum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties")
_LAST = ("required", "properties", "additionalProperties", "items", "x-kubernetes-validations")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """A stable, readable key order: scalars first, nested schemas last."""
    rank = {k: i for i, k in enumerate(_FIRST)} | {k: 100 + i for i, k in enumerate(_LAST)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], 50), kv[0])))


def _schema_of(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})))


def _node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for name in path:
        schema = schema["properties"][name]
    return schema


def spec_schema() -> dict[str, Any]:
    """The structural schema of ``spec`` with every CEL rule attached where it belongs."""
    schema = _schema_of(DecentralizedDiffusionSpec)
    for rule in RULES:
        where = _node(schema, rule.at)
        where.setdefault("x-kubernetes-validations", []).append(
            # the API server prefixes the message with fieldPath (spec.clustering.fineClusters: ...)
            {"rule": rule.cel, "message": rule.message, "fieldPath": f".{rule.field}"}
        )
    for at, message in IMMUTABLE_FIELDS:
        _node(schema, at).setdefault("x-kubernetes-validations", []).append({"rule": "self == oldSelf", "message": message})
    return schema


def status_schema() -> dict[str, Any]:
    schema = _schema_of(DecentralizedDiffusionStatus)
    schema.pop("required", None)
    # The operator framework (kopf) keeps its own bookkeeping under status: do not prune it.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def generate_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES)},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Ready", "type": "integer", "jsonPath": ".status.expertsReady", "description": "Experts trained"},
                    {"name": "Total", "type": "integer", "jsonPath": ".status.expertsTotal", "description": "Experts (K)"},
                    {"name": "Router", "type": "string", "jsonPath": ".status.router.phase"},
                    {"name": "Best FID", "type": "number", "jsonPath": ".status.bestFid"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Train K diffusion experts on feature clusters of a dataset, a router, and evaluate the ensemble.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    header = "# Generated by `ddm crd --write` (make crd) from operator/ddm_operator/api/models.py. Do not edit.\n"
    return header + str(yaml.safe_dump(generate_crd(), sort_keys=False, width=120))


def write_crd(root: Path) -> list[Path]:
    text = render_crd()
    written = []
    for rel in CRD_PATHS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
