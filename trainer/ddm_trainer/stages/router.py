"""Stage ``router``: train p(k | x_t, t[, y]) on all clustered data, then measure held-out top-1 accuracy against t.

Samples x0 with their cluster ids from the clustering stage's assignments, draws t ~ t_dist and eps ~ N(0, I),
and minimises cross-entropy(router(x_t, t), k) with the generic checkpointed Trainer (stage dir ``router``).
A latent-space or caption-conditioned router streams the cluster shards, which hold the latents and caption
embeddings, as the experts do (shard by shard, exact resume), and reads its held-out samples back by position.
A fixed, seeded subset of ``eval.holdout`` samples never enters training; accuracy on it per t-bin goes to
``router/eval/accuracy.json`` + ``accuracy_vs_t.png`` (committed) and stdout. Accuracy should approach the
prior's majority share (1/K for balanced clusters) as t -> 1 and rise towards 1 as t -> 0. A class-conditional
router (``num_classes``, the labels from ``data.class_field``) is trained with label dropout and evaluated twice per
bin: with the label (``accuracy``) and with the null label (``accuracy_unconditional``); near the noise the label is
all it has to go on.
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import layout
from ..checkpoint import load_final
from ..configs.router import RouterConfig, RouterEvalConfig
from ..errors import ConfigError, DataError
from ..flow import interpolate, sample_t
from ..models.router import Router, RouterSpec, build_router_from_spec
from ..store import Store

EVAL_DIR = f"{layout.ROUTER}/eval"


class ClusterStream:
    """A data stream whose batches are ``{"x0": (B, C, H, W), "cluster": (B,)[, "y": (B,)][, "text": (B, D)]}``;
    resumable like the stream it wraps. ``with_labels``: the class labels go along (a conditional router);
    ``with_text``: the batches' pooled caption embeddings (a caption-conditional router, reading cluster shards,
    whose batches carry them, and VAE latents as images in a latent-space run)."""

    def __init__(self, stream: Any, cluster_of: dict[str, int], with_labels: bool = False, with_text: bool = False):
        self.stream, self.cluster_of, self.with_labels, self.with_text = stream, cluster_of, with_labels, with_text

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.stream:
            ids = torch.tensor([self.cluster_of[k] for k in batch.keys], dtype=torch.long)  # (B,)
            out = {"x0": batch.images, "cluster": ids}
            if self.with_labels:
                if batch.labels is None:
                    raise DataError(f"a class-conditional router needs labels, but batch {batch.keys[:3]} has none")
                out["y"] = batch.labels
            if self.with_text:
                if batch.text_pooled is None:
                    raise DataError(f"a caption-conditional router needs caption embeddings, but batch "
                                    f"{batch.keys[:3]} has none")
                out["text"] = batch.text_pooled  # (B, D)
            yield out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.stream.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def router_loss(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
                t_dist: str = "uniform", num_classes: int | None = None, label_dropout: float = 0.0) -> torch.Tensor:
    """Cross-entropy of router(x_t, t[, y][, c]) against the cluster id of x0; t ~ t_dist, eps ~ N(0, I) from
    ``generator``. A conditional router (``num_classes``) sees y, replaced by the null label ``num_classes`` with
    probability ``label_dropout``; a text-conditioned one (``batch["text"]``, pooled caption embeddings) sees the
    caption, replaced by the null caption as often (the same samples lose both)."""
    x0, k = batch["x0"], batch["cluster"]
    t = sample_t(x0.shape[0], generator, t_dist, device=x0.device)  # type: ignore[arg-type]  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)  # (B, C, H, W)
    text = batch.get("text")
    if num_classes is None and text is None:
        logits = model(interpolate(x0, eps, t), t)  # (B, K)
    else:
        drop = torch.rand(k.shape, generator=generator, device=generator.device).to(k.device) < label_dropout  # (B,)
        y = torch.where(drop, torch.full_like(batch["y"], num_classes), batch["y"]) if num_classes is not None \
            else None
        kwargs = {"text": text, "text_drop": drop} if text is not None else {}
        logits = model(interpolate(x0, eps, t), t, y, **kwargs)
    return F.cross_entropy(logits.float(), k)


def holdout_ids(n: int, holdout: int, seed: int) -> np.ndarray:
    """The positions (ascending) of a seeded random subset of ``holdout`` of ``n`` samples, held out of training."""
    if holdout >= n:
        raise ConfigError(f"eval.holdout={holdout} leaves no training data: only {n} clustered samples")
    return np.sort(np.random.default_rng([seed, 7919]).permutation(n)[:holdout])


def split_holdout(keys: Sequence[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """(train keys, held-out keys): a seeded random subset of ``holdout`` keys is held out."""
    held = set(holdout_ids(len(keys), holdout, seed).tolist())
    return ([k for i, k in enumerate(keys) if i not in held], [k for i, k in enumerate(keys) if i in held])


@torch.no_grad()
def accuracy_vs_t(model: nn.Module, images: torch.Tensor, clusters: torch.Tensor, cfg: RouterEvalConfig,
                  seed: int, device: torch.device, labels: torch.Tensor | None = None,
                  text: torch.Tensor | None = None) -> dict[str, Any]:
    """Top-1 accuracy per equal-width t-bin on (images (N, C, H, W), clusters (N,)); t uniform within each bin.
    With ``labels`` (N,) and/or ``text`` (N, D) pooled captions (a conditional router) each bin is scored with
    them (``accuracy``) and with the null label / caption (``accuracy_unconditional``) on the same noisy images."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    rows = []
    for b in range(cfg.bins):
        lo, hi = b / cfg.bins, (b + 1) / cfg.bins
        correct, correct_marginal, total = 0, 0, 0
        for _ in range(cfg.draws):
            for start in range(0, images.shape[0], cfg.batch_size):
                x0 = images[start : start + cfg.batch_size]  # (b, C, H, W)
                truth = clusters[start : start + cfg.batch_size]  # (b,)
                t = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)  # (b,)
                eps = torch.randn(x0.shape, generator=gen)
                x_t, t_dev = interpolate(x0, eps, t).to(device), t.to(device)
                if labels is None and text is None:
                    logits = model(x_t, t_dev)  # (b, K)
                else:
                    y = labels[start : start + cfg.batch_size].to(device) if labels is not None else None
                    kwargs = {"text": text[start : start + cfg.batch_size].to(device)} if text is not None else {}
                    logits = model(x_t, t_dev, y, **kwargs)
                    correct_marginal += int((model(x_t, t_dev).argmax(-1).cpu() == truth).sum())
                correct += int((logits.argmax(-1).cpu() == truth).sum())
                total += x0.shape[0]
        row = {"t_lo": lo, "t_hi": hi, "accuracy": correct / total, "n": total}
        if labels is not None or text is not None:
            row["accuracy_unconditional"] = correct_marginal / total
        rows.append(row)
    K = int(getattr(model, "num_clusters"))
    counts = torch.bincount(clusters, minlength=K).double()
    return {"bins": rows, "num_clusters": K, "chance": 1.0 / K, "majority": float(counts.max() / counts.sum()),
            "holdout": int(images.shape[0])}


