"""The DecentralizedDiffusion API (ddm.io/v1alpha1): pydantic models, the single source of truth.

YAML/JSON use camelCase (aliases), Python uses snake_case. Unknown keys are errors at every depth.
The CRD's OpenAPI schema is generated from these models (``api/crd.py``); cross-field rules are written
once in ``RULES`` and serve both as CEL (``x-kubernetes-validations``) and as Python checks here.

Rules that concern one section (a toleration, a resources block) are declared on its model (``rules``, a
``ClassVar``): the CRD generator attaches their CEL to every schema node made from that model, and
``SpecModel`` runs their Python twin. Spec fields are strict like the API server: no ``"8"`` for an integer or
``"true"`` for a boolean. Placement follows Kubernetes' own checks (label keys and values, quantities,
tolerations, requests <= limits, affinity shape), so a bad placement is refused at admission, not at pod creation.

Immutable after creation (CEL ``self == oldSelf``): ``spec.dataset``, ``spec.clustering``, ``spec.storage.uri``,
``spec.storage.volumeClaim``, ``spec.experts.modelPreset`` and ``spec.experts.classConditional`` - changing any of them would silently
invalidate committed artifacts (cluster assignments, expert checkpoints). Everything else (steps, placement,
evaluation, suspend, ...) may change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
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

# Sampling strategies (see ddm_trainer.combine): full | top1 | top-K | sample-K[@T] | nucleus-P[@T] | oracle | oracle-C,
# K an expert count 1..9999, P a probability mass in (0, 1], T a temperature > 0, C a 0-based cluster index.
_COUNT = r"[1-9][0-9]{0,3}"
_MASS = r"(0\.[0-9]*[1-9][0-9]*|1|1\.0+)"
_TEMPERATURE = r"([1-9][0-9]*(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)"
STRATEGY_PATTERN = rf"^(full|top1|top-{_COUNT}|(sample-{_COUNT}|nucleus-{_MASS})(@{_TEMPERATURE})?|oracle|oracle-(0|{_COUNT}))$"
STRATEGY_GRAMMAR = (
    "full (every expert, router-weighted) | top1 or top-K (the K most likely experts) | sample-K[@T] (K experts drawn"
    " from the router's distribution sharpened by temperature T > 0, default 1) | nucleus-P[@T] (the smallest set of"
    " experts holding router mass P, 0 < P <= 1) | oracle (no router: each sample's expert drawn once from the"
    " clusters' share of its class, p(k | y), or its training caption's own cluster, kept for its whole"
    " trajectory) | oracle-C (only expert C, 0-based)"
)
# file:///absolute/path, s3://bucket[/prefix], or a plain path without a scheme (local runner only)
STORAGE_URI_PATTERN = r"^(file:///.*|s3://[a-z0-9][a-z0-9.\-]{0,62}(/.*)?|[^:]+)$"
# The dataset may also be an http(s) URL of shards.
DATA_URI_PATTERN = r"^(file:///.*|s3://[a-z0-9][a-z0-9.\-]{0,62}(/.*)?|https?://.+|[^:]+)$"
# Kubernetes' own name syntax (k8s.io/apimachinery/pkg/util/validation).
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
DNS_LABEL_PATTERN = rf"^{_DNS_LABEL}$"
DNS_SUBDOMAIN_PATTERN = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
# [prefix/]name: prefix a DNS subdomain, name <= 63 characters of [-A-Za-z0-9_.], alphanumeric at both ends
LABEL_KEY_PATTERN = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_QUALIFIED_NAME}$"
# annotation keys are checked lower-cased: the prefix may have capitals
ANNOTATION_KEY_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*/)?" + _QUALIFIED_NAME + "$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# resource.Quantity: a non-negative decimal with an optional binary (Ki..Ei), decimal (n, u, m, k..E) or e-exponent suffix
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
GPU_RESOURCE = "nvidia.com/gpu"

URI_MAX = 2048
# A model folder the trainer copies from the store or reads in place (no http: weights are never downloaded).
MODEL_URI_PATTERN = r"^(file:///.*|s3://[a-z0-9][a-z0-9.\-]{0,62}(/.*)?|[^:]+)$"
NAME_MAX = 253
STORE_MOUNT_PATH = "/mnt/ddm"  # where spec.storage.volumeClaim is mounted in every stage's pods
LABEL_VALUE_MAX = 63
MAX_CLUSTERS = 1024
MAX_FINE_CLUSTERS = 65536
INT64_MAX = 2**63 - 1

# Readable names of patterns, for error messages (``ddm validate``) and the CEL messages of map keys (the CRD).
PATTERN_NAMES = {
    STRATEGY_PATTERN: f"a strategy: {STRATEGY_GRAMMAR}",
    DNS_LABEL_PATTERN: "a DNS label (lower-case alphanumerics and '-', alphanumeric at both ends)",
    DNS_SUBDOMAIN_PATTERN: "a DNS subdomain (dot-separated DNS labels: lower-case alphanumerics and '-')",
    LABEL_KEY_PATTERN: "a label key ([DNS-subdomain prefix/]name, name <= 63 characters of [-A-Za-z0-9_.], "
                       "alphanumeric at both ends)",
    ANNOTATION_KEY_PATTERN: "an annotation key ([DNS-subdomain prefix/]name, name <= 63 characters of [-A-Za-z0-9_.], "
                            "alphanumeric at both ends)",
    LABEL_VALUE_PATTERN: "a label value (<= 63 characters of [-A-Za-z0-9_.], alphanumeric at both ends, or empty)",
    QUANTITY_PATTERN: "a Kubernetes quantity (e.g. 8, 500m, 80Gi, 1e3)",
}


@dataclass(frozen=True)
class Rule:
    """One rule written once: ``cel`` for the CRD, ``check`` (True = valid) for the models.

    In ``RULES`` (spec-wide rules), ``at`` is the alias path below ``spec`` where the CEL sits and ``check`` gets the
    model there; in a model's ``rules``, ``at`` is empty and the rule sits on every schema node of that model.
    ``field`` is the field the rule blames, relative to where it sits."""

    at: tuple[str, ...]
    field: str
    cel: str
    message: str
    check: Callable[[Any], bool]
    got: Callable[[Any], str] = lambda m: ""

    @property
    def field_path(self) -> str:
        return ".".join(("spec", *self.at, self.field))

    def violation(self, model: Any) -> str | None:
        """``field: message (got ...)`` when ``model`` breaks the rule, else None."""
        if self.check(model):
            return None
        got = self.got(model)
        return f"{self.field}: {self.message}" + (f" (got {got})" if got else "")


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, validate_assignment=True
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict as stored in Kubernetes (None fields left out: every None here is also the default)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SpecModel(ApiModel):
    """A part of the spec: strict types as the API server has them, and the model's own ``rules`` checked."""

    model_config = ConfigDict(strict=True)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _own_rules(self) -> SpecModel:
        lines = [line for rule in type(self).rules if (line := rule.violation(self)) is not None]
        if lines:  # relative to this model's location; cli.format_errors prefixes it
            raise PydanticCustomError("ddm_field", "{lines}", {"lines": "\n".join(lines)})
        return self


