"""Stage ``sample`` and ``generate()``: images from the committed experts combined by the committed router.

``generate(store, strategy, n, ...)`` is the library entry point (the evaluation stage calls it); it validates the
whole ensemble from manifests and configs BEFORE loading any weights or sampling:
router K != number of experts -> ConfigError naming both; an expert without committed final weights ->
MissingArtifactError naming its URI; an unknown strategy -> ConfigError. Weights load lazily, per expert, the
first time a sample is routed to it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .. import layout, lineage
from ..checkpoint import CONFIG_FILE, load_final
from ..combine import parse_strategy
from ..clustering import mixture_counts
from ..configs.common import DataConfig
from ..configs.sample import SampleConfig
from ..errors import ConfigError, DataError, MissingArtifactError, PreemptedError
from ..progress import preempt_requested
from ..sampler import CombinedSampler, labels_range, noise_range
from ..store import Store

SAMPLES = "samples"  # samples/<name>/: MANIFEST.json, grid.png, samples.npz


@dataclass(frozen=True)
class ExpertSpec:
    preset: str
    image_size: int
    channels: int
    num_classes: int | None
    text_dim: int | None = None  # text-conditioned (cross-attention to caption token embeddings of this width)
    text_tokens: int = 16
    # a latent-space model: image_size/channels are its latents'; samples are decoded by this VAE to these pixels
    vae: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    pixel_size: int | None = None
    pixel_channels: int | None = None

    @property
    def output_shape(self) -> tuple[int, int]:
        """(channels, side) of the images it makes: decoded pixels for a latent-space model."""
        return (self.pixel_channels or self.channels, self.pixel_size or self.image_size)


def _final_config(store: Store, stage_dir: str) -> dict[str, Any]:
    """config.json of a stage's committed final weights; MissingArtifactError naming the URI when absent."""
    prefix = layout.final(stage_dir)
    if store.read_manifest(prefix) is None:
        raise MissingArtifactError(f"no committed final weights at {store.url(prefix)}")
    return json.loads(store.read_committed(prefix, CONFIG_FILE))


def expert_spec(config: dict[str, Any], where: str) -> ExpertSpec:
    """Model spec from an expert's final config.json: ``model`` (preferred), else the stage config's fields."""
    model, stage = config.get("model") or {}, config.get("stage") or {}
    data = stage.get("data") or {}
    try:
        preset = model.get("preset") or stage["model"]
        image_size = int(model.get("image_size") or data["image_size"])
        channels = int(model.get("channels") or data["channels"])
    except KeyError as e:
        raise DataError(f"{where}/config.json does not say the expert's {e.args[0]}") from None
    if "num_classes" in model:
        num_classes = model["num_classes"]
    else:
        num_classes = stage.get("num_classes") if stage.get("class_cond") else None
    text_dim = model.get("text_dim")
    pixel_size, pixel_channels = model.get("pixel_size"), model.get("pixel_channels")
    return ExpertSpec(preset, image_size, channels, int(num_classes) if num_classes else None,
                      int(text_dim) if text_dim else None, int(model.get("text_tokens") or 16), model.get("vae"),
                      int(pixel_size) if pixel_size else None, int(pixel_channels) if pixel_channels else None)


def committed_experts(store: Store) -> list[int]:
    """Indices of the run's committed experts, ascending: its own (``experts/NNN/final/MANIFEST.json``) and, for a
    grown run, those it inherited from its parent (``lineage``)."""
    return lineage.committed_experts(store)


def ensemble_size(store: Store, present: list[int]) -> int:
    """K: the committed router's cluster count (known even to oracle-C and while experts are missing), else one
    past the highest committed expert."""
    if store.read_manifest(layout.final(layout.ROUTER)) is not None:
        k = int((_final_config(store, layout.ROUTER).get("model") or {}).get("num_clusters") or 0)
        if k:
            return k
    return max(present) + 1 if present else 0


@dataclass
class Ensemble:
    """What ``generate`` validated: expert specs (index = cluster; None: that expert has not committed, the
    ensemble is partial) and the router's K (None: no router needed)."""

    experts: list[ExpertSpec | None]
    router_k: int | None

    @property
    def present(self) -> list[int]:
        return [k for k, s in enumerate(self.experts) if s is not None]

    @property
    def missing(self) -> list[int]:
        return [k for k, s in enumerate(self.experts) if s is None]


