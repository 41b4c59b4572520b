"""The DecentralizedDiffusion API (ddm.io/v1alpha1): pydantic models, the single source of truth.

YAML/JSON use camelCase (aliases), Python uses snake_case. Unknown keys are errors at every depth.
The CRD's OpenAPI schema is generated from these models (``api/crd.py``); cross-field rules are written
once in ``RULES`` and serve both as CEL (``x-kubernetes-validations``) and as Python checks here.

Immutable after creation (CEL ``self == oldSelf``): ``spec.dataset``, ``spec.clustering``, ``spec.storage.uri``
and ``spec.experts.modelPreset`` - changing any of them would silently invalidate committed artifacts
(cluster assignments, expert checkpoints). Everything else (steps, placement, evaluation, suspend, ...) may change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

GROUP = "ddm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DecentralizedDiffusion"
PLURAL = "decentralizeddiffusions"
SINGULAR = "decentralizeddiffusion"
SHORT_NAMES = ["ddm"]

DiTPreset = Literal[
    "DiT-T/2", "DiT-T/4", "DiT-S/2", "DiT-S/4", "DiT-B/2", "DiT-B/4", "DiT-L/2", "DiT-L/4", "DiT-XL/2", "DiT-XL/4"
]
DIT_PRESETS: tuple[str, ...] = DiTPreset.__args__  # type: ignore[attr-defined]

# Sampling strategies (see ddm_trainer.combine): full | top1 | top-K | sample-K | nucleus-P (0<P<=1) | oracle-K
STRATEGY_PATTERN = r"^(full|top1|top-[1-9][0-9]{0,3}|sample-[1-9][0-9]{0,3}|nucleus-(0\.[0-9]*[1-9][0-9]*|1|1\.0+)|oracle-[1-9][0-9]{0,3})$"
# file:///absolute/path, s3://bucket[/prefix], or a plain path without a scheme (local runner only)
STORAGE_URI_PATTERN = r"^(file:///.*|s3://[a-z0-9][a-z0-9.\-]{0,62}(/.*)?|[^:]+)$"
# The dataset may also be an http(s) URL of shards.
DATA_URI_PATTERN = r"^(file:///.*|s3://[a-z0-9][a-z0-9.\-]{0,62}(/.*)?|https?://.+|[^:]+)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

URI_MAX = 2048
NAME_MAX = 253
MAX_CLUSTERS = 1024
MAX_FINE_CLUSTERS = 65536


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, validate_assignment=True
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict as stored in Kubernetes (None fields left out: every None here is also the default)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- placement


class Toleration(ApiModel):
    key: str | None = Field(None, max_length=NAME_MAX)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=NAME_MAX)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


Quantity = int | Annotated[str, StringConstraints(max_length=64)]  # Kubernetes quantity: 8, "80Gi", "500m"
LabelValue = Annotated[str, StringConstraints(max_length=63)]


class Resources(ApiModel):
    """Container resources of each pod (e.g. ``limits: {nvidia.com/gpu: 8}``)."""

    requests: dict[str, Quantity] | None = Field(None, max_length=16)
    limits: dict[str, Quantity] | None = Field(None, max_length=16)


class Placement(ApiModel):
    """Where a stage's pods run. Every field is optional; per-expert overrides replace fields they set."""

    node_selector: dict[str, LabelValue] | None = Field(None, max_length=32)
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    affinity: dict[str, Any] | None = Field(None, description="A core/v1 Affinity object, passed through as is")
    resources: Resources | None = None
    priority_class_name: str | None = Field(None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN)
    kueue_queue_name: str | None = Field(None, max_length=63, description="Kueue LocalQueue: sets kueue.x-k8s.io/queue-name")
    target_cluster: str | None = Field(
        None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of a Secret (in this namespace) holding a kubeconfig of the cluster to run on",
    )
    pod_labels: dict[str, LabelValue] | None = Field(
        None, max_length=32, description="Labels added to the stage's pods (the operator's own ddm.io/* labels win)")
    pod_annotations: dict[str, Annotated[str, StringConstraints(max_length=4096)]] | None = Field(
        None, max_length=32, description="Annotations added to the stage's pods (e.g. a sidecar opt-out)")

    def merged_with(self, override: Placement | None) -> Placement:
        """This placement with every field the override sets replaced by the override's value."""
        if override is None:
            return self
        fields = {name: value for name, value in override if value is not None}
        return self.model_copy(update=fields)