# ---------------------------------------------------------------- placement

LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE_PATTERN)]
AnnotationKey = Annotated[str, StringConstraints(pattern=ANNOTATION_KEY_PATTERN)]


def _one_quantity_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One error for a bad quantity, not one per member of the int | str union."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("quantity", f"must be {PATTERN_NAMES[QUANTITY_PATTERN]}, >= 0") from None


# A Kubernetes quantity: 8, "80Gi", "500m", "1e3"
Quantity = Annotated[
    Annotated[int, Field(ge=0, le=INT64_MAX)] | Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)],
    WrapValidator(_one_quantity_error),
]

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}


def parse_quantity(value: int | str) -> Decimal | None:
    """The value of a Kubernetes quantity (``"1.5Gi"`` -> 1610612736), or None when it is not one."""
    if isinstance(value, int):
        return Decimal(value)
    m = re.fullmatch(QUANTITY_PATTERN, value)
    if m is None:
        return None
    number, suffix = value[: m.start(3)] if m.group(3) else value, m.group(3) or ""
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * Decimal(_SUFFIX[suffix])
    except (InvalidOperation, KeyError):
        return None


def _tolerations_rules() -> tuple[Rule, ...]:
    return (
        Rule(at=(), field="value", cel="self.operator != 'Exists' || !has(self.value) || self.value == ''",
             message="must be empty when operator is Exists", check=lambda t: t.operator != "Exists" or not t.value,
             got=lambda t: f"value={t.value!r}"),
        Rule(at=(), field="operator", cel="(has(self.key) && self.key != '') || self.operator == 'Exists'",
             message="must be Exists when key is empty (a toleration of every taint)",
             check=lambda t: bool(t.key) or t.operator == "Exists"),
        Rule(at=(), field="tolerationSeconds",
             cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             message="needs effect NoExecute", check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
             got=lambda t: f"effect={t.effect}"),
    )


class Toleration(SpecModel):
    """A core/v1 Toleration of the stage's pods, checked as Kubernetes checks it."""

    rules = _tolerations_rules()
    key: LabelKey | None = Field(None, max_length=NAME_MAX, description="Taint key (a label key); empty: every taint, needs operator Exists")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Equal: the taint's value must be value; Exists: any value")
    value: LabelValue | None = Field(None, description="Taint value (a label value); must be empty with operator Exists")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty: every effect")
    toleration_seconds: int | None = Field(
        None, ge=0, le=INT64_MAX, description="With effect NoExecute: seconds the pod stays after the taint appears")


class Affinity(SpecModel):
    """A core/v1 Affinity: its three parts are objects, passed to the pods as written."""

    node_affinity: dict[str, Any] | None = Field(None, description="core/v1 NodeAffinity")
    pod_affinity: dict[str, Any] | None = Field(None, description="core/v1 PodAffinity")
    pod_anti_affinity: dict[str, Any] | None = Field(None, description="core/v1 PodAntiAffinity")


def _requests_within_limits(r: Resources) -> bool:
    for name, request in (r.requests or {}).items():
        limit = (r.limits or {}).get(name)
        if limit is not None and (a := parse_quantity(request)) is not None and (b := parse_quantity(limit)) is not None:
            if a > b:
                return False
    return True


class Resources(SpecModel):
    """Container resources of each pod (e.g. ``limits: {nvidia.com/gpu: 8, memory: 1600Gi}``): Kubernetes quantities."""

    rules = (
        Rule(at=(), field="requests",
             cel="!has(self.requests) || !has(self.limits) || self.requests.all(r, !(r in self.limits)"
                 " || !isQuantity(string(self.requests[r])) || !isQuantity(string(self.limits[r]))"
                 " || quantity(string(self.requests[r])).compareTo(quantity(string(self.limits[r]))) <= 0)",
             message="every request must be <= its limit",
             check=_requests_within_limits, got=lambda r: f"requests={r.requests}, limits={r.limits}"),
    )
    requests: dict[LabelKey, Quantity] | None = Field(
        None, max_length=16, description="Resource name -> quantity the scheduler reserves (each <= its limit)")
    limits: dict[LabelKey, Quantity] | None = Field(
        None, max_length=16, description=f"Resource name -> quantity the pod may use; {GPU_RESOURCE} defaults to gpusPerNode")


