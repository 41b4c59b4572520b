"""The cluster stage: encode every sample (image features; caption embeddings and VAE latents when the run has a
text encoder or a VAE), spread over the stage's processes and committed part by part under ``<run>/encode``
(``encode``); then, on rank 0, cluster, commit assignments under ``<run>/clustering``, and write each cluster's
samples (with their stored embeddings and latents) as shards of their own under ``<run>/clustering/shards``
(``cluster_shards``), committed apart.

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
from ..clustering import (ASSIGNMENTS, CENTROIDS, CONFIG, EXAMPLES, Assignments, Clustering, class_counts,
                          examples_grid, hierarchical_kmeans, load_assignments, nmi, random_partition)
from ..configs.cluster import ClusterConfig
from ..data import Source, open_source
from ..encode import Encoders, Parts, encode_parts
from ..encoders import Encoder, build_encoder
from ..growth import grow_kmeans, grow_random, growth_meta, open_parent
from ..progress import Reporter
from ..runtime import barrier, setup_runtime, shutdown
from ..store import Store, open_store


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


def text_model(cfg: ClusterConfig, device: torch.device) -> tuple[dict[str, Any], Any] | None:
    """(meta, captions -> (tokens, mask, pooled)) of the run's text encoder, loaded and checked against
    text_encoder.width (a missing model or another width stops here, before anything is read or written)."""
    if cfg.text_encoder is None:
        return None
    from ..text import TextEncoder

    te = cfg.text_encoder
    model = TextEncoder(te.uri, device, te.max_tokens, expect_dim=te.width, kind=te.kind)

    def encode(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = model.encode(captions)
        return out.tokens.numpy(), out.mask.numpy(), out.pooled.numpy()

    return te.model_dump(mode="json"), encode


def latent_model(cfg: ClusterConfig, device: torch.device) -> tuple[dict[str, Any], Any] | None:
    """(meta, images -> (latents, flipped latents)) of the run's VAE (a path that holds none stops here, before
    anything is read or written)."""
    if cfg.vae is None:
        return None
    from ..vae import Vae

    vae = Vae(cfg.vae.uri, device, cfg.vae.scaling_factor, cfg.vae.shift_factor)
    shape = vae.shape(cfg.data.image_size)

    def encode(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return vae.encode(images).cpu().numpy(), vae.encode(images.flip(-1)).cpu().numpy()

    return {"channels": shape.channels, "size": shape.size, "vae": vae.meta(), "image_size": cfg.data.image_size,
            "image_channels": cfg.data.channels}, encode


def encoders_of(cfg: ClusterConfig, encoder: Encoder | None, text: tuple[dict[str, Any], Any] | None,
                latents: tuple[dict[str, Any], Any] | None) -> Encoders:
    """The encode step's encoders, and the config that decides its parts (a part made otherwise is redone)."""
    config = {"data": cfg.data.model_dump(mode="json", exclude={"workers"}), "batch": cfg.embed_batch_size,
              "part": cfg.encode_part_size,
              "encoder": [cfg.encoder, cfg.encoder_weights, cfg.encoder_resolution] if encoder else None,
              "text": text[0] if text else None, "latents": latents[0] if latents else None}

    def features(images: torch.Tensor) -> np.ndarray:
        assert encoder is not None
        return encoder.embed(images, cfg.embed_batch_size)

    return Encoders(features if encoder is not None else None, text[1] if text else None,
                    latents[1] if latents else None, cfg.embed_batch_size, cfg.encode_part_size, config)


def stored_encodings(parts: Parts, text: tuple[dict[str, Any], Any] | None,
                     latents: tuple[dict[str, Any], Any] | None) -> tuple[CaptionEncoding | None,
                                                                           LatentEncoding | None]:
    """What the cluster shards store beside each image, read back from the committed encode parts."""
    caption = CaptionEncoding(text[0], lambda a, b: parts.rows(("tokens", "mask", "pooled"), a, b)) if text else None
    latent = LatentEncoding(latents[0], lambda a, b: parts.rows(("latents", "latents_flip"), a, b)) \
        if latents else None
    return caption, latent


def _shards_current(store: Store, cfg: ClusterConfig, latents: tuple[dict[str, Any], Any] | None) -> bool:
    """Committed shards that hold what this config asks (the same captions and text encoder, the same latents, or
    none)."""
    index = load_shard_index(store)
    if index is None:
        return False
    want = cfg.text_encoder.model_dump(mode="json") if cfg.text_encoder is not None else None
    return index.text == want and (want is None or index.caption_field == cfg.data.caption_field) \
        and index.latent == (latents[0] if latents is not None else None)