class PlacementOverride(ApiModel):
    experts: list[int] = Field(min_length=1, max_length=MAX_CLUSTERS, description="Expert (cluster) indices")
    placement: Placement

    @field_validator("experts")
    @classmethod
    def _indices(cls, v: list[int]) -> list[int]:
        bad = [i for i in v if i < 0]
        if bad:
            raise ValueError(f"expert indices must be >= 0, got {bad}")
        return v


# ---------------------------------------------------------------- spec sections


class DatasetSpec(ApiModel):
    uri: str = Field(max_length=URI_MAX, pattern=DATA_URI_PATTERN, description="Shards, a folder, or a store URI")
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    class_field: str | None = Field(
        None, max_length=64, description="Per-sample key of the class index (e.g. cls); needed by classConditional experts"
    )
    num_classes: int | None = Field(
        None, ge=1, le=1_000_000, description="Number of classes (indices 0..N-1); needed by classConditional experts"
    )
    caption_field: str | None = Field(None, max_length=64, description="Per-sample key of the caption")
    limit: int | None = Field(None, ge=1, description="Use only the first N samples")


class ClusteringSpec(ApiModel):
    encoder: str = Field("dinov2_vitl14", max_length=128, description="Feature encoder (timm name or built-in)")
    encoder_weights: str | None = Field(None, max_length=URI_MAX, pattern=DATA_URI_PATTERN, description="Encoder weights URI")
    fine_clusters: int = Field(1024, ge=1, le=MAX_FINE_CLUSTERS, description="Fine k-means centroids before merging")
    num_clusters: int = Field(ge=1, le=MAX_CLUSTERS, description="K: number of coarse clusters = experts")
    max_cluster_fraction: float | None = Field(None, gt=0, le=1, description="Balance bound: no cluster above this share")
    method: Literal["kmeans", "random"] = "kmeans"
    seed: int = Field(0, ge=0)


class ExpertsSpec(ApiModel):
    model_preset: DiTPreset = "DiT-XL/2"
    steps: int = Field(gt=0, le=100_000_000)
    batch_size: int = Field(256, gt=0, le=1_000_000, description="Global batch size per expert")
    lr: float = Field(1e-4, gt=0, le=1)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    precision: Literal["fp32", "bf16"] = "bf16"
    compile: bool = Field(True, description="Regional torch.compile on CUDA (no effect on CPU); false to debug")
    checkpoint_every: int = Field(5000, gt=0)
    termination_grace_period_seconds: int | None = Field(
        None, ge=1, le=86_400,
        description="Pod grace period after SIGTERM, for the checkpoint to commit (default: from the preset's size)",
    )
    class_conditional: bool = False
    label_dropout: float = Field(0.1, ge=0, le=1)
    gpus_per_node: int = Field(1, ge=0, le=64)
    nodes: int = Field(1, ge=1, le=1024)
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}})
    overrides: list[PlacementOverride] = Field(
        default_factory=list, max_length=64, description="Per-expert placement: fields set here replace the default"
    )

    def placement_for(self, index: int) -> Placement:
        """Placement of expert ``index``: the default merged with every override naming it (later ones win)."""
        placement = self.placement
        for override in self.overrides:
            if index in override.experts:
                placement = placement.merged_with(override.placement)
        return placement


class RouterSpec(ApiModel):
    preset: DiTPreset = "DiT-B/2"
    steps: int = Field(50_000, gt=0, le=100_000_000)
    batch_size: int = Field(256, gt=0, le=1_000_000)
    lr: float = Field(1e-4, gt=0, le=1)
    precision: Literal["fp32", "bf16"] = "bf16"
    compile: bool = Field(True, description="Regional torch.compile on CUDA (no effect on CPU)")
    gpus_per_node: int = Field(1, ge=0, le=64)
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}})


class EvaluationSpec(ApiModel):
    strategies: list[str] = Field(
        default_factory=lambda: ["full", "top1"], min_length=1, max_length=16,
        json_schema_extra={"default": ["full", "top1"], "items": {"type": "string", "maxLength": 32, "pattern": STRATEGY_PATTERN}},
    )
    num_samples: int = Field(10_000, ge=1, le=1_000_000)
    steps: int = Field(50, gt=0, le=10_000, description="Sampler steps (NFE per expert)")
    method: Literal["euler", "heun"] = "euler"
    reference_samples: int | None = Field(None, ge=1, description="Real images for FID statistics (default: numSamples)")
    cfg_scale: float = Field(1.0, ge=0, le=100, description="Classifier-free guidance scale (class-conditional experts)")
    batch_size: int | None = Field(None, ge=1, le=65_536, description="Images per sampling batch and GPU (default: 1024 on a GPU, 256 on a CPU)")
    compile: bool = Field(True, description="Regional torch.compile of experts and router on CUDA")
    gpus_per_node: int = Field(1, ge=0, le=64, description="GPUs sampling in parallel (torchrun ranks, disjoint seeds)")
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}})

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v: list[str]) -> list[str]:
        for s in v:
            if not re.match(STRATEGY_PATTERN, s):
                raise ValueError(f"unknown strategy {s!r} (full, top1, top-K, sample-K, nucleus-P, oracle-K)")
        return v