class Placement(SpecModel):
    """Where a stage's pods run. Every field is optional; per-expert overrides replace fields they set."""

    rules = (
        Rule(at=(), field="multiKueueWorkers", cel="!has(self.multiKueueWorkers) || has(self.kueueQueueName)",
             message="needs kueueQueueName in the same placement (a LocalQueue whose ClusterQueue has a MultiKueue "
                     "admission check): without a queue no worker runs the job",
             check=lambda p: p.multi_kueue_workers is None or p.kueue_queue_name is not None,
             got=lambda p: f"multiKueueWorkers={sorted(p.multi_kueue_workers or {})}"),
    )

    node_selector: dict[LabelKey, LabelValue] | None = Field(
        None, max_length=32, description="Node labels the pods require (label key -> label value)")
    tolerations: list[Toleration] | None = Field(None, max_length=32, description="Taints the pods tolerate")
    affinity: Affinity | None = Field(None, description="A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity)")
    resources: Resources | None = Field(None, description="Container requests and limits")
    priority_class_name: str | None = Field(
        None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN, description="PriorityClass of the pods")
    kueue_queue_name: LabelValue | None = Field(
        None, min_length=1, description="Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label (a label value)")
    target_cluster: str | None = Field(
        None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of a Secret (in this namespace) holding a kubeconfig of the cluster to run on",
    )
    multi_kueue_workers: dict[str, Annotated[str, StringConstraints(max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN)]] | None = Field(
        None, max_length=20,
        description="With a kueueQueueName (in the same placement) whose ClusterQueue has a MultiKueue admission check: kubeconfig Secrets (in "
                    "this namespace) of its worker clusters, by MultiKueueCluster name. MultiKueue copies only the job, "
                    "which carries the stage config (one too large for it is a ConfigMap the operator puts in each "
                    "worker); the operator reads a failed job's exit code in the "
                    "worker that ran it (its pods, else the training operator's ExitedWithCode Events); without an "
                    "entry a failed job has no code and is retried")
    pod_labels: dict[LabelKey, LabelValue] | None = Field(
        None, max_length=32, description="Labels added to the stage's pods (the operator's own ddm.io/* labels win)")
    pod_annotations: dict[AnnotationKey, Annotated[str, StringConstraints(max_length=4096)]] | None = Field(
        None, max_length=32, description="Annotations added to the stage's pods (e.g. a sidecar opt-out)")

    def merged_with(self, override: Placement | None) -> Placement:
        """This placement with every field the override sets replaced by the override's value."""
        if override is None:
            return self
        fields = {name: value for name, value in override if value is not None}
        return self.model_copy(update=fields)

    def asks_for_gpus(self) -> bool:
        r = self.resources
        return r is not None and any(GPU_RESOURCE in (d or {}) for d in (r.requests, r.limits))


class PlacementOverride(SpecModel):
    """Placement of some experts: the fields set here replace the section's default placement for them."""

    experts: list[Annotated[int, Field(ge=0, lt=MAX_CLUSTERS)]] = Field(
        min_length=1, max_length=MAX_CLUSTERS, description="Expert (cluster) indices, 0-based, each < numClusters")
    placement: Placement = Field(description="Fields that replace the default placement for these experts")


def _no_gpus_cel(p: str) -> str:
    """CEL: placement ``p`` asks for no GPU (neither request nor limit); the twin of ``Placement.asks_for_gpus``."""
    return (f"(!has({p}.resources) || ((!has({p}.resources.limits) || !('{GPU_RESOURCE}' in {p}.resources.limits))"
            f" && (!has({p}.resources.requests) || !('{GPU_RESOURCE}' in {p}.resources.requests))))")


def _gpu_rule(overrides: bool = False) -> Rule:
    """A section with ``gpusPerNode: 0`` runs on CPUs: its placement (and overrides) may not ask for GPUs."""
    cel = f"!has(self.gpusPerNode) || self.gpusPerNode > 0 || ((!has(self.placement) || {_no_gpus_cel('self.placement')})"
    cel += f" && (!has(self.overrides) || self.overrides.all(o, {_no_gpus_cel('o.placement')})))" if overrides else ")"
    return Rule(
        at=(), field="gpusPerNode", cel=cel,
        message=f"is 0 (CPU only) but the placement asks for {GPU_RESOURCE}: set gpusPerNode instead",
        check=lambda m: m.gpus_per_node > 0 or not any(
            p.asks_for_gpus() for p in (m.placement, *(o.placement for o in getattr(m, "overrides", ())))),
    )


# ---------------------------------------------------------------- spec sections

class DatasetSpec(SpecModel):
    """The training images. Immutable after creation: the clustering and every expert are made from it."""

    uri: str = Field(max_length=URI_MAX, pattern=DATA_URI_PATTERN,
                     description="Webdataset shards (brace ranges allowed), an image folder, or a file://, s3:// or http(s):// URI")
    image_size: int = Field(32, ge=8, le=1024, description="Side in pixels the images are resized and cropped to")
    channels: Literal[1, 3] = Field(3, description="1 (grayscale) or 3 (RGB)")
    class_field: str | None = Field(
        None, max_length=64, description="Per-sample key of the class index (e.g. cls); needed by classConditional experts"
    )
    num_classes: int | None = Field(
        None, ge=1, le=1_000_000, description="Number of classes (indices 0..N-1); needed by classConditional experts"
    )
    caption_field: str | None = Field(None, max_length=64, description="Per-sample key of the caption")
    limit: int | None = Field(None, ge=1, le=INT64_MAX, description="Use only the first N samples (default: all)")


class TextEncoderSpec(SpecModel):
    """The text encoder of a text-conditioned run: every caption (spec.dataset.captionField) is embedded once by
    the clustering stage and stored with each cluster's shards; experts cross-attend to the token embeddings, the
    router sees the pooled one. Immutable: the stored embeddings are made with it."""

    kind: Literal["sentence-transformers", "clip", "t5"] = Field(
        "sentence-transformers",
        description="sentence-transformers: a sentence-transformers folder; clip: a transformers CLIPTextModel "
                    "folder; t5: a transformers T5EncoderModel folder (each with its tokenizer files)")
    uri: str = Field(max_length=URI_MAX, pattern=MODEL_URI_PATTERN,
                     description="The model folder: a path in the trainer image or on a mounted volume, file:// or s3://")
    width: int = Field(ge=1, le=16384, description="Width of its embeddings (e.g. 384 all-MiniLM-L6-v2, 768 CLIP ViT-L/14 text, 4096 T5-XXL)")
    max_tokens: int = Field(16, ge=1, le=512, description="Caption tokens kept per image (cut or padded, with a mask)")


