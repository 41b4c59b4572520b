"""stages.py: every example spec yields a config each trainer stage accepts, and the right command line."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from ddm_operator.api.models import DIT_PRESETS, DecentralizedDiffusion
from ddm_operator.stages import (BASELINE, CLUSTER, DISTILL, EVALUATE, ROUTER, STUDENT_EVAL, all_keys, expert_key,
                                 parse_key, run_uri, stage_command, stage_config, trainer_command)
from ddm_trainer.configs import STAGES

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _specs(path: Path) -> list[DecentralizedDiffusion]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "DecentralizedDiffusion"]
    return [DecentralizedDiffusion.model_validate(d) for d in docs]


def _config_class(stage: str) -> type:
    module, _, name = STAGES[stage][0].partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _spec(**changes: object) -> DecentralizedDiffusion:
    doc = yaml.safe_load((ROOT / "examples" / "local-fashion-mnist.yaml").read_text())
    for dotted, value in changes.items():
        node = doc["spec"]
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return DecentralizedDiffusion.model_validate(doc)


def test_examples_exist() -> None:
    assert any(p.name == "local-fashion-mnist.yaml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_gives_valid_trainer_configs(path: Path) -> None:
    specs = _specs(path)
    assert specs, f"{path} holds no DecentralizedDiffusion"
    for obj in specs:
        uri = run_uri(obj.spec, "default", obj.metadata.name)
        keys = all_keys(obj.spec)
        assert keys[0] == CLUSTER and EVALUATE in keys and ROUTER in keys
        assert sum(k.stage == "expert" for k in keys) == obj.spec.clustering.num_clusters
        for key in keys:
            config = _config_class(trainer_command(key)).model_validate(stage_config(obj.spec, key, uri))
            assert config.run_uri == uri


def test_expert_config_carries_its_cluster_and_per_process_batch() -> None:
    obj = _spec(experts__gpusPerNode=4, experts__nodes=2, experts__batchSize=256)
    cfg = stage_config(obj.spec, expert_key(2), "s3://bucket/run")
    assert cfg["cluster_index"] == 2
    assert cfg["train"]["batch_size"] == 256 // 8
    assert cfg["model"] == obj.spec.experts.model_preset
    with pytest.raises(ValueError, match="outside"):
        stage_config(obj.spec, expert_key(obj.spec.num_experts), "s3://bucket/run")


def test_class_conditional_spec_gives_valid_configs_with_the_class_count() -> None:
    obj = _spec(experts__classConditional=True, dataset__classField="cls", dataset__numClasses=10)
    for key in all_keys(obj.spec):
        config = _config_class(trainer_command(key)).model_validate(stage_config(obj.spec, key, "file:///tmp/run"))
        if key.stage == "expert":
            assert config.class_cond and config.num_classes == 10 and config.data.class_field == "cls"
        if key.stage == "router":  # p(k | x_t, t, y): the router sees the label the experts were trained with
            assert config.num_classes == 10 and config.data.class_field == "cls"
    unconditional = stage_config(_spec(dataset__numClasses=10).spec, expert_key(0), "file:///tmp/run")
    assert unconditional["num_classes"] is None  # the class count alone does not make experts conditional
    assert stage_config(_spec(dataset__numClasses=10).spec, ROUTER, "file:///tmp/run")["num_classes"] is None


def test_latent_and_text_specs_reach_every_stage_that_trains_or_samples() -> None:
    """The LAION example: the clustering stage gets the VAE and the text encoder (it stores latents and caption
    embeddings), experts and baseline train on latents with the encoder's width and tokens, the router routes
    latents on the pooled caption, the evaluation draws a grid per prompt."""
    obj = DecentralizedDiffusion.model_validate(yaml.safe_load((ROOT / "examples" / "ddm-laion.yaml").read_text()))
    spec = obj.spec
    assert spec.vae is not None and spec.text_encoder is not None
    configs = {key.id: _config_class(trainer_command(key)).model_validate(stage_config(spec, key, "s3://b/run"))
               for key in all_keys(spec)}
    cluster = configs["cluster"]
    assert cluster.vae.uri == spec.vae.uri and cluster.text_encoder.kind == "clip"
    assert (cluster.text_encoder.width, cluster.text_encoder.max_tokens, cluster.data.caption_field) == (768, 77, "txt")
    for key in ("expert-000", "expert-007"):
        assert configs[key].latents and (configs[key].text_dim, configs[key].text_tokens) == (768, 77)
        assert configs[key].caption_dropout == spec.experts.caption_dropout
    assert configs["router"].latents and configs["router"].text_dim == 768
    assert configs["evaluate"].prompts == spec.evaluation.prompts and configs["evaluate"].cfg_scale == 4.5
    pixels = _spec().spec  # neither: pixel space, no captions
    assert stage_config(pixels, CLUSTER, "s3://b/run")["vae"] is None
    assert stage_config(pixels, expert_key(0), "s3://b/run")["latents"] is False
    assert "text_dim" not in stage_config(pixels, ROUTER, "s3://b/run")


def test_router_maps_dit_preset_and_k() -> None:
    obj = _spec()
    cfg = stage_config(obj.spec, ROUTER, "/tmp/run")
    assert cfg["preset"] == "Router-T/4"
    assert cfg["num_clusters"] == obj.spec.clustering.num_clusters


def test_router_and_student_average_like_the_experts() -> None:
    # A short run must not sample from an EMA still at its random initialisation (trainer default 0.9999).
    obj = _spec(experts__emaDecay=0.995)
    assert stage_config(obj.spec, ROUTER, "/r")["train"]["ema_decay"] == 0.995
    assert stage_config(obj.spec, DISTILL, "/r")["train"]["ema_decay"] == 0.995


def test_distill_only_when_enabled() -> None:
    assert DISTILL in all_keys(_spec().spec)
    off = _spec(distillation__enabled=False)
    assert DISTILL not in all_keys(off.spec)


def test_command_single_process_is_plain_ddm_train() -> None:
    obj = _spec()
    assert stage_command(obj.spec, expert_key(0), "/etc/ddm/config.yaml") == [
        "ddm-train", "expert", "--config", "/etc/ddm/config.yaml"]
    assert stage_command(obj.spec, EVALUATE, "c.yaml")[:2] == ["ddm-train", "evaluate"]


def test_command_uses_torchrun_for_several_gpus_and_nodes() -> None:
    one_node = stage_command(_spec(experts__gpusPerNode=8).spec, expert_key(1), "c.yaml")
    assert one_node[0] == "ddm-launch" and "--nproc-per-node=8" in one_node and "--standalone" in one_node
    assert one_node[-5:] == ["-m", "ddm_trainer.cli", "expert", "--config", "c.yaml"]
    multi = stage_command(_spec(experts__gpusPerNode=8, experts__nodes=4).spec, expert_key(1), "c.yaml")
    assert "--nnodes=4" in multi and "--rdzv-backend=c10d" in multi
    assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in multi
    router = stage_command(_spec(router__gpusPerNode=2).spec, ROUTER, "c.yaml")
    assert router[0] == "ddm-launch" and "--nproc-per-node=2" in router
    # the clustering pod has the experts' GPUs: its encode step runs a process on each
    cluster = stage_command(_spec(experts__gpusPerNode=8).spec, CLUSTER, "c.yaml")
    assert cluster[0] == "ddm-launch" and "--nproc-per-node=8" in cluster and cluster[-3] == "cluster"
    assert stage_command(_spec(experts__gpusPerNode=0).spec, CLUSTER, "c.yaml")[0] == "ddm-train"
    # clustering.nodes: the encode step over that many pods, rendezvousing at the job's master
    from ddm_operator.stages import world_size

    spread = _spec(experts__gpusPerNode=8, clustering__nodes=3).spec
    assert world_size(spread, CLUSTER) == (3, 8)
    cluster = stage_command(spread, CLUSTER, "c.yaml")
    assert "--nnodes=3" in cluster and "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in cluster


def test_run_uri_namespaces_cluster_objects() -> None:
    obj = _spec(storage__uri="s3://bucket/ddm/")
    assert run_uri(obj.spec) == "s3://bucket/ddm"
    assert run_uri(obj.spec, "team-a", "mnist") == "s3://bucket/ddm/team-a/mnist"


def test_parse_key_round_trips() -> None:
    for key in all_keys(_spec().spec):
        assert parse_key(key.id) == key
    with pytest.raises(ValueError, match="unknown stage key"):
        parse_key("expert-x")


# Every value an enum of the API allows, each alone on the local example: the trainer must accept what the operator
# would hand it (a spec the API admits but a stage rejects fails only hours into a run, at that stage).
_VARIANTS = [
    *({"experts__modelPreset": p} for p in DIT_PRESETS),
    *({"router__preset": p} for p in DIT_PRESETS),
    *({"distillation__enabled": True, "distillation__studentPreset": p} for p in DIT_PRESETS),
    *({"distillation__enabled": True, "distillation__teacher": t} for t in ("expert-of-cluster", "ensemble")),
    *({"experts__precision": p, "router__precision": p} for p in ("fp32", "bf16")),
    *({"evaluation__method": m} for m in ("euler", "heun")),
    {"evaluation__strategies": ["full", "top1", "top-2", "sample-2", "nucleus-0.9", "nucleus-1", "oracle-2"]},
    {"clustering__method": "random"},
    {"clustering__maxClusterFraction": 0.5},
    {"experts__gpusPerNode": 8, "experts__nodes": 4, "router__gpusPerNode": 8},
    {"experts__classConditional": True, "dataset__classField": "cls", "dataset__numClasses": 10,
     "evaluation__cfgScale": 4.0},
    {"dataset__channels": 3, "dataset__imageSize": 64},
    {"evaluation__referenceSamples": 50_000, "dataset__limit": 100},
]


@pytest.mark.parametrize("changes", _VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:80])
def test_every_allowed_spec_value_gives_configs_the_trainer_accepts(changes: dict[str, object]) -> None:
    obj = _spec(**changes)
    for key in all_keys(obj.spec):
        _config_class(trainer_command(key)).model_validate(stage_config(obj.spec, key, "s3://bucket/run"))


def test_preset_sizes_match_the_trainers_models() -> None:
    """The operator is torch-free, so it keeps its own width/depth table; it must be the trainer's."""
    from ddm_operator.stages import PRESET_SIZES, preset_params
    from ddm_trainer.models.dit import DIT_PRESETS as TRAINER_PRESETS

    for preset in DIT_PRESETS:
        size = TRAINER_PRESETS[preset]
        family = preset.split("-", 1)[1].split("/", 1)[0]
        assert PRESET_SIZES[family] == (size.hidden, size.depth), preset
    assert 650e6 < preset_params("DiT-XL/2") < 700e6  # the paper's 675M (embeddings left out)


