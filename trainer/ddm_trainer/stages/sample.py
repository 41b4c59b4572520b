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
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .. import layout
from ..checkpoint import CONFIG_FILE, load_final
from ..combine import parse_strategy
from ..configs.sample import SampleConfig
from ..errors import ConfigError, DataError, MissingArtifactError
from ..sampler import CombinedSampler, draw_noise
from ..store import MANIFEST, Store

SAMPLES = "samples"  # samples/<name>/: MANIFEST.json, grid.png, samples.npz


@dataclass(frozen=True)
class ExpertSpec:
    preset: str
    image_size: int
    channels: int
    num_classes: int | None


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
    return ExpertSpec(preset, image_size, channels, int(num_classes) if num_classes else None)


def committed_experts(store: Store) -> list[int]:
    """Indices of experts whose final weights are committed (``experts/NNN/final/MANIFEST.json``), ascending."""
    found = set()
    for key in store.list(layout.EXPERTS):
        parts = key.split("/")
        if len(parts) == 4 and parts[1].isdigit() and parts[2:] == ["final", MANIFEST]:
            found.add(int(parts[1]))
    return sorted(found)


@dataclass
class Ensemble:
    """What ``generate`` validated: expert specs (index = cluster) and the router's K (None: no router needed)."""

    experts: list[ExpertSpec]
    router_k: int | None


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
    count = router_k if router_k is not None else (max(present) + 1 if present else 0)
    if count == 0:
        raise MissingArtifactError(f"no committed expert under {store.url(layout.EXPERTS)}")
    extra = [k for k in present if k >= count]
    if extra:
        raise ConfigError(f"router has {router_k} clusters but {len(present)} experts are committed under "
                          f"{store.url(layout.EXPERTS)} (e.g. expert {extra[0]})")
    specs = []
    for k in range(count):
        stage_dir = layout.expert(k)
        specs.append(expert_spec(_final_config(store, stage_dir), store.url(layout.final(stage_dir))))
    strat.check(count)
    first = specs[0]
    for k, s in enumerate(specs):
        if (s.image_size, s.channels, s.num_classes) != (first.image_size, first.channels, first.num_classes):
            raise ConfigError(f"expert {k} makes {s.channels}x{s.image_size}px images with num_classes="
                              f"{s.num_classes}, expert 0 {first.channels}x{first.image_size}px with "
                              f"num_classes={first.num_classes}")
    return Ensemble(specs, router_k)


def _expert_loader(store: Store, k: int, spec: ExpertSpec, use_ema: bool) -> Any:
    def load() -> nn.Module:
        from ..models.dit import build_dit

        final = load_final(store, layout.expert(k), map_location="cpu", with_model=not use_ema)
        model = build_dit(spec.preset, spec.image_size, spec.channels, spec.num_classes)
        model.load_state_dict(final.ema if use_ema else final.model)
        return model

    return load


def _labels(n: int, num_classes: int | None, labels: Sequence[int] | None, seed: int) -> torch.Tensor | None:
    if num_classes is None:
        if labels:
            raise ConfigError("labels were given but the experts are unconditional (num_classes is None)")
        return None
    if labels:
        bad = [y for y in labels if not 0 <= y < num_classes]
        if bad:
            raise ConfigError(f"label {bad[0]} is outside [0, {num_classes}) of the experts' classes")
        return torch.tensor([labels[i % len(labels)] for i in range(n)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, num_classes, (n,), generator=gen)


def generate(run_store: Store, strategy: str, n: int, batch_size: int = 64, steps: int = 50, method: str = "euler",
             seed: int = 0, device: str | torch.device = "cpu", cfg_scale: float = 1.0,
             labels: Sequence[int] | None = None, expert_devices: Sequence[str] | None = None,
             use_ema: bool = True, precision: str = "fp32") -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw n images with ``strategy``; returns (images (N, C, H, W) in [-1, 1] on the CPU, stats).

    stats: nfe (expert evaluations per image), router_nfe, gflops_per_sample, expert_calls, labels (list or None),
    strategy, steps, method, cfg_scale, n. Deterministic for a seed (noise, labels and sample-K draws).
    precision="bf16" runs router and experts under bf16 autocast (the ODE state stays fp32): for GPUs.
    """
    from ..stages.router import load_router

    ensemble = validate_ensemble(run_store, strategy)
    spec0 = ensemble.experts[0]
    y_all = _labels(n, spec0.num_classes, labels, seed)
    experts = [_expert_loader(run_store, k, s, use_ema) for k, s in enumerate(ensemble.experts)]
    router_src = (lambda: load_router(run_store, "cpu")) if ensemble.router_k is not None else None
    sampler = CombinedSampler(experts, router_src, strategy, steps=steps, method=method,  # type: ignore[arg-type]
                              cfg_scale=cfg_scale, device=device, devices=expert_devices,
                              router_num_clusters=ensemble.router_k, null_label=spec0.num_classes,
                              precision=precision)  # type: ignore[arg-type]
    x1 = draw_noise(n, (spec0.channels, spec0.image_size, spec0.image_size), seed)  # (N, C, H, W)
    out = []
    for start in range(0, n, batch_size):
        y = y_all[start : start + batch_size] if y_all is not None else None
        x = sampler.sample(x1[start : start + batch_size], y, seed=seed * 1_000_003 + start)
        out.append(x.clamp(-1, 1).float().cpu())
    stats = sampler.stats(n).as_dict()
    stats.update(strategy=parse_strategy(strategy).name, steps=steps, method=method, cfg_scale=cfg_scale, n=n,
                 precision=precision,
                 labels=y_all.tolist() if y_all is not None else None)
    return torch.cat(out), stats


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, C, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def grid_png(images: torch.Tensor, nrow: int) -> bytes:
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)  # (C, H', W')
    arr = (grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run(cfg: SampleConfig) -> dict[str, Any]:
    from ..runtime import resolve_device
    from ..store import open_store

    store = open_store(cfg.run_uri)
    images, stats = generate(store, cfg.strategy, cfg.n, cfg.batch_size, cfg.steps, cfg.method, cfg.seed,
                             resolve_device(cfg.device), cfg.cfg_scale, cfg.labels, cfg.expert_devices, cfg.use_ema,
                             cfg.precision)
    name = cfg.name or parse_strategy(cfg.strategy).name
    buf = io.BytesIO()
    labels = np.asarray(stats["labels"] if stats["labels"] is not None else [], dtype=np.int64)
    np.savez_compressed(buf, images=to_uint8(images), labels=labels)
    prefix = f"{SAMPLES}/{name}"
    meta = {k: v for k, v in stats.items() if k != "labels"}
    meta["seed"] = cfg.seed
    store.commit(prefix, {"grid.png": grid_png(images[: cfg.grid_max], cfg.nrow), "samples.npz": buf.getvalue()},
                 meta=meta)
    print(f"sample: {cfg.n} images with {stats['strategy']} -> {store.url(prefix)}; nfe/image={stats['nfe']:.2f}, "
          f"router nfe/image={stats['router_nfe']:.2f}, GFLOPs/image={stats['gflops_per_sample']:.3f}", flush=True)
    return meta