def validate_ensemble(store: Store, strategy: str) -> Ensemble:
    """Check the run can sample with ``strategy`` from manifests and configs only (no weights are read)."""
    strat = parse_strategy(strategy)
    router_k: int | None = None
    if strat.needs_router:
        router_cfg = _final_config(store, layout.ROUTER)
        router_k = int((router_cfg.get("model") or {}).get("num_clusters") or 0)
        if router_k < 1:
            raise DataError(f"{store.url(layout.final(layout.ROUTER))}/config.json does not say model.num_clusters")
    present = committed_experts(store)
    count = router_k if router_k is not None else ensemble_size(store, present)
    if count == 0:
        raise MissingArtifactError(f"no committed expert under {store.url(layout.EXPERTS)}")
    extra = [k for k in present if k >= count]
    if extra:
        raise ConfigError(f"router has {router_k} clusters but {len(present)} experts are committed under "
                          f"{store.url(layout.EXPERTS)} (e.g. expert {extra[0]})")
    # A partial ensemble (experts still training, or failed for good) samples with the experts that committed; the
    # router's probabilities are renormalised over them (CombinedSampler).
    specs: list[ExpertSpec | None] = []
    for k in range(count):
        stage_dir, home = layout.expert(k), lineage.expert_home(store, k)  # a grown run's old experts: the parent's
        specs.append(expert_spec(_final_config(home, stage_dir), home.url(layout.final(stage_dir)))
                     if k in present else None)
    strat.check(count)
    if not present:
        raise MissingArtifactError(f"no expert has committed yet (expert 0: {store.url(layout.final(layout.expert(0)))})")
    if strat.kind in ("top", "sample") and strat.k > len(present):
        raise ConfigError(f"strategy {strat.name!r} keeps {strat.k} experts but only {len(present)} of {count} have "
                          f"committed (experts {present})")
    if strat.kind == "oracle" and strat.cluster not in present:
        raise MissingArtifactError(f"strategy {strat.name!r} needs expert {strat.cluster}, which has not committed: "
                                   f"{store.url(layout.final(layout.expert(strat.cluster)))}")
    committed = [s for s in specs if s is not None]
    first = committed[0]
    for k, s in enumerate(specs):
        if s is None:
            continue
        if (s.image_size, s.channels, s.num_classes, s.text_dim) != \
                (first.image_size, first.channels, first.num_classes, first.text_dim):
            raise ConfigError(f"expert {k} makes {s.channels}x{s.image_size}px images with num_classes="
                              f"{s.num_classes}, text_dim={s.text_dim}; expert {present[0]} "
                              f"{first.channels}x{first.image_size}px with num_classes={first.num_classes}, "
                              f"text_dim={first.text_dim}")
    return Ensemble(specs, router_k)


def _expert_loader(store: Store, stage_dir: str, spec: ExpertSpec, use_ema: bool, compile: bool = False) -> Any:
    def load() -> nn.Module:
        from ..models.dit import build_dit

        final = load_final(store, stage_dir, map_location="cpu", with_model=not use_ema)
        model = build_dit(spec.preset, spec.image_size, spec.channels, spec.num_classes, text_dim=spec.text_dim,
                          text_tokens=spec.text_tokens)
        model.load_state_dict(final.ema if use_ema else final.model)
        return compile_blocks(model) if compile else model

    return load


