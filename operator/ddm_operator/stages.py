"""Each pipeline stage defined once: its trainer config and its command, for the local runner and the operator alike.

``stage_config(spec, key, run_uri)`` is the one mapping from the DecentralizedDiffusion spec (camelCase API) to a
trainer stage config (``ddm_trainer.configs.*``, snake_case); ``stage_command(spec, key, config_path)`` is the
one command line that runs it (``ddm-train``, or ``ddm-launch``, torchrun with the workers' own exit code, when a stage
spans several GPUs or nodes).
Torch-free: only plain dicts and strings; the trainer's pydantic classes validate the dicts (see the unit tests).

Why not TorchX AppDefs: TorchX's stable release (0.7.0) pins ``urllib3<1.27``, which kubernetes 37 cannot install
beside; only nightlies resolve. An AppDef would also add a layer between these two functions and the PyTorchJob
the operator builds, without giving us anything the PyTorchJob (retries by exit code, elastic torchrun) lacks.
"""
from __future__ import annotations

from typing import Any

from ddm_trainer import layout

from .api.models import DecentralizedDiffusionSpec
from .planner import BASELINE, CLUSTER, DISTILL, EVALUATE, ROUTER, STUDENT_EVAL, StageKey, expert_key, probe_key

__all__ = [
    "StageKey", "CLUSTER", "ROUTER", "EVALUATE", "DISTILL", "BASELINE", "STUDENT_EVAL", "expert_key", "trainer_command",
    "all_keys", "stage_config", "stage_command", "run_uri", "world_size", "parse_key", "grace_period_seconds",
]

CONFIG_FILE_NAME = "config.yaml"


def all_keys(spec: DecentralizedDiffusionSpec) -> list[StageKey]:
    """Every stage of the run, in pipeline order."""
    keys = [CLUSTER, *(expert_key(k) for k in range(spec.num_experts)), ROUTER, EVALUATE]
    if spec.baseline_enabled:
        keys.insert(-1, BASELINE)
    if spec.distill_enabled:
        keys += [DISTILL, STUDENT_EVAL]
    return keys


def parse_key(text: str) -> StageKey:
    """``"expert-003"`` -> ``StageKey("expert", 3)``; ``"router"`` -> ``StageKey("router")``."""
    stage, sep, index = text.partition("-")
    if sep and index.isdigit() and stage == "expert":
        return expert_key(int(index))
    if sep and index.isdigit() and stage == "probe":
        return probe_key(int(index))
    if not sep and stage in ("cluster", "router", "baseline", "evaluate", "distill"):
        return StageKey(stage)  # type: ignore[arg-type]
    if text == STUDENT_EVAL.id:
        return STUDENT_EVAL
    raise ValueError(f"unknown stage key {text!r} (cluster, expert-NNN, router, baseline, probe-NNN, evaluate, "
                     "distill, evaluate-student)")


def run_uri(spec: DecentralizedDiffusionSpec, namespace: str | None = None, name: str | None = None) -> str:
    """The run's root: ``spec.storage.uri``, plus ``/<namespace>/<name>`` for an object in a cluster, so two
    DecentralizedDiffusions sharing a bucket never share artifacts. The local runner passes neither."""
    base = spec.storage.uri.rstrip("/")
    parts = [p for p in (namespace, name) if p]
    return "/".join([base, *parts])


def world_size(spec: DecentralizedDiffusionSpec, key: StageKey) -> tuple[int, int]:
    """(nodes, processes per node) of a stage. gpusPerNode 0 means CPU: one process."""
    if key.stage in ("expert", "baseline"):
        return spec.experts.nodes, max(spec.experts.gpus_per_node, 1)
    if key.stage == "router":
        return 1, max(spec.router.gpus_per_node, 1)
    if key.stage in ("evaluate", "evaluate-student"):
        return 1, max(spec.evaluation.gpus_per_node, 1)
    if key.stage == "cluster":  # its pods have the experts' GPUs (default placement): the encode step uses them all
        return spec.clustering.nodes, max(spec.experts.gpus_per_node, 1)
    return 1, 1