class VaeSpec(SpecModel):
    """The VAE of latent-space experts (a diffusers AutoencoderKL, e.g. stabilityai/sd-vae-ft-mse: 256 px ->
    32x32x4): the clustering stage encodes every image and its horizontal flip once and stores the latents with
    each cluster's shards; experts, router and student train on them; samples are decoded for the report and FID.
    Unset: pixel space. Immutable: the stored latents are made with it."""

    uri: str = Field(max_length=URI_MAX, pattern=MODEL_URI_PATTERN,
                     description="A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) "
                                 "or a .safetensors file beside its config.json: a path, file:// or s3://")
    scaling_factor: float | None = Field(None, gt=0, le=1000, description="Latent scale (default: the VAE config's, "
                                                                          "0.18215 for the SD VAE)")
    shift_factor: float | None = Field(None, ge=-1000, le=1000, description="Latent shift (default: the VAE "
                                                                            "config's, else 0)")


class ClusteringSpec(SpecModel):
    """How the dataset is split into K clusters: encoder features, fine k-means, merged into K coarse clusters.
    Immutable after creation (the experts are trained on its assignments)."""

    encoder: str = Field("dinov2_vitl14", max_length=128, description="Feature encoder (timm name or built-in)")
    encoder_weights: str | None = Field(None, max_length=URI_MAX, pattern=DATA_URI_PATTERN,
                                        description="Encoder weights URI (default: the encoder's published weights)")
    fine_clusters: int = Field(1024, ge=1, le=MAX_FINE_CLUSTERS, description="Fine k-means centroids before merging (>= numClusters)")
    num_clusters: int = Field(ge=1, le=MAX_CLUSTERS, description="K: number of coarse clusters = experts")
    max_cluster_fraction: float | None = Field(
        None, gt=0, le=1, description="Balance bound: no cluster above this share of the data (times numClusters >= 1)")
    method: Literal["kmeans", "random"] = Field("kmeans", description="kmeans on features, or random (an ablation)")
    seed: int = Field(0, ge=0, le=INT64_MAX, description="Seed of the k-means initialisation")
    nodes: int = Field(1, ge=1, le=1024, description="Pods the encode step (image features, caption embeddings, "
                       "latents) spreads over, each with the experts' gpusPerNode processes encoding disjoint parts "
                       "of the data; k-means then runs on the first pod")


class ExpertsSpec(SpecModel):
    """The K experts: one flow-matching DiT per cluster, each trained on its cluster only, possibly elsewhere."""

    rules = (_gpu_rule(overrides=True),)
    model_preset: DiTPreset = Field("DiT-XL/2", description="DiT size/patch; the patch must divide dataset.imageSize. Immutable")
    steps: int = Field(gt=0, le=100_000_000, description="Training steps of each expert (their mean with "
                                                        "stepsAllocation proportional)")
    steps_allocation: Literal["equal", "proportional"] = Field(
        "equal", description="equal: every expert trains `steps`; proportional: each trains its cluster's share of "
        "numClusters x steps (the same total), so every image is seen about as often as the monolith sees it when "
        "the clusters differ in size")
    batch_size: int = Field(256, gt=0, le=1_000_000, description="Global batch size per expert")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="Decay of the weights' exponential moving average")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Autocast precision of training")
    compile: bool = Field(True, description="Regional torch.compile on CUDA (no effect on CPU); false to debug")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode of the experts (and the baseline): reduce-overhead replays each "
        "block as a CUDA graph, for small per-GPU batches where the host sets the pace; max-autotune-no-cudagraphs "
        "searches Triton GEMMs with the pointwise work fused in (longer compiles)")
    coordinate_descent_tuning: bool = Field(
        False, description="inductor's coordinate-descent search of its own kernels' block sizes when the experts "
        "(and the baseline) compile: DiT-XL/2's step 1.005x alone, 1.040x with residualPrecision bf16 (H100, "
        "BENCHMARKS.md), for ~30 s more compile")
    residual_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="The residual stream between the experts' transformer blocks under bf16 autocast: fp32 "
        "(autocast's own choice) or bf16 (half the bytes each block reads, writes and saves; DiT-XL/2's step "
        "1.024x on an H100). No effect with precision fp32")
    checkpoint_every: int = Field(5000, gt=0, le=100_000_000, description="Steps between checkpoints (a killed expert resumes from the last)")
    termination_grace_period_seconds: int | None = Field(
        None, ge=1, le=86_400,
        description="Pod grace period after SIGTERM, for the checkpoint to commit (default: from the preset's size)",
    )
    class_conditional: bool = Field(
        False, description="Condition the experts on dataset.classField (needs numClasses); immutable after creation")
    label_dropout: float = Field(0.1, ge=0, le=1, description="Share of labels dropped for classifier-free guidance "
                                                              "(distillation drops the same share)")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Share of captions replaced by the null caption for "
                                                                "classifier-free guidance (with spec.textEncoder; "
                                                                "distillation replaces the same share)")
    micro_batch_size: int | None = Field(
        None, gt=0, le=1_000_000,
        description="Samples per forward/backward on each process; the gradients of batchSize / (nodes x "
                    "gpusPerNode x microBatchSize) of them are accumulated into one step, so the global batch fits "
                    "any GPU. Must divide the per-process batch. Unset: the whole per-process batch, shrunk on an "
                    "out-of-memory error in the first step (the choice is reported and kept in the final config)")
    activation_checkpointing: bool | None = Field(
        None, description="Recompute each block's activations in the backward pass (less memory, about 1/3 more "
                          "compute). Unset: off unless the first step runs out of GPU memory")
    gpus_per_node: int = Field(1, ge=0, le=64, description="GPUs (torchrun processes) per node; 0: CPU only")
    nodes: int = Field(1, ge=1, le=1024, description="Nodes per expert (multi-node DDP)")
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}},
                                 description="Default placement of every expert's pods (and the clustering's)")
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