def plot_accuracy(result: dict[str, Any]) -> bytes:
    """PNG of accuracy against t, with chance and majority-share lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mids = [(r["t_lo"] + r["t_hi"]) / 2 for r in result["bins"]]
    acc = [r["accuracy"] for r in result["bins"]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    conditional = "accuracy_unconditional" in result["bins"][0]
    ax.plot(mids, acc, marker="o", label="router top-1, with the condition" if conditional else "router top-1")
    if conditional:
        ax.plot(mids, [r["accuracy_unconditional"] for r in result["bins"]], marker="s",
                label="router top-1, null label / caption (no condition)")
    ax.axhline(result["chance"], color="gray", linestyle="--", label=f"chance 1/K = {result['chance']:.3f}")
    ax.axhline(result["majority"], color="gray", linestyle=":", label=f"majority share = {result['majority']:.3f}")
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("held-out top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"router, K={result['num_clusters']}, {result['holdout']} held-out images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_accuracy(result: dict[str, Any]) -> str:
    lines = [f"router held-out top-1 accuracy vs t (K={result['num_clusters']}, chance={result['chance']:.3f}, "
             f"majority={result['majority']:.3f}, n={result['holdout']})"]
    if "accuracy_unconditional" in result["bins"][0]:
        lines[0] += "; with the condition (label / caption) / without"
        lines += [f"  t in [{r['t_lo']:.2f}, {r['t_hi']:.2f}): {r['accuracy']:.3f} / {r['accuracy_unconditional']:.3f}"
                  for r in result["bins"]]
        return "\n".join(lines)
    lines += [f"  t in [{r['t_lo']:.2f}, {r['t_hi']:.2f}): {r['accuracy']:.3f}" for r in result["bins"]]
    return "\n".join(lines)


def load_router(store: Store, device: str | torch.device = "cpu", use_ema: bool | None = None) -> Router:
    """The committed router (EMA weights unless the stage config said otherwise); MissingArtifactError if absent."""
    final = load_final(store, layout.ROUTER, map_location="cpu")
    spec = final.config.get("model") or {}
    try:
        classes = spec.get("num_classes")
        text_dim = spec.get("text_dim")
        router = build_router_from_spec(RouterSpec(spec["preset"], int(spec["image_size"]), int(spec["channels"]),
                                                   int(spec["num_clusters"]),
                                                   int(classes) if classes is not None else None,
                                                   int(text_dim) if text_dim is not None else None))
    except KeyError as e:
        raise DataError(f"{store.url(layout.final(layout.ROUTER))}/config.json lacks model.{e.args[0]}") from None
    if use_ema is None:
        use_ema = bool((final.config.get("stage") or {}).get("use_ema", True))
    router.load_state_dict(final.ema if use_ema else final.model)
    return router.to(device).eval()


def run(cfg: RouterConfig) -> dict[str, Any] | None:
    from ..clustering import load_assignments
    from ..grown_data import open_run_data
    from ..progress import Reporter
    from ..runtime import setup_runtime
    from ..store import open_store
    from ..train_loop import Trainer

    store = open_store(cfg.run_uri)
    assignments = load_assignments(store)
    if int(assignments.num_clusters) != cfg.num_clusters:
        raise ConfigError(f"num_clusters={cfg.num_clusters} but the clustering at {store.url(layout.CLUSTERING)} "
                          f"has {assignments.num_clusters} clusters")
    if cfg.num_classes is not None and not cfg.data.class_field:
        raise ConfigError("num_classes is set (a class-conditional router) but data.class_field is not: "
                          "the router would have no labels to condition on")
    rt = setup_runtime(cfg.device, deterministic=cfg.train.deterministic)
    size, channels = cfg.data.image_size, cfg.data.channels
    shards: Any = None
    if cfg.latents or cfg.text_dim is not None:
        # the VAE latents (of the image or its flip, as the experts see them) and the pooled caption embeddings
        # live in the cluster shards: stream them shard by shard, as the experts do, never all at once
        from ..cluster_shards import open_all_shards

        shards = open_all_shards(store, cfg.data, cfg.text_dim, latents=cfg.latents)
        cluster_of = dict(zip(assignments.keys, assignments.cluster.tolist()))
        held_ids = holdout_ids(len(shards), cfg.eval.holdout, cfg.seed) if cfg.eval.holdout else np.zeros(0, int)
        stream = shards.stream(cfg.train.batch_size, cfg.seed, rt.rank, rt.world_size, prefetch=cfg.train.prefetch,
                               workers=cfg.data.workers, skip=held_ids)
        if shards.latent is not None:
            size, channels = int(shards.latent["size"]), int(shards.latent["channels"])
    else:
        # a grown run's router learns every cluster, old and new: it trains on every generation's data (grown_data)
        source, cluster_of, _ = open_run_data(store, cfg.data)
        train_keys, held_keys = split_holdout(list(cluster_of), cfg.eval.holdout, cfg.seed)
        stream = source.stream(cfg.train.batch_size, cfg.seed, rt.rank, rt.world_size, keys=train_keys,
                               prefetch=cfg.train.prefetch)
    spec = RouterSpec(cfg.preset, size, channels, cfg.num_clusters, cfg.num_classes, cfg.text_dim)
    model = build_router_from_spec(spec)
    reporter = Reporter("router", None, cfg.train.steps, store) if rt.is_main else None

    def loss_fn(m: nn.Module, batch: Any, gen: torch.Generator) -> torch.Tensor:
        return router_loss(m, batch, gen, cfg.t_dist, cfg.num_classes, cfg.label_dropout)

    trainer = Trainer(model, loss_fn, ClusterStream(stream, cluster_of, cfg.num_classes is not None,
                                                    cfg.text_dim is not None), store,
                      layout.ROUTER, cfg.train, reporter, seed=cfg.seed, runtime=rt,
                      stage_config=cfg.model_dump(mode="json"), model_spec=spec.as_dict())
    losses = trainer.fit()
    if not rt.is_main or not cfg.eval.holdout:
        if reporter:
            reporter.close(loss=losses[-1] if losses else None)
        return None
    held = shards.load_ids(held_ids) if shards is not None else source.load(held_keys)  # unflipped latents
    clusters = torch.tensor([cluster_of[k] for k in held.keys], dtype=torch.long)
    labels = None
    if cfg.num_classes is not None:
        if held.labels is None:
            raise DataError(f"a class-conditional router needs labels ({cfg.data.class_field!r}) on held-out data")
        labels = held.labels
    text = held.text_pooled if cfg.text_dim is not None else None
    result = accuracy_vs_t(trainer.ema if cfg.use_ema else trainer.model, held.images, clusters, cfg.eval,
                           cfg.seed, rt.device, labels, text)
    result["use_ema"] = cfg.use_ema
    result["steps"] = trainer.step
    store.commit(EVAL_DIR, {"accuracy.json": json.dumps(result, indent=2).encode(),
                            "accuracy_vs_t.png": plot_accuracy(result)},
                 meta={"accuracy_first_bin": result["bins"][0]["accuracy"],
                       "accuracy_last_bin": result["bins"][-1]["accuracy"],
                       "accuracy_last_bin_unconditional": result["bins"][-1].get("accuracy_unconditional")})
    print(format_accuracy(result), flush=True)
    if reporter:
        reporter.close(loss=losses[-1] if losses else None, accuracy_first_bin=result["bins"][0]["accuracy"],
                       accuracy_last_bin=result["bins"][-1]["accuracy"])
    return result