def test_grace_period_covers_the_checkpoint_and_the_spec_overrides_it() -> None:
    from ddm_operator.stages import grace_period_seconds

    xl = _spec(experts__modelPreset="DiT-XL/2").spec
    small = _spec(experts__modelPreset="DiT-S/2").spec
    # XL/2's checkpoint (fp32 weights, EMA, two AdamW moments) is ~10.8 GB: two minutes at 100 MB/s, plus start-up
    assert grace_period_seconds(xl, expert_key(0)) == 180
    assert grace_period_seconds(small, expert_key(0)) == 90
    assert grace_period_seconds(xl, expert_key(0)) % 30 == 0
    set_by_user = _spec(experts__terminationGracePeriodSeconds=900).spec
    assert grace_period_seconds(set_by_user, expert_key(1)) == 900
    assert grace_period_seconds(set_by_user, ROUTER) != 900  # the experts' field is the experts' only
    assert grace_period_seconds(xl, EVALUATE) >= 30


def test_compile_reaches_every_training_stage_and_evaluation() -> None:
    on = _spec(distillation__enabled=True).spec
    off = _spec(experts__compile=False, router__compile=False, evaluation__compile=False,
                distillation__enabled=True, distillation__compile=False).spec
    for key in (expert_key(0), ROUTER, DISTILL):
        assert stage_config(on, key, "/r")["train"]["compile"] is None  # None: the trainer compiles on CUDA only
        assert stage_config(off, key, "/r")["train"]["compile"] is False
    assert stage_config(on, EVALUATE, "/r")["compile"] is None
    assert stage_config(off, EVALUATE, "/r")["compile"] is False


