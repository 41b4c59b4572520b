"""Generate the DecentralizedDiffusion CRD from the pydantic models (one source; `make crd` writes the files).

pydantic's JSON Schema is turned into a *structural* Kubernetes OpenAPI v3 schema: $refs inlined, ``X | None``
becomes ``nullable``, ``const`` becomes a one-value enum, free-form objects get
``x-kubernetes-preserve-unknown-fields``, int-or-string quantities get ``x-kubernetes-int-or-string`` (keeping the
integer's bounds and the string's pattern), constrained map keys (``patternProperties``) become a CEL rule on the
map, and the cross-field ``RULES``, each model's own ``rules`` and ``IMMUTABLE_FIELDS`` of ``models`` become CEL
``x-kubernetes-validations``. Every description gets the field's default and range appended, so
``kubectl explain`` shows them.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

from . import models
from .models import (
    GROUP,
    IMMUTABLE_FIELDS,
    INT64_MAX,
    KIND,
    PATTERN_NAMES,
    PLURAL,
    RULES,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    DecentralizedDiffusionSpec,
    DecentralizedDiffusionStatus,
    Rule,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"
# Written by `ddm crd --write`, relative to the repository root; a unit test fails when they drift. The chart's copy
# is a template (not the chart's crds/, which Helm installs once and never upgrades): `helm upgrade` updates it.
CRD_PATH = Path("crds") / CRD_FILENAME
CHART_CRD_PATH = Path("charts/ddm-operator/templates/crd.yaml")
CRD_PATHS = (CRD_PATH, CHART_CRD_PATH)

_DROP_KEYS = {"title", "additionalProperties", "$defs", "discriminator", "examples"}


def _cel(rule: Rule) -> dict[str, str]:
    # the API server prefixes the message with fieldPath (spec.clustering.fineClusters: ...)
    return {"rule": rule.cel, "message": rule.message, "fieldPath": f".{rule.field}"}


@functools.cache
def _model_rules() -> dict[str, list[dict[str, str]]]:
    """Schema definition name (the model's class name) -> the CEL of the model's own ``rules``."""
    found = {}
    for value in vars(models).values():
        if isinstance(value, type) and issubclass(value, models.SpecModel) and value.rules:
            found[value.__name__] = [_cel(rule) for rule in value.rules]
    return found


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref (our models have no recursion), attaching each model's own rules where it is used."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
        if name in (rules := _model_rules()):
            merged["x-kubernetes-validations"] = rules[name]
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
        if len(non_null) == 1:  # converted once, below (converting it here too described it twice)
            node = {**non_null[0], **node}  # the outer node's description/default win
        elif _is_int_or_string(non_null):
            out["x-kubernetes-int-or-string"] = True
            for option in non_null:  # the integer's bounds, the string's pattern: each applies to its own type
                out.update({k: v for k, v in option.items() if k not in ("type", "title")
                            and not (k == "maximum" and v == INT64_MAX)})  # int64 already (see below)
        else:
            raise ValueError(f"cannot express anyOf {non_null} structurally")
    if node.get("maximum") == INT64_MAX:  # the API server's integers are int64 already (and 2**63-1 is no float64)
        del node["maximum"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "default" in node and node["default"] is None:
        del node["default"]
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), (int, float)) and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    keys = node.pop("patternProperties", None)
    if keys is not None:  # constrained map keys: one pattern, checked by CEL; the values' schema as usual
        (pattern, values), = keys.items()
        node["additionalProperties"] = values
        name = PATTERN_NAMES.get(pattern, f"matching {pattern}")
        node.setdefault("x-kubernetes-validations", []).append(
            {"rule": f"self.all(k, k.matches(r'{pattern}'))", "message": f"every key must be {name}"})
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
    if "description" in out:
        out["description"] = _described(out)
    return _ordered(out)


def _described(node: dict[str, Any]) -> str:
    """The description with the default and the range appended (``kubectl explain`` shows only the description)."""
    text = str(node["description"]).rstrip(".")
    extra = []
    if node.get("default") not in (None, {}, []):
        default = node["default"]
        extra.append(f"Default: {', '.join(default) if isinstance(default, list) else json.dumps(default).strip(chr(34))}")
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None and not node.get("exclusiveMinimum") and not node.get("exclusiveMaximum"):
        extra.append(f"Range: {low} to {high}")
    else:
        bounds = [f"{'>' if node.get('exclusiveMinimum') else '>='} {low}"] if low is not None else []
        bounds += [f"{'<' if node.get('exclusiveMaximum') else '<='} {high}"] if high is not None else []
        if bounds:
            extra.append(f"Range: {', '.join(bounds)}")
    return ". ".join([text, *extra]) + "."


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
        _node(schema, rule.at).setdefault("x-kubernetes-validations", []).append(_cel(rule))
    for at, message in IMMUTABLE_FIELDS:
        _node(schema, at).setdefault("x-kubernetes-validations", []).append({"rule": "self == oldSelf", "message": message})
    return schema


def status_schema() -> dict[str, Any]:
    schema = _schema_of(DecentralizedDiffusionStatus)
    schema.pop("required", None)
    # The operator framework (kopf) keeps its own bookkeeping under status: do not prune it.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


# `kubectl get ddm`; priority 1 only with `-o wide`.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.expertsReady", "description": "Experts trained"},
    {"name": "K", "type": "integer", "jsonPath": ".spec.clustering.numClusters", "description": "Experts (numClusters)"},
    {"name": "Router", "type": "string", "jsonPath": ".status.router.phase"},
    {"name": "Best FID", "type": "number", "jsonPath": ".status.bestFid", "description": "Best routing strategy's FID"},
    {"name": "Partial FID", "type": "number", "jsonPath": ".status.partial.fid",
     "description": "FID of the experts committed so far, while others train (spec.evaluation.partial)"},
    {"name": "vs Monolith", "type": "number", "jsonPath": ".status.results.bestVsMonolith",
     "description": "Best FID over the compute-matched monolith's (spec.baseline; below 1: the ensemble wins)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Preset", "type": "string", "jsonPath": ".spec.experts.modelPreset", "priority": 1},
    {"name": "Steps", "type": "integer", "jsonPath": ".spec.experts.steps", "priority": 1,
     "description": "Training steps of each expert"},
    {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend", "priority": 1},
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "priority": 1,
     "description": "Training time left of the running experts"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.message", "priority": 1,
     "description": "What the run is doing (experts ready, stage states)"},
]


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
                "additionalPrinterColumns": PRINTER_COLUMNS,
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


def render_chart_crd(crd: dict[str, Any] | None = None) -> str:
    """The CRD as a Helm template: behind ``crds.enabled``, with the chart's labels and, unless ``crds.keep`` is
    false, ``helm.sh/resource-policy: keep`` (uninstalling the chart must not delete every DDM in the cluster)."""
    crd = generate_crd() if crd is None else crd
    body = str(yaml.safe_dump({"spec": crd["spec"]}, sort_keys=False, width=120))
    if "{{" in body or "}}" in body:
        raise ValueError("the CRD holds '{{' or '}}', which Helm would read as a template action")
    return (
        "{{- /* Generated by `ddm crd --write` (make crd) from operator/ddm_operator/api/models.py. Do not edit. */}}\n"
        "{{- if .Values.crds.enabled }}\n"
        f"apiVersion: {crd['apiVersion']}\n"
        f"kind: {crd['kind']}\n"
        "metadata:\n"
        f"  name: {crd['metadata']['name']}\n"
        "  labels:\n"
        '    {{- include "ddm-operator.labels" . | nindent 4 }}\n'
        "  {{- if .Values.crds.keep }}\n"
        "  annotations:\n"
        "    helm.sh/resource-policy: keep\n"
        "  {{- end }}\n"
        f"{body}"
        "{{- end }}\n"
    )


RENDERERS = {CRD_PATH: render_crd, CHART_CRD_PATH: render_chart_crd}


def write_crd(root: Path) -> list[Path]:
    written = []
    for rel in CRD_PATHS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RENDERERS[rel]())
        written.append(path)
    return written
