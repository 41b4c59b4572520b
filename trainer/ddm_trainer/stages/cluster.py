"""The cluster stage: embed every sample, cluster, commit assignments under ``<run>/clustering``, then write each
cluster's samples as shards of their own under ``<run>/clustering/shards`` (``cluster_shards``), committed apart.

Runs at least once safely: a committed clustering with the same config is kept as is; only its shards are written
when they are missing (a run clustered before shards existed, or killed while writing them); with both committed
a re-run is a no-op. ``data.workers`` is not part of the config compared: it does not change the result.
"""
from __future__ import annotations

import io
import json
import sys
from typing import Any, Sequence

import numpy as np
import torch

from .. import layout
from ..cluster_shards import CaptionEncoding, LatentEncoding, load_shard_index, write_cluster_shards
from ..clustering import (ASSIGNMENTS, CENTROIDS, CONFIG, EXAMPLES, Assignments, Clustering, examples_grid,
                          hierarchical_kmeans, import_faiss, load_assignments, nmi, random_partition)
from ..configs.cluster import ClusterConfig
from ..data import Source, open_source
from ..encoders import Encoder, build_encoder, resolve_device
from ..growth import grow_kmeans, grow_random, growth_meta, open_parent
from ..progress import Reporter
from ..store import Store, open_store


def _embed(source: Source, keys: list[str], encoder: Encoder, batch_size: int, reporter: Reporter) -> np.ndarray:
    chunks = []
    for start in range(0, len(keys), batch_size):
        batch = source.load(keys[start : start + batch_size])
        chunks.append(encoder.embed(batch.images, batch_size))  # (B, D)
        reporter.update(min(start + batch_size, len(keys)), phase="embed")
    return np.concatenate(chunks)  # (N, D)