class RouterSpec(SpecModel):
    """The router: a small DiT classifier of p(k | x_t, t), which expert a noisy image belongs to."""

    rules = (_gpu_rule(),)
    preset: DiTPreset = Field("DiT-B/2", description="DiT size/patch of the router; the patch must divide dataset.imageSize")
    steps: int = Field(50_000, gt=0, le=100_000_000, description="Training steps")
    batch_size: int = Field(256, gt=0, le=1_000_000, description="Global batch size")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Autocast precision of training")
    compile: bool = Field(True, description="Regional torch.compile on CUDA (no effect on CPU)")
    gpus_per_node: int = Field(1, ge=0, le=64, description="GPUs (torchrun processes); 0: CPU only")
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}},
                                 description="Placement of the router's pods")


def strategy_key(strategy: str) -> tuple[str, float, float]:
    """(kind, number, temperature): equal for two spellings of one strategy (top1 and top-1, sample-2 and sample-2@1).
    The Python twin of ``_STRATEGY_KEY_CEL``; the kinds differ in their first three letters (the mixture ``oracle``
    has number -1, no cluster's)."""
    number = 0.0 if strategy == "full" else 1.0 if strategy == "top1" else -1.0 if strategy == "oracle" \
        else float(strategy.split("-", 1)[1].split("@")[0])
    return strategy[:3], number, float(strategy.split("@")[1]) if "@" in strategy else 1.0


def _strategy_key_cel(v: str) -> tuple[str, str, str]:
    return (f"{v}.substring(0, 3)",
            f"({v} == 'full' ? 0.0 : {v} == 'top1' ? 1.0 : {v} == 'oracle' ? -1.0 : "
            f"double({v}.substring({v}.indexOf('-') + 1).split('@')[0]))",
            f"({v}.contains('@') ? double({v}.split('@')[1]) : 1.0)")


def _strategies_unique(ev: EvaluationSpec) -> bool:
    keys = [strategy_key(s) for s in ev.strategies if re.fullmatch(STRATEGY_PATTERN, s)]
    return len(set(keys)) == len(keys)


_SAME_STRATEGY = " && ".join(f"{a} == {b}" for a, b in zip(_strategy_key_cel("t"), _strategy_key_cel("s")))
Strategy = Annotated[str, StringConstraints(max_length=32, pattern=STRATEGY_PATTERN)]


class PartialEvaluationSpec(SpecModel):
    """A lightweight evaluation of the experts that have committed, each time one more lands while others still
    train: its FID and expert list go to status.partial, so quality is seen growing."""

    num_samples: int = Field(256, ge=2, le=100_000, description="Generated images (and reference images) of the FID")
    strategy: Strategy = Field("full", description=f"The routing strategy evaluated: {STRATEGY_GRAMMAR}")
    steps: int | None = Field(None, gt=0, le=10_000, description="Sampler steps (default: spec.evaluation.steps)")


class EvaluationSpec(SpecModel):
    """FID/KID of the ensemble under each routing strategy (and of the monolith baseline when it is trained)."""

    rules = (
        Rule(at=(), field="strategies",
             cel=f"!has(self.strategies) || self.strategies.all(s, !s.matches(r'{STRATEGY_PATTERN}')"
                 f" || self.strategies.exists_one(t, t.matches(r'{STRATEGY_PATTERN}') && {_SAME_STRATEGY}))",
             message="must not repeat a strategy (top1 and top-1, sample-2 and sample-2@1 are the same)",
             check=_strategies_unique, got=lambda ev: f"strategies={ev.strategies}"),
        _gpu_rule(),
    )
    strategies: list[Strategy] = Field(
        default_factory=lambda: ["full", "top1"], min_length=1, max_length=16, json_schema_extra={"default": ["full", "top1"]},
        description=f"Routing strategies to evaluate, each once: {STRATEGY_GRAMMAR}. K <= numClusters, C < numClusters",
    )
    num_samples: int = Field(10_000, ge=1, le=1_000_000, description="Generated images per strategy (FID-N)")
    steps: int = Field(50, gt=0, le=10_000, description="Sampler steps (NFE per expert)")
    method: Literal["euler", "heun"] = Field("euler", description="ODE solver")
    reference_samples: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Real images for FID statistics (default: numSamples)")
    cfg_scale: float = Field(1.0, ge=0, le=100, description="Classifier-free guidance scale (class- or text-conditional experts)")
    prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=1024)]] | None = Field(
        None, max_length=64, description="Captions (with spec.textEncoder): a grid of samples per prompt in the report")
    batch_size: int | None = Field(None, ge=1, le=65_536, description="Images per sampling batch and GPU (default: 1024 on a GPU, 256 on a CPU)")
    compile: bool = Field(True, description="Regional torch.compile of experts and router on CUDA")
    gpus_per_node: int = Field(1, ge=0, le=64, description="GPUs sampling in parallel (torchrun ranks, disjoint seeds)")
    partial: PartialEvaluationSpec | None = Field(
        None, description="Evaluate the partial ensemble (small N) as experts land; unset: only the final evaluation")
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}},
                                 description="Placement of the evaluation's pods")