def test_the_experts_steps_allocation_reaches_the_experts_not_the_monolith() -> None:
    spec = _spec(experts__stepsAllocation="proportional", baseline={"enabled": True}).spec
    parsed = _config_class("expert").model_validate(stage_config(spec, expert_key(0), "/r"))
    assert parsed.steps_allocation == "proportional" and parsed.train.steps == spec.experts.steps
    assert "steps_allocation" not in stage_config(spec, BASELINE, "/r")  # K x steps on all the data, as always
    assert stage_config(_spec().spec, expert_key(0), "/r")["steps_allocation"] == "equal"
    with pytest.raises(ValueError, match="stepsAllocation"):
        _spec(experts__stepsAllocation="by-loss")


def test_the_experts_compile_mode_reaches_the_experts_and_the_baseline_only() -> None:
    graphs = _spec(experts__compileMode="reduce-overhead", baseline={"enabled": True}).spec
    for key in (expert_key(0), BASELINE):
        train = stage_config(graphs, key, "/r")["train"]
        assert train["compile_mode"] == "reduce-overhead"
        parsed = _config_class("expert").model_validate(stage_config(graphs, key, "/r"))
        assert parsed.train.compile_mode == "reduce-overhead"
    assert "compile_mode" not in stage_config(graphs, ROUTER, "/r")["train"]  # the router keeps the default
    assert stage_config(_spec().spec, expert_key(0), "/r")["train"]["compile_mode"] == "default"
    with pytest.raises(ValueError, match="compileMode"):
        _spec(experts__compileMode="cudagraphs")
    from typing import get_args

    from ddm_operator.api.models import ExpertsSpec
    from ddm_trainer.configs.expert import CompileMode
    # the API (torch-free, no trainer import) states the modes again: the two lists must not drift
    assert get_args(ExpertsSpec.model_fields["compile_mode"].annotation) == get_args(CompileMode)


