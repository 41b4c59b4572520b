"""Stage ``expert``: train one flow-matching DiT on one cluster's samples (or on all data: the monolith baseline).

Reads the cluster's keys from the clustering stage's assignments, trains with the generic checkpointed Trainer
under ``layout.expert(k)`` (``experts/monolith`` when ``cluster_index`` is null), commits the final weights, then
commits ``<stage>/report``: ``loss_curve.json`` (per-step loss) and ``samples.png`` (a grid of EMA samples).
Re-running a finished expert only rewrites its report.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from .. import layout
from ..checkpoint import load_final
from ..configs.expert import ExpertConfig, SampleGridConfig
from ..errors import ConfigError, DataError
from ..flow import flow_loss, ode_sample
from ..models.dit import DiT, build_dit
from ..store import Store

MONOLITH = layout.MONOLITH
REPORT = "report"


def stage_dir_of(cluster_index: int | None) -> str:
    return MONOLITH if cluster_index is None else layout.expert(cluster_index)


def model_spec(cfg: ExpertConfig, latent: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``load_expert`` needs to rebuild the network from the final weights. ``latent`` (the stored latents'
    description): the network works on latents of that shape, and samples are decoded by its ``vae``."""
    spec = {"arch": "dit", "preset": cfg.model, "image_size": cfg.data.image_size, "channels": cfg.data.channels,
            "num_classes": cfg.num_classes if cfg.class_cond else None, "text_dim": cfg.text_dim,
            "text_tokens": cfg.text_tokens}
    if latent is not None:
        spec.update(image_size=int(latent["size"]), channels=int(latent["channels"]), vae=latent["vae"],
                    pixel_size=cfg.data.image_size, pixel_channels=cfg.data.channels)
    return spec


def stored_latent(store: Store, latents: bool) -> dict[str, Any] | None:
    """The latents the cluster stage stored (channels, size, vae) when the stage trains on latents."""
    if not latents:
        return None
    from ..cluster_shards import load_shard_index

    index = load_shard_index(store)
    if index is None or index.latent is None:
        raise DataError(f"latents is true but {store.url(layout.CLUSTER_SHARDS)} holds no VAE latents: give the "
                        "cluster stage a vae (spec.vae)")
    return index.latent


def decode_latents(spec: dict[str, Any], samples: torch.Tensor) -> torch.Tensor:
    """Samples of a latent-space model decoded by its VAE into images in [-1, 1]; pixels pass through."""
    if not spec.get("vae"):
        return samples
    from ..vae import Vae

    vae = spec["vae"]
    decoder = Vae(vae["uri"], samples.device, vae["scaling_factor"], vae["shift_factor"])
    return decoder.decode(samples, spec.get("pixel_channels"))


def build_from_spec(spec: dict[str, Any]) -> DiT:
    return build_dit(spec["preset"], spec["image_size"], spec["channels"], num_classes=spec.get("num_classes"),
                     text_dim=spec.get("text_dim"), text_tokens=int(spec.get("text_tokens") or 16))


def load_expert(store: Store, stage_dir: str, device: str | torch.device = "cpu", ema: bool = True) -> DiT:
    """A trained expert (EMA weights by default) in eval mode; MissingArtifactError if it never finished."""
    final = load_final(store, stage_dir, map_location=device, with_model=not ema)
    model = build_from_spec(final.config["model"])
    model.load_state_dict(final.ema if ema else final.model)
    return model.to(device).eval()