class DistillationSpec(ApiModel):
    enabled: bool = False
    student_preset: DiTPreset = "DiT-B/2"
    teacher: Literal["expert-of-cluster", "ensemble"] = "ensemble"
    steps: int = Field(100_000, gt=0, le=100_000_000)
    batch_size: int = Field(256, gt=0, le=1_000_000)
    lr: float = Field(1e-4, gt=0, le=1)
    compile: bool = Field(True, description="Regional torch.compile of the student on CUDA")
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}})


class StorageSpec(ApiModel):
    uri: str = Field(max_length=URI_MAX, pattern=STORAGE_URI_PATTERN, description="Run root: file:///path or s3://bucket/prefix")
    credentials_secret: str | None = Field(
        None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL",
    )


class FailurePolicy(ApiModel):
    max_retries_per_expert: int = Field(3, ge=0, le=100)
    max_retries_per_stage: int = Field(2, ge=0, le=100, description="Retries of clustering, router, evaluation, distillation")
    backoff_seconds: int = Field(30, ge=0, le=86_400, description="First retry delay; doubles per attempt, capped at 1 h")
    min_experts: int | None = Field(
        None, ge=1, le=MAX_CLUSTERS, description="Experts that must succeed to continue (default: all numClusters)"
    )


class DecentralizedDiffusionSpec(ApiModel):
    dataset: DatasetSpec
    clustering: ClusteringSpec
    experts: ExpertsSpec
    router: RouterSpec = Field(default_factory=RouterSpec, json_schema_extra={"default": {}})
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, json_schema_extra={"default": {}})
    distillation: DistillationSpec | None = None
    storage: StorageSpec
    trainer_image: str = Field("ghcr.io/ddm/ddm-trainer:0.1.0", max_length=512)
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, json_schema_extra={"default": {}})
    suspend: bool = False
    parallelism: int | None = Field(None, ge=1, le=MAX_CLUSTERS, description="Max experts training at once")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> DecentralizedDiffusionSpec:
        violations = check_rules(self)
        if violations:
            raise PydanticCustomError("ddm_rule", "{lines}", {"lines": "\n".join(violations)})
        return self

    @property
    def num_experts(self) -> int:
        return self.clustering.num_clusters

    @property
    def min_experts(self) -> int:
        """How many experts must succeed for the ensemble to be evaluated."""
        return self.failure_policy.min_experts or self.clustering.num_clusters

    @property
    def distill_enabled(self) -> bool:
        return self.distillation is not None and self.distillation.enabled


# ---------------------------------------------------------------- cross-field rules (CEL + Python, written once)


@dataclass(frozen=True)
class Rule:
    """One cross-field rule. ``at``: alias path below ``spec`` where the CEL sits; ``field``: the field it blames."""

    at: tuple[str, ...]
    field: str
    cel: str
    message: str
    check: Callable[[Any], bool]  # the model at ``at``; True = valid
    got: Callable[[Any], str] = lambda m: ""

    @property
    def field_path(self) -> str:
        return ".".join(("spec", *self.at, self.field))


def _spec_rule_strategies_unique(ev: EvaluationSpec) -> bool:
    return len(set(ev.strategies)) == len(ev.strategies)


def _patch(preset: str) -> int:
    """'DiT-XL/2' -> 2."""
    return int(preset.rsplit("/", 1)[1])


def _patch_rule(section: str, field: str, attr: Callable[[Any], str | None], enabled: str = "") -> Rule:
    """``spec.<section>.<field>`` (a DiT preset) must tile spec.dataset.imageSize into whole patches."""
    preset = f"self.{section}.{field}"
    guard = f"!has(self.{section}) || !has({preset})" + (f" || !has(self.{section}.{enabled}) || !self.{section}.{enabled}"
                                                        if enabled else "")
    return Rule(
        at=(), field=f"{section}.{field}",
        cel=f"{guard} || self.dataset.imageSize % int({preset}.substring({preset}.lastIndexOf('/') + 1)) == 0",
        message="patch size must divide spec.dataset.imageSize (e.g. a /4 preset needs a multiple of 4)",
        check=lambda s: (p := attr(s)) is None or s.dataset.image_size % _patch(p) == 0,
        got=lambda s: f"preset={attr(s)}, imageSize={s.dataset.image_size}",
    )