def run(cfg: ClusterConfig) -> dict[str, Any]:
    """Under torchrun every rank encodes its share of the parts (``encode``); rank 0 then clusters and writes the
    cluster shards alone, the other ranks return once their parts are committed."""
    rt = setup_runtime(cfg.device)
    store = open_store(cfg.run_uri)
    # the text encoder and the VAE change the shards only: new ones rewrite them and keep the clustering (the part
    # size changes nothing)
    config = cfg.model_dump(mode="json", exclude={"data": {"workers"}, "text_encoder": True, "vae": True,
                                                  "encode_part_size": True})
    if cfg.growth is None:
        config.pop("growth")  # a run clustered before growth existed keeps its committed clustering
    encoder = None
    if cfg.method == "kmeans":  # an unknown encoder or missing weights fails before any data is read or written
        encoder = build_encoder(cfg.encoder, cfg.encoder_weights, rt.device, cfg.encoder_resolution, cfg.data.channels)
    text, latents = text_model(cfg, rt.device), latent_model(cfg, rt.device)
    previous = store.read_manifest(layout.CLUSTERING)
    if previous is not None and previous.get("config") == config:
        if _shards_current(store, cfg, latents):
            if rt.is_main:
                print(f"cluster: {store.url(layout.CLUSTERING)} already committed with this config; nothing to do",
                      file=sys.stderr)
            shutdown(rt)
            return previous
        encoder = None  # only the shards are missing: the parts need no features
    parent = open_parent(cfg) if cfg.growth is not None else None  # a grown run (growth.py): checked first
    source = open_source(cfg.data, store)
    keys = source.keys()
    if text is not None:
        source.captions()  # a caption field the data lacks stops here, before anything is committed
    reporter = Reporter("cluster", None, len(keys), store) if rt.is_main else None
    encoders = encoders_of(cfg, encoder, text, latents)
    encode_parts(store, source, keys, encoders, rt.rank, rt.world_size, reporter)
    barrier(rt)  # every part is committed
    shutdown(rt)
    if not rt.is_main:
        return {}
    assert reporter is not None
    parts = Parts(store, keys, encoders)
    caption, latent = stored_encodings(parts, text, latents)
    if previous is not None and previous.get("config") == config:  # the clustering stands; its shards were missing
        assignments = load_assignments(store)
        _write_shards(store, source, assignments, reporter, caption, latent)
        reporter.close(step=len(assignments.keys), num_clusters=cfg.num_clusters, sizes=assignments.sizes,
                       nmi=previous.get("nmi"))
        return previous

    if encoder is not None:
        features = parts.features()  # (N, F), in the source's order
        kmeans_device = str(rt.device) if rt.device.type == "cuda" else None  # torch k-means on the GPU, else faiss
        reporter.event("progress", step=len(keys), phase="kmeans")
        if parent is not None:
            result = grow_kmeans(features, parent, cfg, kmeans_device)
        else:
            result = hierarchical_kmeans(features, cfg.num_clusters, cfg.fine_clusters, cfg.seed, cfg.kmeans_iters,
                                         cfg.max_cluster_fraction, kmeans_device)
    else:
        cluster = random_partition(len(keys), cfg.num_clusters, cfg.seed) if parent is None \
            else grow_random(len(keys), parent, cfg)
        empty = np.zeros((0, 0), dtype=np.float32)
        result = Clustering(cluster, np.full(len(keys), -1, dtype=np.int64), empty, empty,
                            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)

    sizes = np.bincount(result.cluster, minlength=cfg.num_clusters).tolist()
    labels = source.labels()
    score, counts = None, None
    if labels is not None:
        label_of = np.asarray([labels[k] for k in keys], dtype=np.int64)
        score = nmi(label_of, result.cluster)
        # p(k | y) for the oracle strategy (clustering.mixture_counts)
        counts = class_counts(result.cluster, label_of, cfg.num_clusters,
                              source.num_classes or int(label_of.max()) + 1).tolist()
    meta = {"num_clusters": cfg.num_clusters, "sizes": sizes, "num_samples": len(keys), "method": cfg.method,
            "encoder": cfg.encoder if encoder is not None else None, "fine_clusters_used": result.fine_used,
            "nmi": score, "class_counts": counts, "config": config}
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
    _write_shards(store, source, Assignments(keys, result.cluster, cfg.num_clusters, sizes, manifest), reporter,
                  caption, latent)
    reporter.close(step=len(keys), num_clusters=cfg.num_clusters, sizes=sizes, nmi=score)
    print(f"cluster: {cfg.num_clusters} clusters of {len(keys)} samples, sizes {sizes}"
          + (f", NMI with classes {score:.3f}" if score is not None else ""), file=sys.stderr)
    return manifest
