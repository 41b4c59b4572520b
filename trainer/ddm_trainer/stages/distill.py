"""Stage ``distill``: one dense DiT student trained to match the DDM teachers' velocity (McAllister et al. 2025, §distillation).

For each training image x0 we draw t and eps, form x_t = (1 - t) x0 + t eps, and regress the student's velocity
onto the teacher's at the same (x_t, t): ``teacher=expert-of-cluster`` uses the expert of x0's own cluster (the
paper's choice: no router needed), ``teacher=ensemble`` the router-combined experts with ``strategy``. Training is
the generic checkpointed ``Trainer`` under ``layout.DISTILLATION`` (same checkpoint/resume guarantees as experts);
its final weights are committed there, then ``distillation/report`` (loss curve + a grid of student samples).
Everything upstream (assignments, each teacher's committed weights, image size) is checked before training.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import layout
from ..configs.distill import DistillConfig
from ..errors import ConfigError, MissingArtifactError
from ..flow import drop_labels, dropped, interpolate, sample_t
from ..store import Store

TeacherFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class DistillStream:
    """Batches ``{"x0": (B, C, H, W), "cluster": (B,), "y": (B,) [class-conditional], "text": (B, L, D),
    "text_mask": (B, L), "text_pooled": (B, D) [text-conditioned]}``; resumable as it wraps."""

    def __init__(self, stream: Any, cluster_of: dict[str, int], with_labels: bool, with_text: bool = False):
        self.stream, self.cluster_of, self.with_labels, self.with_text = stream, cluster_of, with_labels, with_text

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.stream:
            out = {"x0": batch.images,
                   "cluster": torch.tensor([self.cluster_of[k] for k in batch.keys], dtype=torch.long)}  # (B,)
            if self.with_labels and batch.labels is not None:
                out["y"] = batch.labels
            if self.with_text:
                out.update(text=batch.text, text_mask=batch.text_mask, text_pooled=batch.text_pooled)
            yield out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.stream.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def expert_of_cluster_teacher(experts: list[nn.Module]) -> TeacherFn:
    """v(x_t, t) from the expert of each sample's own cluster."""

    def teacher(x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        k_of, y, text, mask = batch["cluster"], batch.get("y"), batch.get("text"), batch.get("text_mask")
        v = torch.empty_like(x_t)  # (B, C, H, W)
        for k in torch.unique(k_of).tolist():
            idx = torch.nonzero(k_of == k).flatten()  # (b,)
            extra = (text[idx], mask[idx]) if text is not None and mask is not None else ()
            v[idx] = experts[k](x_t[idx], t[idx], y[idx] if y is not None else None, *extra).to(v.dtype)
        return v

    return teacher


def ensemble_teacher(sampler: Any, seed: int) -> TeacherFn:
    """v(x_t, t) = sum_k w_k(x_t, t) v_k from a ``CombinedSampler`` (router + strategy)."""
    gen = torch.Generator().manual_seed(seed)  # drives sample-K draws

    def teacher(x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        text = (batch["text"], batch["text_mask"]) if "text" in batch else None
        return sampler.velocity(x_t.float(), t.float(), batch.get("y"), gen, text,
                                batch.get("text_pooled")).to(x_t.dtype)

    return teacher


def distill_loss(teacher: TeacherFn, t_dist: str = "logit_normal", label_dropout: float = 0.0,
                 caption_dropout: float = 0.0, null_label: int | None = None) -> Callable[..., torch.Tensor]:
    """loss_fn(student, batch, generator) = MSE(student(x_t, t, y), teacher(x_t, t)) for the Trainer.

    Guided sampling asks the student for its unconditional velocity too, so, as the experts were trained, each
    sample's label is replaced by ``null_label`` with probability ``label_dropout`` (its caption by the null caption
    with ``caption_dropout``), for the teacher and the student alike: the student's unconditional velocity is then
    the teachers' (without it, guidance steers by an embedding the student never trained)."""

    def loss_fn(student: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["x0"]
        t = sample_t(x0.shape[0], generator, t_dist, device=x0.device)  # type: ignore[arg-type]  # (B,)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)  # (B, C, H, W)
        x_t = interpolate(x0, eps, t)  # (B, C, H, W)
        if "y" in batch and label_dropout > 0:
            if null_label is None:
                raise ConfigError("label_dropout needs the teachers' null label (their num_classes)")
            batch = {**batch, "y": drop_labels(batch["y"], label_dropout, null_label, generator)}
        no_caption = dropped(x0.shape[0], caption_dropout, generator, x0.device) \
            if "text" in batch and caption_dropout > 0 else None  # (B,)
        with torch.no_grad():
            target = teacher(x_t, t, batch) if no_caption is None else \
                _teacher_with_null_captions(teacher, x_t, t, batch, no_caption)  # (B, C, H, W)
        extra = (batch["text"], batch["text_mask"]) if "text" in batch else ()
        kwargs = {"text_drop": no_caption} if no_caption is not None else {}
        v = student(x_t, t, batch.get("y"), *extra, **kwargs)  # (B, C, H, W)
        return F.mse_loss(v.float(), target.float())

    return loss_fn


TEXT_KEYS = ("text", "text_mask", "text_pooled")


def _teacher_with_null_captions(teacher: TeacherFn, x_t: torch.Tensor, t: torch.Tensor,
                                batch: dict[str, torch.Tensor], no_caption: torch.Tensor) -> torch.Tensor:
    """The teacher's velocity with the null caption where ``no_caption``: a teacher takes one set of captions per
    call, and one without any (experts and router: the null caption) for the dropped samples."""
    target = torch.empty_like(x_t)  # (B, C, H, W)
    uncaptioned = {k: v for k, v in batch.items() if k not in TEXT_KEYS}
    for rows, part in ((~no_caption, batch), (no_caption, uncaptioned)):
        idx = torch.nonzero(rows).flatten()  # (b,)
        if idx.numel():
            target[idx] = teacher(x_t[idx], t[idx], {k: v[idx] for k, v in part.items()})
    return target


def _expert_config(store: Store, k: int) -> dict[str, Any]:
    import json

    prefix = layout.final(layout.expert(k))
    if store.read_manifest(prefix) is None:
        raise MissingArtifactError(f"distillation teacher: expert {k} has no committed final weights at "
                                   f"{store.url(prefix)}")
    return json.loads(store.read_committed(prefix, "config.json"))


def check_teachers(cfg: DistillConfig, store: Store, num_clusters: int) -> Any:
    """Every teacher is committed and makes images the size of ``cfg.data``; returns expert 0's spec."""
    from .sample import expert_spec, validate_ensemble

    if cfg.teacher == "ensemble":
        specs = validate_ensemble(store, cfg.strategy).experts
        if len(specs) != num_clusters:
            raise ConfigError(f"the ensemble has {len(specs)} experts but the clustering has {num_clusters} clusters")
    else:
        specs = [expert_spec(_expert_config(store, k), store.url(layout.final(layout.expert(k))))
                 for k in range(num_clusters)]
    spec = next(s for s in specs if s is not None)  # a partial ensemble teaches with the experts it has
    if spec.output_shape != (cfg.data.channels, cfg.data.image_size):
        raise ConfigError(f"the experts make {spec.output_shape[0]}x{spec.output_shape[1]}px images but data "
                          f"{cfg.data.uri} is "
                          f"{cfg.data.channels}x{cfg.data.image_size}px (set data.channels / data.image_size)")
    return spec


def run(cfg: DistillConfig) -> list[float]:
    from ..clustering import load_assignments
    from ..data import open_source
    from ..models.dit import build_dit
    from ..progress import Reporter
    from ..runtime import setup_runtime, shutdown
    from ..sampler import CombinedSampler
    from ..store import open_store
    from ..train_loop import Trainer
    from .expert import finish, load_expert
    from .router import load_router

    store = open_store(cfg.run_uri)
    assignments = load_assignments(store)
    num_clusters = int(assignments.num_clusters)
    spec = check_teachers(cfg, store, num_clusters)
    model_spec = {"arch": "dit", "preset": cfg.model, "image_size": spec.image_size, "channels": spec.channels,
                  "num_classes": spec.num_classes, "text_dim": spec.text_dim, "text_tokens": spec.text_tokens}
    if spec.vae is not None:  # latent-space teachers: the student learns their latents, decoded by their VAE
        model_spec.update(vae=spec.vae, pixel_size=spec.pixel_size, pixel_channels=spec.pixel_channels)
    torch.manual_seed(cfg.seed)
    # the student is conditioned as the teachers are (validates the preset)
    student = build_dit(cfg.model, spec.image_size, spec.channels, spec.num_classes, text_dim=spec.text_dim,
                        text_tokens=spec.text_tokens)

    rt = setup_runtime(cfg.device, deterministic=cfg.train.deterministic)
    cluster_of = {str(k): int(c) for k, c in zip(assignments.keys, np.asarray(assignments.cluster).tolist())}
    stream: Any
    latents = spec.vae is not None
    if spec.text_dim is not None or latents:  # every cluster's shards, with the embeddings / latents stored there
        from ..cluster_shards import open_all_shards

        shards = open_all_shards(store, cfg.data, spec.text_dim, latents)
        stream = shards.stream(cfg.train.batch_size, cfg.seed, rt.rank, rt.world_size, prefetch=cfg.train.prefetch,
                               workers=cfg.data.workers)
    else:
        stream = open_source(cfg.data, store).stream(cfg.train.batch_size, cfg.seed, rt.rank, rt.world_size,
                                                     keys=list(cluster_of), prefetch=cfg.train.prefetch)
    experts = [load_expert(store, layout.expert(k), rt.device, ema=cfg.use_ema).requires_grad_(False)
               for k in range(num_clusters)]
    if cfg.teacher == "ensemble":
        router = load_router(store, rt.device).requires_grad_(False)
        sampler = CombinedSampler(experts, router, cfg.strategy, device=rt.device, null_label=spec.num_classes)
        teacher = ensemble_teacher(sampler, cfg.seed)
    else:
        teacher = expert_of_cluster_teacher(experts)
    reporter = Reporter("distill", None, cfg.train.steps, store) if rt.is_main else None
    if rt.is_main:
        guidance_drops = [f"{cfg.label_dropout:.0%} of labels"] * bool(spec.num_classes) + \
            [f"{cfg.caption_dropout:.0%} of captions"] * (spec.text_dim is not None)
        print(f"distill: student {cfg.model}, {cfg.train.steps} steps of {cfg.train.batch_size}, from teacher "
              f"{cfg.teacher}{f' ({cfg.strategy})' if cfg.teacher == 'ensemble' else ''} over {num_clusters} "
              f"experts" + (f"; for guidance, {' and '.join(guidance_drops)} dropped" if guidance_drops else ""),
              flush=True)
    loss = distill_loss(teacher, cfg.t_dist, cfg.label_dropout, cfg.caption_dropout, spec.num_classes)
    trainer = Trainer(student, loss, DistillStream(stream, cluster_of,
                      spec.num_classes is not None, spec.text_dim is not None), store, layout.DISTILLATION, cfg.train, reporter, seed=cfg.seed,
                      runtime=rt, stage_config=cfg.model_dump(mode="json"), model_spec=model_spec)
    losses = trainer.fit()
    if rt.is_main:
        labels = torch.arange(cfg.sample_grid.count) % spec.num_classes if spec.num_classes else None
        text = None
        if spec.text_dim is not None and cfg.sample_grid.count > 0:  # captions of the first training samples
            picked = next(iter(shards.stream(cfg.sample_grid.count, cfg.seed, workers=0)))
            text = (picked.text, picked.text_mask)
        finish(trainer, store, layout.DISTILLATION, cfg.sample_grid, labels, cfg.seed, reporter, text)
    shutdown(rt)
    return losses