def _strategy_fits(strategy: str, num_clusters: int) -> bool:
    """top-K / sample-K keep at most K = numClusters experts; oracle-C names a cluster 0..numClusters-1."""
    kind, _, number = strategy.partition("-")
    if kind in ("top", "sample") and number.isdigit():
        return int(number) <= num_clusters
    if kind == "oracle" and number.isdigit():
        return int(number) < num_clusters
    return True


RULES: tuple[Rule, ...] = (
    Rule(
        at=("clustering",), field="fineClusters",
        cel="!has(self.fineClusters) || self.fineClusters >= self.numClusters",
        message="must be >= spec.clustering.numClusters",
        check=lambda c: c.fine_clusters >= c.num_clusters,
        got=lambda c: f"fineClusters={c.fine_clusters}, numClusters={c.num_clusters}",
    ),
    Rule(
        at=("clustering",), field="maxClusterFraction",
        cel="!has(self.maxClusterFraction) || self.maxClusterFraction * double(self.numClusters) >= 1.0",
        message="times spec.clustering.numClusters must be >= 1 (no feasible balanced split)",
        check=lambda c: c.max_cluster_fraction is None or c.max_cluster_fraction * c.num_clusters >= 1.0,
        got=lambda c: f"maxClusterFraction={c.max_cluster_fraction}, numClusters={c.num_clusters}",
    ),
    Rule(
        at=(), field="failurePolicy.minExperts",
        cel="!has(self.failurePolicy) || !has(self.failurePolicy.minExperts)"
        " || self.failurePolicy.minExperts <= self.clustering.numClusters",
        message="must be <= spec.clustering.numClusters",
        check=lambda s: s.failure_policy.min_experts is None or s.failure_policy.min_experts <= s.clustering.num_clusters,
        got=lambda s: f"minExperts={s.failure_policy.min_experts}, numClusters={s.clustering.num_clusters}",
    ),
    Rule(
        at=(), field="experts.overrides",
        cel="!has(self.experts.overrides) || self.experts.overrides.all(o, o.experts.all(e, e < self.clustering.numClusters))",
        message="expert indices must be < spec.clustering.numClusters",
        check=lambda s: all(e < s.clustering.num_clusters for o in s.experts.overrides for e in o.experts),
        got=lambda s: f"indices={sorted({e for o in s.experts.overrides for e in o.experts})}, numClusters={s.clustering.num_clusters}",
    ),
    Rule(
        at=(), field="experts.classConditional",
        cel="!has(self.experts.classConditional) || !self.experts.classConditional || has(self.dataset.classField)",
        message="needs spec.dataset.classField (the per-sample key of the class index)",
        check=lambda s: not s.experts.class_conditional or s.dataset.class_field is not None,
    ),
    Rule(
        at=(), field="experts.classConditional",
        cel="!has(self.experts.classConditional) || !self.experts.classConditional || has(self.dataset.numClasses)",
        message="needs spec.dataset.numClasses (every expert's label embedding has one row per class)",
        check=lambda s: not s.experts.class_conditional or s.dataset.num_classes is not None,
    ),
    _patch_rule("experts", "modelPreset", lambda s: s.experts.model_preset),
    _patch_rule("router", "preset", lambda s: s.router.preset),
    _patch_rule("distillation", "studentPreset", lambda s: s.distillation.student_preset if s.distill_enabled else None,
                enabled="enabled"),
    Rule(
        at=(), field="evaluation.strategies",
        cel="!has(self.evaluation) || !has(self.evaluation.strategies) || self.evaluation.strategies.all(s,"
            " (s.matches('^(top|sample)-[0-9]+$') ? int(s.substring(s.indexOf('-') + 1)) <= self.clustering.numClusters"
            " : true) && (s.matches('^oracle-[0-9]+$') ? int(s.substring(7)) < self.clustering.numClusters : true))",
        message="top-K and sample-K need K <= spec.clustering.numClusters; oracle-C needs C < numClusters (0-based)",
        check=lambda s: all(_strategy_fits(x, s.clustering.num_clusters) for x in s.evaluation.strategies),
        got=lambda s: f"strategies={s.evaluation.strategies}, numClusters={s.clustering.num_clusters}",
    ),
    Rule(
        at=("storage",), field="credentialsSecret",
        cel="!has(self.credentialsSecret) || self.uri.startsWith('s3://')",
        message="is only meaningful with an s3:// spec.storage.uri",
        check=lambda st: st.credentials_secret is None or st.uri.startswith("s3://"),
        got=lambda st: f"uri={st.uri}",
    ),
    Rule(
        at=("evaluation",), field="strategies",
        cel="!has(self.strategies) || self.strategies.all(s, self.strategies.exists_one(t, t == s))",
        message="must not repeat a strategy",
        check=_spec_rule_strategies_unique,
        got=lambda ev: f"strategies={ev.strategies}",
    ),
)