class DistillationSpec(SpecModel):
    """Optional: distil the ensemble (or each cluster's expert) into one student model."""

    enabled: bool = Field(False, description="Run the distillation stage after the evaluation")
    student_preset: DiTPreset = Field("DiT-B/2", description="DiT size/patch of the student")
    teacher: Literal["expert-of-cluster", "ensemble"] = Field(
        "ensemble", description="ensemble: the routed ensemble; expert-of-cluster: each image's own cluster expert")
    steps: int = Field(100_000, gt=0, le=100_000_000, description="Training steps")
    batch_size: int = Field(256, gt=0, le=1_000_000, description="Global batch size")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate")
    compile: bool = Field(True, description="Regional torch.compile of the student on CUDA")
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}},
                                 description="Placement of the student's pods")


class BaselineSpec(SpecModel):
    """Optional: the compute-matched monolith. One model of the experts' preset trained on all the data, evaluated
    by the same evaluation stage with the same sampler (the table's `monolith` row), so the run answers whether the
    ensemble beats one model on the same compute."""

    enabled: bool = Field(True, description="Train and evaluate the baseline (present and enabled by default)")
    steps: int | None = Field(None, gt=0, le=1_000_000_000,
                              description="Training steps (default: numClusters x experts.steps: the same images "
                                          "seen as all experts together, at the experts' batch size)")
    placement: Placement | None = Field(None, description="Placement of the baseline's pods (default: the experts')")


class StorageSpec(SpecModel):
    """The run store every stage reads and writes: a stage is done when its MANIFEST.json is committed."""

    uri: str = Field(max_length=URI_MAX, pattern=STORAGE_URI_PATTERN,
                     description="Run root: file:///path or s3://bucket/prefix (a plain path: local runner only). Immutable")
    credentials_secret: str | None = Field(
        None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret (this namespace) given whole to every stage's pods as env, read by the operator too:"
        " DDM_S3_ENDPOINT (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), optional AWS_REGION, and credentials:"
        " AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or AWS_WEB_IDENTITY_TOKEN_FILE +"
        " AWS_ROLE_ARN (IRSA); without keys the pods use container credentials or the instance role. A changed"
        " Secret is used by the operator at once and by every stage started afterwards",
    )
    volume_claim: str | None = Field(
        None, max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN,
        description=f"For fleets without object storage: a ReadWriteMany PersistentVolumeClaim (this namespace, and"
        f" every targetCluster's) mounted at {STORE_MOUNT_PATH} in every stage's pods; uri must then be"
        f" file://{STORE_MOUNT_PATH}[/...]. In a cluster, a file:// uri without it is refused (stages run on"
        " different nodes and could not share artifacts). Immutable",
    )


class GrowthSpec(SpecModel):
    """Grow a trained DDM with new data: spec.dataset is the new data only; it is clustered beside the parent's
    clusters, only new experts train, the router is trained again on all the data (it must know every cluster),
    and the grown ensemble is evaluated beside the parent's. The parent's experts are read where the parent
    committed them: never copied, never retrained. Immutable."""

    parent_uri: str = Field(max_length=URI_MAX, pattern=STORAGE_URI_PATTERN,
                            description="The parent run's root: a local run's storage.uri, or <storage.uri>/<namespace>/"
                                        "<name> of a DecentralizedDiffusion in a cluster")
    assignment: Literal["newClusters", "nearest"] = Field(
        "newClusters", description="newClusters: cluster the new data into numClusters minus the parent's K new "
                                   "clusters, each with a new expert; nearest: assign it to the parent's clusters "
                                   "(numClusters = the parent's K; no expert trains, the router learns the new data)")
    retrain: Literal["new", "grown"] = Field(
        "new", description="new: train only the new clusters' experts; grown: also retrain each of the parent's "
                           "experts whose cluster received new data, from the parent's weights, on the cluster's "
                           "old and new data (written to this run's store: the parent's files stay untouched)")
    compare_parent: bool = Field(True, description="Evaluate the parent's ensemble too, on the same reference images "
                                                   "(rows parent:<strategy>)")


class FailurePolicy(SpecModel):
    """Retries of stages that failed with a retryable exit code (>= 128: store unreachable, out of memory, SIGTERM)."""

    max_retries_per_expert: int = Field(3, ge=0, le=100, description="Retries of each expert")
    max_retries_per_stage: int = Field(2, ge=0, le=100, description="Retries of clustering, router, evaluation, distillation")
    backoff_seconds: int = Field(30, ge=0, le=86_400, description="First retry delay; doubles per attempt, capped at 1 h")
    min_experts: int | None = Field(
        None, ge=1, le=MAX_CLUSTERS, description="Experts that must succeed to continue (default: all numClusters)"
    )


class DecentralizedDiffusionSpec(SpecModel):
    """A Decentralized Diffusion Model run: cluster the dataset into K parts, train one expert per part in
    isolation, train a router, evaluate the ensemble per routing strategy, optionally distil it."""

    dataset: DatasetSpec
    clustering: ClusteringSpec
    experts: ExpertsSpec
    router: RouterSpec = Field(default_factory=RouterSpec, json_schema_extra={"default": {}})
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, json_schema_extra={"default": {}})
    distillation: DistillationSpec | None = None
    baseline: BaselineSpec | None = Field(None, description="The compute-matched monolith trained beside the experts")
    growth: GrowthSpec | None = Field(None, description="Grow a trained DDM (its parent) with spec.dataset as new data")
    text_encoder: TextEncoderSpec | None = Field(
        None, description="Text-conditioned experts, router and student on the captions (needs spec.dataset.captionField)")
    vae: VaeSpec | None = Field(None, description="Latent-space experts, router and student (unset: pixel space)")
    storage: StorageSpec
    trainer_image: str = Field("ghcr.io/ddm/ddm-trainer:0.1.0", min_length=1, max_length=512, pattern=r"^\S+$",
                               description="Image of every stage's pods (ddm-train entrypoint)")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, json_schema_extra={"default": {}})
    suspend: bool = Field(False, description="Stop starting stages and suspend running jobs; false resumes")
    parallelism: int | None = Field(None, ge=1, le=MAX_CLUSTERS, description="Max experts training at once (default: all)")

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

    @property
    def baseline_enabled(self) -> bool:
        return self.baseline is not None and self.baseline.enabled


