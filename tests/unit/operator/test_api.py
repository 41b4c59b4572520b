"""The DecentralizedDiffusion models and `ddm validate`: good specs pass, each malformed spec names its field."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ddm_operator.api.models import RULES, DecentralizedDiffusion, DecentralizedDiffusionSpec, immutable_changes
from ddm_operator.cli import main, validate_file

ROOT = Path(__file__).resolve().parents[3]
BAD_SPECS = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def expected_field(path: Path) -> str:
    match = re.search(r"^# expect: (\S+)$", path.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{path} has no '# expect: field.path' line")
    return match.group(1)


def test_there_are_enough_bad_specs() -> None:
    assert len(BAD_SPECS) >= 20


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_spec_is_rejected_naming_its_field(path: Path) -> None:
    errors = validate_file(path)
    field = expected_field(path)
    assert errors, f"{path.name} was accepted"
    assert any(line.startswith((f"{field}:", f"{field}.")) for line in errors), f"{field} not named in {errors}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid(path: Path) -> None:
    assert validate_file(path) == []


def test_validate_cli_exit_codes_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = ROOT / "examples" / "ddm-laion.yaml"
    bad = Path(__file__).parent / "bad_specs" / "fine-below-k.yaml"
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok"
    assert main(["validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: spec.clustering.fineClusters: must be >= spec.clustering.numClusters (got fineClusters=4, numClusters=8)" in out
    not_yaml = tmp_path / "x.yaml"
    not_yaml.write_text("spec: [unclosed\n")
    assert main(["validate", str(not_yaml), str(tmp_path / "missing.yaml")]) == 1
    out = capsys.readouterr().out
    assert "not valid YAML" in out and "cannot read" in out


def test_several_errors_are_reported_one_per_line(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "ddm-laion.yaml").read_text())
    doc["spec"]["clustering"]["fineClusters"] = 2  # two cross-field rules at once
    doc["spec"]["failurePolicy"]["minExperts"] = 9
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(doc))
    errors = validate_file(path)
    assert [e.split(":")[0] for e in errors] == ["spec.clustering.fineClusters", "spec.failurePolicy.minExperts"]


def test_wrong_kind_and_api_version() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "ddm-laion.yaml").read_text())
    doc["apiVersion"], doc["kind"] = "ddm.io/v1", "Job"
    from ddm_operator.cli import validate_document

    fields = {line.split(":")[0] for line in validate_document(doc)}
    assert fields == {"apiVersion", "kind"}


def laion_spec() -> DecentralizedDiffusionSpec:
    return DecentralizedDiffusion.model_validate(yaml.safe_load((ROOT / "examples" / "ddm-laion.yaml").read_text())).spec


def test_camel_case_wire_format_round_trips() -> None:
    spec = laion_spec()
    wire = spec.to_wire()
    assert wire["clustering"]["numClusters"] == 8 and "num_clusters" not in wire["clustering"]
    assert DecentralizedDiffusionSpec.model_validate(wire) == spec
    # snake_case is accepted from Python callers too
    assert DecentralizedDiffusionSpec.model_validate(spec.model_dump()) == spec


def test_defaults_fill_optional_sections() -> None:
    spec = DecentralizedDiffusionSpec.model_validate(
        {"dataset": {"uri": "/data/fmnist"}, "clustering": {"numClusters": 4}, "experts": {"steps": 10},
         "storage": {"uri": "runs/x"}}
    )
    assert spec.clustering.fine_clusters == 1024 and spec.evaluation.strategies == ["full", "top1"]
    assert spec.min_experts == 4 and not spec.distill_enabled and spec.parallelism is None


def test_placement_for_merges_overrides_field_by_field() -> None:
    spec = laion_spec()
    default = spec.experts.placement_for(0)
    assert default.node_selector == {"cloud.google.com/gke-nodepool": "h100-pool-a"}
    assert default.kueue_queue_name == "gpu-training"  # not overridden: kept from the default
    assert default.resources is not None and default.resources.limits == {"nvidia.com/gpu": 8, "memory": "1600Gi"}
    remote = spec.experts.placement_for(7)
    assert remote.target_cluster == "kubeconfig-us-east" and remote.affinity is not None
    assert spec.experts.placement_for(2).target_cluster is None


def test_immutable_changes_match_the_cel_fields() -> None:
    old = laion_spec()
    new = old.model_copy(deep=True)
    new.experts.steps = 10  # mutable
    new.suspend = True
    assert immutable_changes(old, new) == []
    new.clustering = new.clustering.model_copy(update={"num_clusters": 9})
    new.experts.model_preset = "DiT-L/2"
    assert immutable_changes(old, new) == [
        "spec.clustering: spec.clustering is immutable (create a new DecentralizedDiffusion)",
        "spec.experts.modelPreset: spec.experts.modelPreset is immutable",
    ]


def test_every_rule_blames_an_existing_field() -> None:
    schema = DecentralizedDiffusionSpec.model_json_schema(by_alias=True)
    for rule in RULES:
        node = schema
        for name in (*rule.at, *rule.field.split(".")):
            props = node.get("properties") or schema["$defs"][node["$ref"].split("/")[-1]]["properties"]
            node = props[name]
            if "anyOf" in node:
                node = next(o for o in node["anyOf"] if o.get("type") != "null")


@pytest.mark.parametrize(("strategies", "ok"), [
    (["top-4", "sample-4", "oracle-3", "nucleus-1", "top1", "full"], True),  # the edges, K = 4
    (["top-5"], False),
    (["sample-5"], False),
    (["oracle-4"], False),  # clusters are 0-based
])
def test_strategies_must_fit_the_number_of_experts(strategies: list[str], ok: bool) -> None:
    doc = {"dataset": {"uri": "/data/fmnist"}, "clustering": {"numClusters": 4}, "experts": {"steps": 10},
           "storage": {"uri": "runs/x"}, "evaluation": {"strategies": strategies}}
    if ok:
        assert DecentralizedDiffusionSpec.model_validate(doc).evaluation.strategies == strategies
    else:
        with pytest.raises(ValueError, match=r"spec\.evaluation\.strategies: top-K and sample-K need K"):
            DecentralizedDiffusionSpec.model_validate(doc)


@pytest.mark.parametrize(("changes", "blamed"), [
    ({"dataset": {"uri": "/d", "imageSize": 30}}, None),  # every default preset is /2
    ({"dataset": {"uri": "/d", "imageSize": 30}, "router": {"preset": "DiT-S/4"}}, "spec.router.preset"),
    ({"dataset": {"uri": "/d", "imageSize": 30}, "distillation": {"studentPreset": "DiT-S/4"}}, None),  # disabled
    ({"dataset": {"uri": "/d", "imageSize": 30}, "distillation": {"enabled": True, "studentPreset": "DiT-S/4"}},
     "spec.distillation.studentPreset"),
    ({"dataset": {"uri": "/d", "imageSize": 31}}, "spec.experts.modelPreset"),
])
def test_presets_must_tile_the_image(changes: dict[str, object], blamed: str | None) -> None:
    doc = {"clustering": {"numClusters": 4}, "experts": {"steps": 10}, "storage": {"uri": "runs/x"}, **changes}
    if blamed is None:
        DecentralizedDiffusionSpec.model_validate(doc)
    else:
        with pytest.raises(ValueError, match=re.escape(f"{blamed}: patch size must divide")):
            DecentralizedDiffusionSpec.model_validate(doc)


SPELLINGS = ["full", "top1", "top-1", "top-2", "sample-2", "sample-2@1", "sample-2@1.0", "sample-2@0.5", "sample-3@0.50",
             "nucleus-0.9", "nucleus-0.90", "nucleus-0.9@2", "nucleus-1", "nucleus-1.0", "oracle", "oracle-0", "oracle-3"]


def test_every_api_strategy_parses_in_the_trainer_and_duplicates_match_its_normalisation() -> None:
    """The API's grammar is a subset of the trainer's, and strategy_key (the CEL rule's twin) says "same strategy"
    exactly when the trainer's parse_strategy does."""
    from ddm_trainer.combine import parse_strategy

    from ddm_operator.api.models import STRATEGY_PATTERN, strategy_key

    for s in SPELLINGS:
        assert re.fullmatch(STRATEGY_PATTERN, s), s
    for a in SPELLINGS:
        for b in SPELLINGS:
            assert (strategy_key(a) == strategy_key(b)) == (parse_strategy(a) == parse_strategy(b)), (a, b)


def test_yaml_numbers_and_strings_are_read_as_the_api_server_reads_them(tmp_path: Path) -> None:
    """1e-4 is a number (PyYAML alone reads a string), "8" and "true" stay strings and are refused (strict types)."""
    from ddm_operator.local.commands import load_spec

    text = (ROOT / "examples" / "ddm-laion.yaml").read_text().replace("lr: 0.0001", "lr: 1e-4")
    (tmp_path / "ok.yaml").write_text(text)
    assert validate_file(tmp_path / "ok.yaml") == [] and load_spec(tmp_path / "ok.yaml").spec.experts.lr == 1e-4
    (tmp_path / "bad.yaml").write_text(text.replace("numClusters: 8", 'numClusters: "8"'))
    assert [e.split(":")[0] for e in validate_file(tmp_path / "bad.yaml")] == ["spec.clustering.numClusters"]