def _examples(source: Source, keys: list[str], cluster: np.ndarray, k: int, per_cluster: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        picked = rng.choice(members, size=min(per_cluster, len(members)), replace=False) if len(members) else []
        images = source.load([keys[i] for i in sorted(picked)]).images if len(picked) else torch.zeros(0)
        rows.append([((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy() for img in images])
    if not any(rows):
        return b""
    return examples_grid(rows)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _write_shards(store: Store, source: Source, assignments: Assignments, reporter: Reporter,
                  text: CaptionEncoding | None, latents: LatentEncoding | None = None) -> None:
    manifest = write_cluster_shards(store, source, assignments, reporter, text, latents)
    print(f"cluster: {manifest['num_shards']} shards of up to {manifest['samples_per_shard']} samples at "
          f"{store.url(layout.CLUSTER_SHARDS)}" + (f", with caption embeddings of {text.meta['uri']}" if text else ""),
          file=sys.stderr)


def caption_encoding(cfg: ClusterConfig) -> CaptionEncoding | None:
    """The run's text encoder, loaded and checked against text_encoder.width (a missing model or another width
    stops here, before anything is read or written)."""
    if cfg.text_encoder is None:
        return None
    from ..text import TextEncoder

    te = cfg.text_encoder
    model = TextEncoder(te.uri, resolve_device(cfg.device), te.max_tokens, expect_dim=te.width, kind=te.kind)

    def encode(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = model.encode(captions)
        return out.tokens.numpy(), out.mask.numpy(), out.pooled.numpy()

    return CaptionEncoding(te.model_dump(mode="json"), encode)


def latent_encoding(cfg: ClusterConfig) -> LatentEncoding | None:
    """The run's VAE, loaded (a path that holds none stops here, before anything is read or written)."""
    if cfg.vae is None:
        return None
    from ..vae import Vae

    vae = Vae(cfg.vae.uri, resolve_device(cfg.device), cfg.vae.scaling_factor, cfg.vae.shift_factor)
    shape = vae.shape(cfg.data.image_size)

    def encode(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return vae.encode(images).cpu().numpy(), vae.encode(images.flip(-1)).cpu().numpy()

    return LatentEncoding({"channels": shape.channels, "size": shape.size, "vae": vae.meta(),
                           "image_size": cfg.data.image_size, "image_channels": cfg.data.channels}, encode)


def _shards_current(store: Store, cfg: ClusterConfig, latents: LatentEncoding | None) -> bool:
    """Committed shards that hold what this config asks (the same captions and text encoder, the same latents, or
    none)."""
    index = load_shard_index(store)
    if index is None:
        return False
    want = cfg.text_encoder.model_dump(mode="json") if cfg.text_encoder is not None else None
    return index.text == want and (want is None or index.caption_field == cfg.data.caption_field) \
        and index.latent == (latents.meta if latents is not None else None)


def run(cfg: ClusterConfig) -> dict[str, Any]:
    store = open_store(cfg.run_uri)
    # the text encoder changes the shards only: a new one rewrites them and keeps the clustering
    config = cfg.model_dump(mode="json", exclude={"data": {"workers"}, "text_encoder": True, "vae": True})
    if cfg.growth is None:
        config.pop("growth")  # a run clustered before growth existed keeps its committed clustering
    encoder = None
    if cfg.method == "kmeans":  # an unknown encoder or missing weights fails before any data is read or written
        encoder = build_encoder(cfg.encoder, cfg.encoder_weights, cfg.device, cfg.encoder_resolution, cfg.data.channels)
    text = caption_encoding(cfg)
    latents = latent_encoding(cfg)
    previous = store.read_manifest(layout.CLUSTERING)
    if previous is not None and previous.get("config") == config:
        if _shards_current(store, cfg, latents):
            print(f"cluster: {store.url(layout.CLUSTERING)} already committed with this config; nothing to do",
                  file=sys.stderr)
            return previous
        assignments = load_assignments(store)
        reporter = Reporter("cluster", None, len(assignments.keys), store)
        _write_shards(store, open_source(cfg.data, store), assignments, reporter, text, latents)
        reporter.close(step=len(assignments.keys), num_clusters=cfg.num_clusters, sizes=assignments.sizes,
                       nmi=previous.get("nmi"))
        return previous

    parent = open_parent(cfg) if cfg.growth is not None else None  # a grown run (growth.py): checked first
    source = open_source(cfg.data, store)
    keys = source.keys()
    if text is not None:
        source.captions()  # a caption field the data lacks stops here, before anything is committed
    reporter = Reporter("cluster", None, len(keys), store)
    if encoder is not None:
        features = _embed(source, keys, encoder, cfg.embed_batch_size, reporter)
        use_gpu = import_faiss().get_num_gpus() > 0 and resolve_device(cfg.device).type == "cuda"
        reporter.event("progress", step=len(keys), phase="kmeans")
        if parent is not None:
            result = grow_kmeans(features, parent, cfg, use_gpu)
        else:
            result = hierarchical_kmeans(features, cfg.num_clusters, cfg.fine_clusters, cfg.seed, cfg.kmeans_iters,
                                         cfg.max_cluster_fraction, use_gpu)
    else:
        cluster = random_partition(len(keys), cfg.num_clusters, cfg.seed) if parent is None \
            else grow_random(len(keys), parent, cfg)
        empty = np.zeros((0, 0), dtype=np.float32)
        result = Clustering(cluster, np.full(len(keys), -1, dtype=np.int64), empty, empty,
                            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)

    sizes = np.bincount(result.cluster, minlength=cfg.num_clusters).tolist()
    labels = source.labels()
    score = None
    if labels is not None:
        score = nmi(np.asarray([labels[k] for k in keys]), result.cluster)
    meta = {"num_clusters": cfg.num_clusters, "sizes": sizes, "num_samples": len(keys), "method": cfg.method,
            "encoder": cfg.encoder if encoder is not None else None, "fine_clusters_used": result.fine_used,
            "nmi": score, "config": config}
    if parent is not None:
        meta.update(growth_meta(parent, cfg, sizes))
    files = {
        ASSIGNMENTS: _npz(keys=np.asarray(keys), cluster=result.cluster, fine=result.fine),
        CENTROIDS: _npz(fine=result.fine_centroids, coarse=result.coarse_centroids,
                        fine_to_coarse=result.fine_to_coarse, fine_counts=result.fine_counts),
        CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
    }
    if cfg.examples_per_cluster:
        grid = _examples(source, keys, result.cluster, cfg.num_clusters, cfg.examples_per_cluster, cfg.seed)
        if grid:
            files[EXAMPLES] = grid
    store.delete_prefix(layout.CLUSTERING)  # an old clustering with another config must not mix with this one
    manifest = store.commit(layout.CLUSTERING, files, meta)
    _write_shards(store, source, Assignments(keys, result.cluster, cfg.num_clusters, sizes, manifest), reporter, text,
                  latents)
    reporter.close(step=len(keys), num_clusters=cfg.num_clusters, sizes=sizes, nmi=score)
    print(f"cluster: {cfg.num_clusters} clusters of {len(keys)} samples, sizes {sizes}"
          + (f", NMI with classes {score:.3f}" if score is not None else ""), file=sys.stderr)
    return manifest