# ---------------------------------------------------------------- cross-field rules (CEL + Python, written once)


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
    kind, _, number = strategy.split("@")[0].partition("-")
    if kind in ("top", "sample") and number.isdigit():
        return int(number) <= num_clusters
    if kind == "oracle" and number.isdigit():
        return int(number) < num_clusters
    return True


RULES: tuple[Rule, ...] = (
    Rule(
        at=("experts",), field="microBatchSize",
        cel="!has(self.microBatchSize) || (self.batchSize / (self.nodes * (self.gpusPerNode > 0 ? self.gpusPerNode : 1)))"
        " % self.microBatchSize == 0",
        message="must divide the per-process batch, batchSize / (nodes x gpusPerNode)",
        check=lambda e: e.micro_batch_size is None
        or (e.batch_size // (e.nodes * max(e.gpus_per_node, 1))) % e.micro_batch_size == 0,
        got=lambda e: f"microBatchSize={e.micro_batch_size}, batchSize={e.batch_size}, nodes={e.nodes}, "
                      f"gpusPerNode={e.gpus_per_node}",
    ),
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
    Rule(
        at=(), field="textEncoder",
        cel="!has(self.textEncoder) || has(self.dataset.captionField)",
        message="needs spec.dataset.captionField (the per-sample key of the caption)",
        check=lambda s: s.text_encoder is None or s.dataset.caption_field is not None,
    ),
    Rule(
        at=(), field="evaluation.prompts",
        cel="!has(self.evaluation) || !has(self.evaluation.prompts) || has(self.textEncoder)",
        message="needs spec.textEncoder (prompts condition text-conditioned experts)",
        check=lambda s: not s.evaluation.prompts or s.text_encoder is not None,
    ),
    _patch_rule("experts", "modelPreset", lambda s: s.experts.model_preset),
    _patch_rule("router", "preset", lambda s: s.router.preset),
    Rule(
        at=(), field="growth",
        cel="!has(self.growth) || !has(self.distillation) || !has(self.distillation.enabled) || !self.distillation.enabled",
        message="a grown run cannot distil yet: disable spec.distillation",
        check=lambda s: s.growth is None or not s.distill_enabled,
    ),
    Rule(
        at=(), field="growth",
        cel="!has(self.growth) || !has(self.textEncoder)",
        message="a grown run cannot be text-conditioned yet (its router would need every generation's caption "
                "embeddings): remove spec.textEncoder",
        check=lambda s: s.growth is None or s.text_encoder is None,
    ),
    _patch_rule("distillation", "studentPreset", lambda s: s.distillation.student_preset if s.distill_enabled else None,
                enabled="enabled"),
    Rule(
        at=(), field="evaluation.strategies",
        cel="!has(self.evaluation) || !has(self.evaluation.strategies) || self.evaluation.strategies.all(s,"
            " (s.matches('^(top|sample)-[0-9]+(@.*)?$') ? int(s.substring(s.indexOf('-') + 1).split('@')[0])"
            " <= self.clustering.numClusters"
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
        at=("storage",), field="volumeClaim",
        cel=f"!has(self.volumeClaim) || self.uri == 'file://{STORE_MOUNT_PATH}'"
            f" || self.uri.startsWith('file://{STORE_MOUNT_PATH}/')",
        message=f"is mounted at {STORE_MOUNT_PATH}: spec.storage.uri must be file://{STORE_MOUNT_PATH}[/...]",
        check=lambda st: st.volume_claim is None or st.uri == f"file://{STORE_MOUNT_PATH}"
        or st.uri.startswith(f"file://{STORE_MOUNT_PATH}/"),
        got=lambda st: f"uri={st.uri}",
    ),
)

# Fields that may not change after creation: (alias path below spec, CEL message).
IMMUTABLE_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("growth",), "spec.growth is immutable (create a new DecentralizedDiffusion naming its parent)"),
    (("dataset",), "spec.dataset is immutable (create a new DecentralizedDiffusion)"),
    (("clustering",), "spec.clustering is immutable (create a new DecentralizedDiffusion)"),
    (("storage", "uri"), "spec.storage.uri is immutable"),
    (("storage", "volumeClaim"), "spec.storage.volumeClaim is immutable"),
    (("experts", "modelPreset"), "spec.experts.modelPreset is immutable"),
    (("experts", "classConditional"), "spec.experts.classConditional is immutable"),
    (("textEncoder",), "spec.textEncoder is immutable (the stored caption embeddings are made with it)"),
    (("vae",), "spec.vae is immutable (the stored latents are made with it)"),
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
    """A standard condition (Ready, Degraded, ...)."""

    type: str = Field(max_length=64, description="Condition type, e.g. Ready")
    status: ConditionStatus = Field(description="True, False or Unknown")
    reason: str = Field("", max_length=128, description="One CamelCase word: why")
    message: str = Field("", max_length=4096, description="Why, for humans")
    last_transition_time: str | None = Field(None, description="RFC 3339")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was computed from")


class StageStatus(ApiModel):
    """One single-job stage (clustering, router, evaluation, distillation)."""

    phase: StagePhase = Field("Pending", description="Pending, Running, Retrying, Succeeded, Failed or Suspended")
    attempts: int = Field(0, description="Jobs started so far (1 + retries)")
    message: str = Field("", description="The last failure or what the stage waits for")
    started_at: str | None = Field(None, description="RFC 3339")
    finished_at: str | None = Field(None, description="RFC 3339")
    job_name: str | None = Field(None, description="The PyTorchJob of the current attempt")