# Fields that may not change after creation: (alias path below spec, CEL message).
IMMUTABLE_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("dataset",), "spec.dataset is immutable (create a new DecentralizedDiffusion)"),
    (("clustering",), "spec.clustering is immutable (create a new DecentralizedDiffusion)"),
    (("storage", "uri"), "spec.storage.uri is immutable"),
    (("experts", "modelPreset"), "spec.experts.modelPreset is immutable"),
)


def _model_at(spec: DecentralizedDiffusionSpec, at: tuple[str, ...]) -> Any:
    node: Any = spec
    for alias in at:
        node = getattr(node, _snake(alias))
    return node


def _snake(alias: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), alias)


def check_rules(spec: DecentralizedDiffusionSpec) -> list[str]:
    """One line per violated cross-field rule: ``spec.a.b: message (got ...)``."""
    lines = []
    for rule in RULES:
        model = _model_at(spec, rule.at)
        if not rule.check(model):
            got = rule.got(model)
            lines.append(f"{rule.field_path}: {rule.message}" + (f" (got {got})" if got else ""))
    return lines


def immutable_changes(old: DecentralizedDiffusionSpec, new: DecentralizedDiffusionSpec) -> list[str]:
    """The same check as the CEL transition rules, for updates outside an API server."""
    lines = []
    for at, message in IMMUTABLE_FIELDS:
        if _model_at(old, at) != _model_at(new, at):
            lines.append(f"spec.{'.'.join(at)}: {message}")
    return lines


# ---------------------------------------------------------------- status

Phase = Literal["Pending", "Clustering", "Training", "Evaluating", "Distilling", "Succeeded", "Failed", "Degraded", "Suspended"]
StagePhase = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed", "Suspended"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    type: str = Field(max_length=64)
    status: ConditionStatus
    reason: str = Field("", max_length=128)
    message: str = Field("", max_length=4096)
    last_transition_time: str | None = Field(None, description="RFC 3339")
    observed_generation: int | None = None


class StageStatus(ApiModel):
    phase: StagePhase = "Pending"
    attempts: int = 0
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    job_name: str | None = None


class StagesStatus(ApiModel):
    clustering: StageStatus | None = None
    router: StageStatus | None = None
    evaluation: StageStatus | None = None
    distillation: StageStatus | None = None


class ExpertStatus(ApiModel):
    index: int
    phase: StagePhase = "Pending"
    step: int = 0
    total_steps: int = 0
    last_checkpoint: str | None = None
    retries: int = 0
    cluster: str | None = Field(None, description="Where it runs: a targetCluster name, or empty for this cluster")
    job_name: str | None = None
    message: str = ""


class RouterStatus(ApiModel):
    phase: StagePhase = "Pending"
    step: int = 0
    total_steps: int = 0
    accuracy: float | None = None
    uri: str | None = None


class StrategyResult(ApiModel):
    strategy: str
    fid: float
    kid: float | None = None
    num_samples: int | None = None
    nfe: float | None = Field(None, description="Expert evaluations per sample (fractional for nucleus/sample-k)")
    gflops_per_sample: float | None = None


class Results(ApiModel):
    fid: list[StrategyResult] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict, description="Name -> URI (experts, router, student, ...)")
    report_uri: str | None = None


class DecentralizedDiffusionStatus(ApiModel):
    # The operator framework stores its own bookkeeping in status too: tolerate unknown keys when reading.
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    phase: Phase = "Pending"
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    stages: StagesStatus = Field(default_factory=StagesStatus)
    experts: list[ExpertStatus] = Field(default_factory=list)
    experts_ready: int = 0
    experts_total: int = 0
    router: RouterStatus | None = None
    best_fid: float | None = None
    results: Results | None = None


# ---------------------------------------------------------------- the whole object


class ObjectMeta(BaseModel):
    """The parts of metadata we read; everything else the API server adds is kept as is."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN)
    namespace: str | None = Field(None, max_length=63, pattern=DNS_LABEL_PATTERN)
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class DecentralizedDiffusion(ApiModel):
    api_version: Literal["ddm.io/v1alpha1"]
    kind: Literal["DecentralizedDiffusion"]
    metadata: ObjectMeta
    spec: DecentralizedDiffusionSpec
    status: DecentralizedDiffusionStatus | None = None