def expert_loss(cfg: ExpertConfig):  # type: ignore[no-untyped-def]
    """loss_fn(model, ImageBatch, generator) for the Trainer: flow matching, labels only when class-conditional."""

    def loss_fn(model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        y = batch.labels if cfg.class_cond else None
        text = None
        if cfg.text_dim is not None:
            if batch.text is None:
                raise DataError(f"text_dim={cfg.text_dim} but batch {batch.keys[:3]} carries no caption embeddings")
            text = (batch.text, batch.text_mask)
        return flow_loss(model, batch.images, y, generator, cfg.t_dist, cfg.label_dropout if cfg.class_cond else 0.0,
                         text=text, caption_dropout=cfg.caption_dropout)

    return loss_fn


@torch.no_grad()
def sample_grid(model: DiT, grid: SampleGridConfig, labels: torch.Tensor | None, seed: int,
                device: torch.device, text: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``grid.count`` samples in [-1, 1] from fixed seeded noise; classifier-free guidance when labels are given,
    or captions (``text``: token embeddings (N, L, D), mask (N, L), against the null caption)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x1 = torch.randn(grid.count, model.channels, model.image_size, model.image_size, generator=gen).to(device)
    y = labels.to(device) if labels is not None else None
    scale = grid.cfg_scale
    tokens, mask = (text[0].to(device), text[1].to(device)) if text is not None else (None, None)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if tokens is not None:
                v = model(x, t, y, tokens, mask).float()
                return v if scale == 1.0 else (u := model(x, t, y).float()) + scale * (v - u)
            if y is None or scale == 1.0:
                return model(x, t, y).float()
            null = torch.full_like(y, model.null_label)
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
            return v_u + scale * (v_c - v_u)

    return ode_sample(velocity, x1, grid.steps, grid.method).clamp(-1, 1)  # type: ignore[union-attr]


def write_report(store: Store, stage_dir: str, losses: list[float], grid_png: bytes | None) -> None:
    files = {"loss_curve.json": json.dumps({"step": list(range(1, len(losses) + 1)), "loss": losses}).encode()}
    if grid_png is not None:
        files["samples.png"] = grid_png
    store.commit(f"{stage_dir}/{REPORT}", files)


def finish(trainer: Any, store: Store, stage_dir: str, grid: SampleGridConfig, labels: torch.Tensor | None,
           seed: int, reporter: Any, text: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rank 0 after training: an EMA sample grid and the loss curve as the stage's report, then the 'done' event."""
    from ..images import save_grid

    png = None
    if grid.count > 0:  # a latent-space model's samples decoded by its VAE
        samples = sample_grid(trainer.ema, grid, labels, seed, trainer.rt.device, text)
        png = save_grid(decode_latents(trainer.model_spec, samples), nrow=grid.nrow)
    write_report(store, stage_dir, trainer.losses, png)
    if reporter:
        reporter.close(step=trainer.step, loss=trainer.losses[-1] if trainer.losses else None,
                       final=store.url(layout.final(stage_dir)))


def init_from_parent(model: DiT, store: Store, cfg: ExpertConfig,
                     spec: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Start a grown run's retrained expert from its parent's weights (model into ``model``; returns the EMA), or
    None when the parent never committed this expert (it then trains from scratch)."""
    from ..lineage import expert_home, parent_of
    from ..store import open_store

    parent = parent_of(store)
    k = cfg.cluster_index
    if parent is None or k is None or k not in parent["experts"]:
        return None
    home = expert_home(open_store(parent["uri"]), k)
    final = load_final(home, layout.expert(k))
    theirs = final.config.get("model") or {}
    if any(theirs.get(f) != spec.get(f) for f in ("preset", "image_size", "channels", "num_classes")):
        raise ConfigError(f"expert {k} of the parent ({home.url(layout.final(layout.expert(k)))}) is {theirs}; "
                          f"retraining it needs the same spec.experts.modelPreset and data shape, got {spec}")
    model.load_state_dict(final.model)
    return final.ema


def run(cfg: ExpertConfig) -> None:
    from ..data import open_source
    from ..progress import Reporter
    from ..runtime import setup_runtime, shutdown
    from ..store import open_store
    from ..train_loop import Trainer

    rt = setup_runtime(cfg.device, deterministic=cfg.train.deterministic)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    store = open_store(cfg.run_uri)
    spec = model_spec(cfg, stored_latent(store, cfg.latents))
    model = build_from_spec(spec)  # first: a bad preset fails before any data is read
    stage_dir = stage_dir_of(cfg.cluster_index)
    keys = None
    shards = None
    if cfg.cluster_index is not None:
        from ..cluster_shards import open_cluster_shards
        from ..clustering import allocated_steps, load_assignments

        assignments = load_assignments(store)
        keys = list(assignments.keys_of(cfg.cluster_index))
        if not keys:
            raise DataError(f"cluster_index {cfg.cluster_index} has no samples in {store.url(layout.CLUSTERING)}")
        if cfg.steps_allocation == "proportional":  # before the reporter and the schedule read train.steps
            steps = allocated_steps(cfg.train.steps, assignments.sizes)[cfg.cluster_index]
            if rt.is_main:
                print(f"expert {cfg.cluster_index}: {steps} steps ({len(keys)} of {len(assignments.keys)} samples; "
                      f"steps_allocation proportional, mean {cfg.train.steps})", flush=True)
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
        # None: clustered before shards existed; text-conditioned: the shards' caption embeddings, checked
        shards = open_cluster_shards(store, cfg.cluster_index, cfg.data, cfg.text_dim, cfg.latents)
        if cfg.init_from_parent:  # a grown run retrains a grown cluster's expert on its old and new data
            from ..grown_data import grown_cluster_shards

            shards = grown_cluster_shards(store, cfg.cluster_index, cfg.data, shards, cfg.text_dim)
    elif cfg.text_dim is not None or cfg.latents:  # the monolith of a text or latent run: every cluster's shards
        from ..cluster_shards import open_all_shards

        shards = open_all_shards(store, cfg.data, cfg.text_dim, cfg.latents)
    source = shards if shards is not None else open_source(cfg.data, store)
    if cfg.class_cond and source.num_classes is not None and cfg.num_classes is not None \
            and source.num_classes > cfg.num_classes:
        raise DataError(f"data.uri {cfg.data.uri} has {source.num_classes} classes but num_classes={cfg.num_classes}")
    if shards is not None:  # only this cluster's shards, only this rank's where it owns whole shards
        stream = shards.stream(cfg.train.batch_size, cfg.seed, rt.rank, rt.world_size, prefetch=cfg.train.prefetch,
                               workers=cfg.data.workers)
        stream.start_workers()  # they come up while the model is moved, restored and compiled
    else:
        stream = source.stream(cfg.train.batch_size, cfg.seed, rt.rank, rt.world_size, keys=keys,
                               prefetch=cfg.train.prefetch)
    # progress/<id>.json: expert-NNN, or baseline for the monolith (the operator's stage key of it)
    reporter = Reporter("expert" if cfg.cluster_index is not None else "baseline", cfg.cluster_index,
                        cfg.train.steps, store) if rt.is_main else None
    parent_ema = init_from_parent(model, store, cfg, spec) if cfg.init_from_parent else None
    trainer = Trainer(model, expert_loss(cfg), stream, store, stage_dir, cfg.train, reporter, seed=cfg.seed,
                      runtime=rt, stage_config=cfg.model_dump(mode="json"), model_spec=spec)
    if parent_ema is not None:  # a checkpoint of this run, if any, still wins: fit() resumes from it
        trainer.ema.load_state_dict(parent_ema)
    trainer.fit()
    if rt.is_main:
        labels, text = None, None
        n = cfg.sample_grid.count
        if (cfg.class_cond or cfg.text_dim is not None) and n > 0:  # the cluster's own labels / captions
            picked = next(iter(shards.stream(n, cfg.seed, workers=0))) if shards is not None and keys is None \
                else source.load((keys or source.keys())[:n])
            reps = -(-n // len(picked.keys))
            if cfg.class_cond and picked.labels is not None:
                labels = picked.labels.repeat(reps)[:n]
            if cfg.text_dim is not None and picked.text is not None and picked.text_mask is not None:
                text = (picked.text.repeat(reps, 1, 1)[:n], picked.text_mask.repeat(reps, 1)[:n])
        finish(trainer, store, stage_dir, cfg.sample_grid, labels, cfg.seed, reporter, text)
    shutdown(rt)