class StagesStatus(ApiModel):
    """The single-job stages."""

    clustering: StageStatus | None = Field(None, description="Encoder features and k-means")
    router: StageStatus | None = Field(None, description="The router's training job")
    evaluation: StageStatus | None = Field(None, description="FID/KID per strategy")
    distillation: StageStatus | None = Field(None, description="The student's training job")
    baseline: StageStatus | None = Field(None, description="The compute-matched monolith's training job")
    student_evaluation: StageStatus | None = Field(
        None, description="The distilled student's row, added to the evaluation table once distillation committed")


class ExpertStatus(ApiModel):
    """One expert's training."""

    index: int = Field(description="Cluster index, 0-based")
    phase: StagePhase = Field("Pending", description="Pending, Running, Retrying, Succeeded, Failed or Suspended")
    step: int = Field(0, description="Training step reached (from the last progress report)")
    total_steps: int = Field(0, description="spec.experts.steps")
    last_checkpoint: str | None = Field(None, description="URI of the last committed checkpoint")
    retries: int = Field(0, description="Retries so far")
    cluster: str | None = Field(None, description="Where it runs: a targetCluster name, or empty for this cluster")
    job_name: str | None = Field(None, description="The PyTorchJob of the current attempt")
    message: str = Field("", description="The last failure or what it waits for")


class RouterStatus(ApiModel):
    """The router's training progress."""

    phase: StagePhase = Field("Pending", description="Pending, Running, Retrying, Succeeded, Failed or Suspended")
    step: int = Field(0, description="Training step reached")
    total_steps: int = Field(0, description="spec.router.steps")
    accuracy: float | None = Field(None, description="Held-out accuracy of p(k | x_t, t), averaged over t")
    uri: str | None = Field(None, description="URI of the committed router")


class PartialEnsembleStatus(ApiModel):
    """The latest lightweight evaluation of the experts committed so far (spec.evaluation.partial)."""

    experts: list[int] = Field(default_factory=list, description="The experts it held")
    missing_experts: list[int] = Field(default_factory=list, description="Experts it lacked (training or failed)")
    strategy: str = Field(description="The routing strategy evaluated")
    fid: float = Field(description="FID of the partial ensemble (lower is better)")
    num_samples: int = Field(description="Generated images the FID is computed on")
    uri: str | None = Field(None, description="URI of its results.json")


class StrategyResult(ApiModel):
    """One row of the evaluation table."""

    strategy: str = Field(description="A routing strategy of spec.evaluation.strategies, monolith (the baseline) "
                                      "or student (the distilled student)")
    fid: float = Field(description="Frechet Inception Distance (lower is better)")
    kid: float | None = Field(None, description="Kernel Inception Distance")
    num_samples: int | None = Field(None, description="Generated images the numbers are computed on")
    nfe: float | None = Field(None, description="Expert evaluations per sample (fractional for nucleus/sample-k)")
    gflops_per_sample: float | None = Field(None, description="Compute per generated image")


class Results(ApiModel):
    """What the run produced."""

    fid: list[StrategyResult] = Field(default_factory=list, description="FID/KID per strategy")
    artifacts: dict[str, str] = Field(default_factory=dict, description="Name -> URI (experts, router, student, ...)")
    best_vs_monolith: float | None = Field(None, description="The best routing strategy's FID (the oracle row, a "
                                                             "reference, excluded) over the monolith baseline's "
                                                             "(below 1: the ensemble wins)")
    student_vs_monolith: float | None = Field(None, description="The distilled student's FID over the monolith "
                                                                "baseline's (below 1: the student wins)")
    experts: list[int] | None = Field(None, description="The experts the evaluated ensemble held")
    parent_uri: str | None = Field(None, description="A grown run's parent: its rows are parent:<strategy>")
    missing_experts: list[int] | None = Field(None, description="Experts it lacked (failed for good): the router "
                                                                "was renormalised over the others")


class DecentralizedDiffusionStatus(ApiModel):
    """What the operator observed: the phase, each stage and expert, and the results."""

    # The operator framework stores its own bookkeeping in status too: tolerate unknown keys when reading.
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    phase: Phase = Field("Pending", description="Pending, Clustering, Training, Evaluating, Distilling, Succeeded, "
                                                "Failed, Degraded (fewer experts than K but >= minExperts) or Suspended")
    message: str = Field("", description="What the run is doing, e.g. 3/8 experts ready, router Running")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions")
    observed_generation: int | None = Field(None, description="metadata.generation this status was computed from")
    stages: StagesStatus = Field(default_factory=StagesStatus, description="The single-job stages")
    experts: list[ExpertStatus] = Field(default_factory=list, description="One entry per expert")
    experts_ready: int = Field(0, description="Experts whose final weights are committed")
    experts_total: int = Field(0, description="K (spec.clustering.numClusters)")
    router: RouterStatus | None = Field(None, description="The router's progress")
    eta: str | None = Field(None, description="Training time left of the running experts, from their last progress "
                                              "reports (e.g. 1h05m); empty when none runs")
    best_fid: float | None = Field(None, description="The best routing strategy's FID (the monolith row excluded)")
    results: Results | None = Field(None, description="The evaluation table and artifact URIs")
    partial: PartialEnsembleStatus | None = Field(
        None, description="The partial ensemble's latest lightweight evaluation (spec.evaluation.partial)")


# ---------------------------------------------------------------- the whole object


class ObjectMeta(BaseModel):
    """The parts of metadata we read; everything else the API server adds is kept as is."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(max_length=NAME_MAX, pattern=DNS_SUBDOMAIN_PATTERN)
    namespace: str | None = Field(None, max_length=63, pattern=DNS_LABEL_PATTERN)
    labels: dict[LabelKey, LabelValue] | None = None
    annotations: dict[AnnotationKey, str] | None = None


class DecentralizedDiffusion(ApiModel):
    api_version: Literal["ddm.io/v1alpha1"]
    kind: Literal["DecentralizedDiffusion"]
    metadata: ObjectMeta
    spec: DecentralizedDiffusionSpec
    status: DecentralizedDiffusionStatus | None = None