def test_the_experts_residual_precision_and_tuning_reach_the_experts_and_the_baseline() -> None:
    tuned = _spec(experts__residualPrecision="bf16", experts__coordinateDescentTuning=True,
                  baseline={"enabled": True}).spec
    for key in (expert_key(0), BASELINE):
        parsed = _config_class("expert").model_validate(stage_config(tuned, key, "/r"))
        assert parsed.train.residual_precision == "bf16" and parsed.train.coordinate_descent_tuning is True
    plain = _config_class("expert").model_validate(stage_config(_spec().spec, expert_key(0), "/r"))
    assert plain.train.residual_precision == "fp32" and plain.train.coordinate_descent_tuning is False
    with pytest.raises(ValueError, match="residualPrecision"):
        _spec(experts__residualPrecision="fp16")


def test_evaluation_samples_on_every_gpu_of_its_pod() -> None:
    from ddm_operator.stages import world_size

    spec = _spec(evaluation__gpusPerNode=4, evaluation__batchSize=512, experts__precision="bf16").spec
    assert world_size(spec, EVALUATE) == (1, 4)
    cfg = stage_config(spec, EVALUATE, "/r")
    assert cfg["batch_size"] == 512 and cfg["device"] != "cpu" and cfg["precision"] == "bf16"  # the experts' precision
    assert "ddm-launch" in " ".join(stage_command(spec, EVALUATE, "/c.json"))


def test_baseline_is_the_expert_stage_on_all_the_data_with_every_experts_images() -> None:
    obj = _spec(baseline={})
    k, steps = obj.spec.num_experts, obj.spec.experts.steps
    keys = all_keys(obj.spec)
    assert keys.index(BASELINE) == keys.index(EVALUATE) - 1 and parse_key("baseline") == BASELINE
    cfg = _config_class("expert").model_validate(stage_config(obj.spec, BASELINE, "file:///tmp/run"))
    expert = stage_config(obj.spec, expert_key(0), "file:///tmp/run")
    assert cfg.cluster_index is None and cfg.model == expert["model"] and cfg.seed == k
    assert cfg.train.steps == k * steps and cfg.train.batch_size == expert["train"]["batch_size"]  # same images seen
    assert stage_command(obj.spec, BASELINE, "/c.yaml") == ["ddm-train", "expert", "--config", "/c.yaml"]
    assert stage_config(obj.spec, EVALUATE, "/r")["strategies"][-1] == "monolith"
    assert stage_config(_spec(baseline={"steps": 7}).spec, BASELINE, "/r")["train"]["steps"] == 7
    assert BASELINE not in all_keys(_spec().spec)
    assert "monolith" not in stage_config(_spec().spec, EVALUATE, "/r")["strategies"]


def test_the_students_row_is_the_evaluation_again_with_one_more_row() -> None:
    """evaluate-student: the evaluation's own config plus the student row, so every other row's key is the same and
    its committed row is read back, not sampled again; it reports as itself (progress/evaluate-student.json)."""
    obj = _spec(baseline={}, evaluation__gpusPerNode=2)
    keys = all_keys(obj.spec)
    assert keys[-2:] == [DISTILL, STUDENT_EVAL] and parse_key("evaluate-student") == STUDENT_EVAL
    table = stage_config(obj.spec, EVALUATE, "/r")
    student = stage_config(obj.spec, STUDENT_EVAL, "/r")
    assert student["strategies"] == [*table["strategies"], "student"] and table["strategies"][-1] == "monolith"
    assert {k: v for k, v in student.items() if k != "progress"} == {**table, "strategies": student["strategies"]}
    cfg = _config_class(trainer_command(STUDENT_EVAL)).model_validate(student)
    assert cfg.progress == "evaluate-student" and cfg.output == "evaluation"
    assert stage_command(obj.spec, STUDENT_EVAL, "/c.yaml")[-3:] == ["evaluate", "--config", "/c.yaml"]
    assert "ddm-launch" in stage_command(obj.spec, STUDENT_EVAL, "/c.yaml")  # the evaluation's GPUs
    assert STUDENT_EVAL not in all_keys(_spec(distillation__enabled=False).spec)