# (hidden width, depth) of each DiT preset family: the trainer's ddm_trainer.models.dit.DIT_PRESETS, kept here so
# the operator stays torch-free (a unit test compares the two).
PRESET_SIZES = {"T": (128, 4), "S": (384, 12), "B": (768, 12), "L": (1024, 24), "XL": (1152, 28)}
# A checkpoint holds fp32 weights, EMA and AdamW's two moments: 16 bytes per parameter. The grace period covers
# writing it at a conservative store rate (the H200 run measured DiT-XL/2's 10.8 GB synchronous save, see
# BENCHMARKS.md) plus process start-up of the save path.
CHECKPOINT_BYTES_PER_PARAM = 16
GRACE_WRITE_BYTES_PER_S = 100e6
GRACE_BASE_S = 60


def preset_params(preset: str) -> int:
    """Approximate parameters of a DiT/Router preset: 18 D^2 per block (QKV 3, projection 1, MLP 8, adaLN 6)."""
    family = preset.split("-", 1)[1].split("/", 1)[0]
    width, depth = PRESET_SIZES[family]
    return 18 * width * width * depth


def grace_period_seconds(spec: DecentralizedDiffusionSpec, key: StageKey) -> int:
    """terminationGracePeriodSeconds of a stage's pods: the experts' spec value for experts, else enough to commit the checkpoint
    of the stage's model after SIGTERM (rounded up to 30 s)."""
    if key.stage in ("expert", "baseline") and spec.experts.termination_grace_period_seconds is not None:
        return spec.experts.termination_grace_period_seconds
    preset = {"expert": spec.experts.model_preset, "baseline": spec.experts.model_preset, "router": spec.router.preset,
              "distill": spec.distillation.student_preset if spec.distillation else None}.get(key.stage)
    if preset is None:  # clustering and evaluation commit small results: the Kubernetes default is plenty
        return 30 + GRACE_BASE_S
    seconds = GRACE_BASE_S + preset_params(preset) * CHECKPOINT_BYTES_PER_PARAM / GRACE_WRITE_BYTES_PER_S
    return int(-(-seconds // 30) * 30)


def _per_process(global_batch: int, processes: int) -> int:
    return max(global_batch // processes, 1)


def _data(spec: DecentralizedDiffusionSpec) -> dict[str, Any]:
    d = spec.dataset
    return {"uri": d.uri, "image_size": d.image_size, "channels": d.channels, "class_field": d.class_field,
            "caption_field": d.caption_field, "limit": d.limit}


def _text_encoder(spec: DecentralizedDiffusionSpec) -> dict[str, Any] | None:
    t = spec.text_encoder
    return None if t is None else {"kind": t.kind, "uri": t.uri, "width": t.width, "max_tokens": t.max_tokens}


def _vae(spec: DecentralizedDiffusionSpec) -> dict[str, Any] | None:
    v = spec.vae
    return None if v is None else {"uri": v.uri, "scaling_factor": v.scaling_factor, "shift_factor": v.shift_factor}


def _text(spec: DecentralizedDiffusionSpec) -> dict[str, Any]:
    """A trained model's text conditioning: the text encoder's width and tokens, or none."""
    t = spec.text_encoder
    return {} if t is None else {"text_dim": t.width, "text_tokens": t.max_tokens}


def _preview(spec: DecentralizedDiffusionSpec) -> dict[str, Any]:
    """The sample grid a trained model commits beside itself: drawn like the evaluation draws (steps, method)."""
    v = spec.evaluation
    return {"steps": v.steps, "method": v.method, "cfg_scale": v.cfg_scale}


def _router_holdout(spec: DecentralizedDiffusionSpec) -> int:
    """Images held out to measure router accuracy vs t: 512, but at most a tenth of a limited dataset."""
    return 512 if spec.dataset.limit is None else min(512, spec.dataset.limit // 10)


def _device(spec: DecentralizedDiffusionSpec, gpus_per_node: int | None) -> str:
    return "cpu" if gpus_per_node == 0 else "auto"


def _compile(enabled: bool) -> bool | None:
    """Spec ``compile: true`` -> the trainer's null (compile on CUDA only); false -> never."""
    return None if enabled else False


def stage_config(spec: DecentralizedDiffusionSpec, key: StageKey, run_uri: str) -> dict[str, Any]:
    """The trainer config (a plain dict, snake_case) that runs stage ``key`` of this spec under ``run_uri``."""
    base: dict[str, Any] = {"run_uri": run_uri}
    if key.stage == "cluster":
        c = spec.clustering
        return {**base, "seed": c.seed, "data": _data(spec), "encoder": c.encoder, "encoder_weights": c.encoder_weights,
                "fine_clusters": c.fine_clusters, "num_clusters": c.num_clusters,
                "max_cluster_fraction": c.max_cluster_fraction, "method": c.method, "growth": _growth(spec),
                "text_encoder": _text_encoder(spec), "vae": _vae(spec)}
    if key.stage in ("expert", "baseline"):
        if key.stage == "expert" and (key.index is None or not 0 <= key.index < spec.num_experts):
            raise ValueError(f"expert index {key.index} is outside 0..{spec.num_experts - 1}")
        e = spec.experts
        nodes, per_node = world_size(spec, key)
        # The baseline is `ddm-train expert` on all the data (cluster_index null -> experts/monolith), with the
        # experts' preset, batch and schedule, and as many steps as all experts together unless the spec says.
        steps = e.steps if key.stage == "expert" else baseline_steps(spec)
        return {**base, "seed": key.index if key.index is not None else spec.num_experts,
                "device": _device(spec, e.gpus_per_node), "data": _data(spec),
                "cluster_index": key.index, "model": e.model_preset, "class_cond": e.class_conditional,
                "num_classes": spec.dataset.num_classes if e.class_conditional else None,
                "label_dropout": e.label_dropout, "sample_grid": _preview(spec),
                **({"steps_allocation": e.steps_allocation} if key.stage == "expert" else {}),
                # growth.retrain grown: an expert of the parent's clusters starts from the parent's weights
                **({"init_from_parent": True} if spec.growth is not None and spec.growth.retrain == "grown"
                   and key.stage == "expert" else {}),
                **_text(spec), **({"caption_dropout": e.caption_dropout} if spec.text_encoder else {}),
                "latents": spec.vae is not None,
                "train": {"steps": steps, "batch_size": _per_process(e.batch_size, nodes * per_node), "lr": e.lr,
                          "ema_decay": e.ema_decay, "precision": e.precision, "ckpt_every": e.checkpoint_every,
                          "compile": _compile(e.compile), "compile_mode": e.compile_mode,
                          "coordinate_descent_tuning": e.coordinate_descent_tuning,
                          "residual_precision": e.residual_precision, "micro_batch_size": e.micro_batch_size,
                          "activation_checkpointing": e.activation_checkpointing}}
    if key.stage == "router":
        r = spec.router
        _, per_node = world_size(spec, key)
        # EMA decay: the experts' (the router samples with its EMA; the trainer's 0.9999 default would leave a
        # short run's EMA at its random initialisation).
        return {**base, "device": _device(spec, r.gpus_per_node), "data": _data(spec),
                "preset": r.preset.replace("DiT-", "Router-"), "num_clusters": spec.num_experts,
                # class-conditional experts: the router sees the label too, p(k | x_t, t, y)
                "num_classes": spec.dataset.num_classes if spec.experts.class_conditional else None,
                # text-conditioned experts: the router sees the pooled caption, p(k | x_t, t, c)
                **({"text_dim": spec.text_encoder.width} if spec.text_encoder else {}),
                "latents": spec.vae is not None,
                "eval": {"holdout": _router_holdout(spec)},
                "train": {"steps": r.steps, "batch_size": _per_process(r.batch_size, per_node), "lr": r.lr,
                          "precision": r.precision, "ckpt_every": spec.experts.checkpoint_every,
                          "ema_decay": spec.experts.ema_decay, "compile": _compile(r.compile)}}
    if key.stage in ("evaluate", "probe", "evaluate-student"):
        v = spec.evaluation
        reference = v.reference_samples or v.num_samples
        strategies = [*v.strategies, *(["monolith"] if spec.baseline_enabled else [])]
        if spec.growth is not None and spec.growth.compare_parent:  # the parent's ensemble on the same references
            strategies += [f"parent:{s}" for s in v.strategies]
        steps, output, progress = v.steps, None, None
        if key.stage == "evaluate-student":  # the same table plus the student: the other rows are read back
            strategies, progress = [*strategies, "student"], key.id
        if key.stage == "probe":  # the partial ensemble's lightweight evaluation (spec.evaluation.partial)
            if v.partial is None:
                raise ValueError("spec.evaluation.partial is not set: there is no probe stage")
            reference, strategies, steps = v.partial.num_samples, [v.partial.strategy], v.partial.steps or v.steps
            output = partial_prefix(key.index or 0)
        if spec.dataset.limit is not None:
            reference = min(reference, spec.dataset.limit)  # cannot reference more images than the run reads
        return {**base, "device": _device(spec, v.gpus_per_node), "data": _data(spec),
                "strategies": strategies, **({"output": output} if output else {}),
                **({"progress": progress} if progress else {}),
                "n_samples": max(v.partial.num_samples if key.stage == "probe" else v.num_samples, 2),  # type: ignore[union-attr]
                "reference_n": max(reference, 2), "steps": steps, "method": v.method, "cfg_scale": v.cfg_scale,
                "batch_size": v.batch_size, "compile": _compile(v.compile),
                **({"prompts": v.prompts} if v.prompts and key.stage != "probe" else {}),  # not the probes
                "precision": spec.experts.precision}
    if key.stage == "distill":
        if spec.distillation is None:
            raise ValueError("spec.distillation is not set: there is no distill stage")
        s = spec.distillation
        # The spec has one precision, checkpoint interval and EMA decay for trained models: the experts'.
        return {**base, "device": _device(spec, spec.experts.gpus_per_node), "data": _data(spec),
                "model": s.student_preset, "teacher": s.teacher, "sample_grid": _preview(spec),
                # the experts' rates: the student learns the unconditional velocity the experts' guidance uses
                "label_dropout": spec.experts.label_dropout, "caption_dropout": spec.experts.caption_dropout,
                "train": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr,
                          "precision": spec.experts.precision, "ckpt_every": spec.experts.checkpoint_every,
                          "ema_decay": spec.experts.ema_decay, "compile": _compile(s.compile)}}
    raise ValueError(f"unknown stage {key.stage!r}")


def stage_command(spec: DecentralizedDiffusionSpec, key: StageKey, config_path: str) -> list[str]:
    """``ddm-train STAGE --config PATH``; with several processes, the same under ``ddm-launch`` (torchrun's own
    launcher, exiting with the failed workers' most telling code where torchrun exits 1: ddm_trainer/launch.py).

    Multi-node runs rendezvous (c10d) at the PyTorchJob master's ``$(MASTER_ADDR):$(MASTER_PORT)``, which
    Kubernetes expands from the container's environment when it starts the pod.
    """
    nodes, per_node = world_size(spec, key)
    command = trainer_command(key)
    if nodes == 1 and per_node == 1:
        return ["ddm-train", command, "--config", config_path]
    launcher = ["ddm-launch", f"--nnodes={nodes}", f"--nproc-per-node={per_node}"]
    if nodes > 1:
        launcher += ["--rdzv-backend=c10d", "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)", f"--rdzv-id={key.id}"]
    else:
        launcher += ["--standalone"]
    return [*launcher, "-m", "ddm_trainer.cli", command, "--config", config_path]


def trainer_command(key: StageKey) -> str:
    """The ``ddm-train`` command that runs a stage: the baseline is the expert stage on all the data, a probe (the
    partial ensemble's lightweight evaluation) and the student's row (evaluate-student) the evaluate stage."""
    return {"baseline": "expert", "probe": "evaluate", "evaluate-student": "evaluate"}.get(key.stage, key.stage)


def partial_prefix(experts: int) -> str:
    """Where probe-NNN commits its results: ``partial/NNN`` (NNN: committed experts when it was launched)."""
    return f"{layout.PARTIAL}/{experts:03d}"


def _growth(spec: DecentralizedDiffusionSpec) -> dict[str, Any] | None:
    g = spec.growth
    if g is None:
        return None
    return {"parent_uri": g.parent_uri, "assignment": "new-clusters" if g.assignment == "newClusters" else "nearest"}


def baseline_steps(spec: DecentralizedDiffusionSpec) -> int:
    """The monolith's steps: spec.baseline.steps, else K x the experts' steps (the same images seen, at the same
    batch, as all experts together: the paper's compute-matched comparison; the router's cost is reported apart)."""
    given = spec.baseline.steps if spec.baseline is not None else None
    return given if given is not None else spec.num_experts * spec.experts.steps