def _cached(models: dict[tuple[Any, ...], nn.Module] | None, key: tuple[Any, ...],
            load: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``load`` through the cache ``models`` (None: no cache)."""
    if models is None:
        return load

    def cached() -> nn.Module:
        if key not in models:
            models[key] = load()
        return models[key]

    return cached


def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional torch.compile (one compiled block serves every identical block of every expert and the router),
    the batch size dynamic from the first call (``run_blocks``: routed strategies give each call a new size)."""
    model.dynamic_batch = True
    for block in getattr(model, "blocks", []):
        block.compile()
    return model


def _check_labels(num_classes: int | None, labels: Sequence[int] | None) -> None:
    if num_classes is None:
        if labels:
            raise ConfigError("labels were given but the experts are unconditional (num_classes is None)")
        return
    bad = [y for y in labels or [] if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"label {bad[0]} is outside [0, {num_classes}) of the experts' classes")


@dataclass
class Prompts:
    """Captions encoded by the run's text encoder: what text-conditioned experts and router are given."""

    captions: list[str]
    tokens: torch.Tensor  # (P, L, D)
    mask: torch.Tensor  # (P, L) bool
    pooled: torch.Tensor  # (P, D)
    clusters: list[int] | None = None  # training captions: each one's image's cluster, the expert ``oracle`` asks


def run_text_encoder(store: Store) -> dict[str, Any]:
    """The text encoder (kind, uri, width, max_tokens) whose caption embeddings the run's models trained on, as
    the cluster stage recorded it with the shards."""
    from ..cluster_shards import load_shard_index

    index = load_shard_index(store)
    if index is None or index.text is None:
        raise ConfigError(f"the experts are text-conditioned but {store.url(layout.CLUSTER_SHARDS)} records no text "
                          "encoder (the cluster stage stores it with the caption embeddings)")
    return index.text


def encode_prompts(store: Store, captions: Sequence[str], spec: ExpertSpec,
                   device: str | torch.device = "cpu") -> Prompts:
    """``captions`` encoded with the run's text encoder, checked against the experts' text_dim."""
    from ..text import TextEncoder

    if spec.text_dim is None:
        raise ConfigError("prompts were given but the experts are not text-conditioned (text_dim is None)")
    if not captions:
        raise ConfigError("text-conditioned experts need at least one prompt")
    meta = run_text_encoder(store)
    encoder = TextEncoder(meta["uri"], device, int(meta["max_tokens"]), expect_dim=spec.text_dim, kind=meta["kind"])
    out = encoder.encode(list(captions))
    return Prompts(list(captions), out.tokens, out.mask, out.pooled)


@dataclass
class Draw:
    """What to draw: n images from the noise/label streams of ``seed`` (``labels`` cycled, else uniform;
    ``prompts`` cycled for text-conditioned experts)."""

    n: int
    batch_size: int
    seed: int = 0
    labels: Sequence[int] | None = None
    prompts: Prompts | None = None


def sampler_for(run_store: Store, strategy: str, steps: int = 50, method: str = "euler",
                device: str | torch.device = "cpu", cfg_scale: float = 1.0,
                expert_devices: Sequence[str] | None = None, use_ema: bool = True, precision: str = "fp32",
                compile: bool = False, stage_dirs: Sequence[str] | None = None,
                models: dict[tuple[Any, ...], nn.Module] | None = None,
                data: DataConfig | None = None) -> tuple[CombinedSampler, ExpertSpec]:
    """The validated ensemble of ``strategy`` as a sampler (weights load lazily), and the experts' spec.

    ``stage_dirs`` replaces the experts with these stages' models (e.g. ``[experts/monolith]`` with
    ``oracle-0``: the K=1 baseline sampled exactly like an ensemble). ``models``: a cache shared by the samplers
    of one process (the evaluation's strategies), so each expert and the router is read and compiled once.
    ``data``: the training data, for ``oracle`` on a run whose clustering manifest predates its class counts."""
    from ..stages.router import load_router

    if stage_dirs is None:
        ensemble = validate_ensemble(run_store, strategy)
        specs, dirs, router_k = ensemble.experts, [layout.expert(k) for k in range(len(ensemble.experts))], \
            ensemble.router_k
        homes = [lineage.expert_home(run_store, k) for k in range(len(dirs))]  # a grown run reads old experts where
    else:                                                                      # its parent committed them
        dirs = list(stage_dirs)
        specs = [expert_spec(_final_config(run_store, d), run_store.url(layout.final(d))) for d in dirs]
        router_k, homes = None, [run_store] * len(dirs)
    spec0 = next(s for s in specs if s is not None)
    experts = [_cached(models, ("expert", h.url(d), use_ema, compile), _expert_loader(h, d, s, use_ema, compile))
               if s is not None else None for d, s, h in zip(dirs, specs, homes)]
    router_src = None
    if router_k is not None:
        router_src = _cached(models, ("router", run_store.url(layout.ROUTER), compile),
                             (lambda: compile_blocks(load_router(run_store, "cpu")))
                             if compile else (lambda: load_router(run_store, "cpu")))
    mixture = None
    if parse_strategy(strategy).kind == "mixture":
        counts = mixture_counts(run_store, data)
        if spec0.num_classes is not None and counts.ndim == 1:
            raise ConfigError(f"strategy 'oracle': the clustering at {run_store.url(layout.CLUSTERING)} records no "
                              "class counts and no labelled data was given to count them (re-run the cluster stage)")
        mixture = torch.from_numpy(counts)
    sampler = CombinedSampler(experts, router_src, strategy, steps=steps, method=method,  # type: ignore[arg-type]
                              cfg_scale=cfg_scale, device=device, devices=expert_devices,
                              router_num_clusters=router_k, null_label=spec0.num_classes,
                              precision=precision, mixture=mixture)  # type: ignore[arg-type]
    return sampler, spec0


def sample_batches(sampler: CombinedSampler, spec: ExpertSpec, draw: Draw, rank: int = 0, world_size: int = 1,
                   skip: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(start, images (b, C, H, W) in [-1, 1] on the sampler's device, labels) for this rank's batches.

    Batch i covers samples [i * batch_size, ...) and goes to rank i % world_size; its noise, labels and sample-K
    draws depend only on the sample indices and the seed, so any number of ranks draws the same images.
    ``skip`` leaves out this rank's first batches (a resumed evaluation)."""
    _check_labels(spec.num_classes, draw.labels)
    if spec.text_dim is not None and draw.prompts is None:
        raise ConfigError("the experts are text-conditioned: give prompts (ddm sample --prompt, evaluation.prompts)")
    if spec.text_dim is None and draw.prompts is not None:
        raise ConfigError("prompts were given but the experts are not text-conditioned (text_dim is None)")
    if sampler.strategy.kind == "mixture" and draw.prompts is not None and draw.prompts.clusters is None:
        raise ConfigError("strategy 'oracle' asks each training caption's own cluster; a free prompt has none "
                          "(use top1, top-K, full, sample-K or nucleus-P)")
    shape = (spec.channels, spec.image_size, spec.image_size)
    decoder = None
    if spec.vae is not None:
        from ..vae import Vae

        decoder = Vae(spec.vae["uri"], sampler.device, spec.vae["scaling_factor"], spec.vae["shift_factor"])
    batches = range(rank, -(-draw.n // draw.batch_size), world_size)
    for i in list(batches)[skip:]:
        start, stop = i * draw.batch_size, min((i + 1) * draw.batch_size, draw.n)
        if preempt_requested():  # SIGTERM honoured within one batch (exit 143): what is committed stays
            raise PreemptedError(f"preempted (SIGTERM) before sample {start} of {draw.n}")
        y = None
        if spec.num_classes is not None:
            y = (torch.tensor([draw.labels[j % len(draw.labels)] for j in range(start, stop)], dtype=torch.long)
                 if draw.labels else labels_range(start, stop, spec.num_classes, draw.seed))
        text, pooled, experts = None, None, None
        if draw.prompts is not None:
            which = torch.arange(start, stop) % len(draw.prompts.captions)  # (b,) prompt of each sample
            text, pooled = (draw.prompts.tokens[which], draw.prompts.mask[which]), draw.prompts.pooled[which]
            if draw.prompts.clusters is not None:
                experts = torch.tensor(draw.prompts.clusters, dtype=torch.long)[which]  # (b,)
        x = sampler.sample(noise_range(start, stop, shape, draw.seed), y, seed=draw.seed * 1_000_003 + start,
                           text=text, pooled=pooled, experts=experts)
        if decoder is not None:  # a latent-space ensemble: its samples decoded into images
            x = decoder.decode(x, spec.pixel_channels)
        yield start, x.clamp(-1, 1), y


def generate(run_store: Store, strategy: str, n: int, batch_size: int = 64, steps: int = 50, method: str = "euler",
             seed: int = 0, device: str | torch.device = "cpu", cfg_scale: float = 1.0,
             labels: Sequence[int] | None = None, expert_devices: Sequence[str] | None = None,
             use_ema: bool = True, precision: str = "fp32", compile: bool = False,
             prompts: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw n images with ``strategy``; returns (images (N, C, H, W) in [-1, 1] on the CPU, stats).
    ``prompts`` (text-conditioned experts): image i gets prompt i mod len(prompts), encoded by the run's text
    encoder; ``cfg_scale`` then guides against the null caption.

    stats: nfe (expert evaluations per image), router_nfe, gflops_per_sample, expert_calls, labels (list or None),
    strategy, steps, method, cfg_scale, n. Deterministic for a seed (noise, labels and sample-K draws).
    precision="bf16" runs router and experts under bf16 autocast (the ODE state stays fp32): for GPUs.
    """
    sampler, spec = sampler_for(run_store, strategy, steps, method, device, cfg_scale, expert_devices, use_ema,
                                precision, compile)
    encoded = encode_prompts(run_store, prompts, spec, device) if prompts else None
    out, ys = [], []
    for _, images, y in sample_batches(sampler, spec, Draw(n, batch_size, seed, labels, encoded)):
        out.append(images.float().cpu())
        if y is not None:
            ys.append(y)
    stats = sampler.stats(n).as_dict()
    stats.update(strategy=parse_strategy(strategy).name, steps=steps, method=method, cfg_scale=cfg_scale, n=n,
                 precision=precision, labels=torch.cat(ys).tolist() if ys else None,
                 experts=sampler.present, missing_experts=[k for k in range(sampler.num_experts)
                                                           if k not in sampler.present],
                 prompts=list(prompts) if prompts else None)
    return torch.cat(out), stats


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, C, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


LABEL_WIDTH = 160  # pixels of the label column beside a grid's rows; longer labels are cut with "..."


def grid_png(images: torch.Tensor, nrow: int, row_labels: Sequence[tuple[int, str]] = ()) -> bytes:
    """A PNG of ``images`` (N, C, H, W) in [-1, 1], ``nrow`` a row; ``row_labels`` (first grid row, text) are
    written in a column on the left, e.g. each prompt beside its rows."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)  # (C, H', W')
    arr = (grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
    if row_labels:
        labelled = Image.new(img.mode, (img.width + LABEL_WIDTH, img.height), "white")
        labelled.paste(img, (LABEL_WIDTH, 0))
        draw, font = ImageDraw.Draw(labelled), ImageFont.load_default()
        row_height = images.shape[2] + 2
        for row, text in row_labels:
            while text and draw.textlength(text, font=font) > LABEL_WIDTH - 8:
                text = text[:-4] + "..." if len(text) > 4 else ""
            draw.text((4, 2 + row * row_height + images.shape[2] // 2 - 6), text, fill="black", font=font)
        img = labelled
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def by_prompt(images: torch.Tensor, num_prompts: int, grid_max: int, nrow: int) -> torch.Tensor:
    """The images of a combined grid in prompt order, each prompt's own rows (image i has prompt i mod P, so
    in drawing order a row of the grid would mix the prompts): at most grid_max // P images per prompt, its last
    row filled with white images (the grid's padding colour)."""
    per_prompt = max(grid_max // num_prompts, 1)
    blocks = []
    for p in range(num_prompts):
        block = images[p::num_prompts][:per_prompt]  # (n_p, C, H, W)
        blank = torch.ones(((-len(block)) % nrow, *images.shape[1:]), dtype=images.dtype)
        blocks += [block, blank.to(images.device)]
    return torch.cat(blocks)  # (P * ceil(n_p / nrow) * nrow, C, H, W)


def run(cfg: SampleConfig) -> dict[str, Any]:
    from ..runtime import resolve_device
    from ..store import open_store

    store = open_store(cfg.run_uri)
    prompts = cfg.prompts or None
    n = cfg.n * len(prompts) if prompts else cfg.n  # n images per prompt
    images, stats = generate(store, cfg.strategy, n, cfg.batch_size, cfg.steps, cfg.method, cfg.seed,
                             resolve_device(cfg.device), cfg.cfg_scale, cfg.labels, cfg.expert_devices, cfg.use_ema,
                             cfg.precision, prompts=prompts)
    name = cfg.name or parse_strategy(cfg.strategy).name
    buf = io.BytesIO()
    labels = np.asarray(stats["labels"] if stats["labels"] is not None else [], dtype=np.int64)
    np.savez_compressed(buf, images=to_uint8(images), labels=labels,
                        prompts=np.asarray([prompts[i % len(prompts)] for i in range(n)] if prompts else []))
    prefix = f"{SAMPLES}/{name}"
    meta = {k: v for k, v in stats.items() if k != "labels"}
    meta["seed"] = cfg.seed
    if prompts:  # each prompt in its own rows, named on the left
        combined = by_prompt(images, len(prompts), cfg.grid_max, cfg.nrow)
        rows = len(combined) // cfg.nrow // len(prompts)
        grid = grid_png(combined, cfg.nrow, [(p * rows, prompt) for p, prompt in enumerate(prompts)])
    else:
        grid = grid_png(images[: cfg.grid_max], cfg.nrow)
    files = {"grid.png": grid, "samples.npz": buf.getvalue()}
    for p, prompt in enumerate(prompts or []):  # one grid per prompt: image i has prompt i mod P
        files[f"grid-{p:02d}.png"] = grid_png(images[p::len(prompts)][: cfg.grid_max], cfg.nrow)
    if prompts:
        meta["grids"] = {f"grid-{p:02d}.png": prompt for p, prompt in enumerate(prompts)}
    store.commit(prefix, files, meta=meta)
    print(f"sample: {cfg.n} images with {stats['strategy']} -> {store.url(prefix)}; nfe/image={stats['nfe']:.2f}, "
          f"router nfe/image={stats['router_nfe']:.2f}, GFLOPs/image={stats['gflops_per_sample']:.3f}", flush=True)
    if stats["missing_experts"]:
        print(f"sample: a partial ensemble: experts {stats['experts']} of {len(stats['experts']) + len(stats['missing_experts'])}"
              f" (missing: {stats['missing_experts']}; the router renormalised over the others)", flush=True)
    return meta
