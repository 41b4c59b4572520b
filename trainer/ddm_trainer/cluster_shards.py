"""Each cluster's samples as shards of their own in the run store, and the stream an expert reads them with.

Written by the cluster stage once its assignments are committed (``write_cluster_shards``): cluster k's samples, in
the dataset's order, go to ``clustering/shards/<k>/<k>-<j>.tar`` (the image bytes as they were stored, the class
as ``<key>.<class_field>``; in a text-conditioned run also the caption as ``<key>.<caption_field>``, its token
embeddings as ``<key>.temb`` (an .npy of float16 (l, D), the caption's l real tokens) and its sentence embedding as
``<key>.tpool`` (float16 (D,)); in a latent-space run the image's VAE latent as ``<key>.lat`` and its horizontal
flip's as ``<key>.latf`` (float16 (c, h, w) .npy, as DiT's feature extraction keeps both); embeddings and latents
as the encode step computed them once, ``encode``); then ``index.json`` names every shard with its sample count,
size and sha256 (and the text encoder and VAE that made the embeddings and latents); then the manifest. Shards hold
at most SHARD_SAMPLES samples and about SHARD_BYTES; a cluster of >= 8 samples gets a multiple of 8 near-equal
shards, so 1, 2, 4 or 8 ranks each own whole shards of equal sample counts.

Read by the expert stage (``open_cluster_shards(...).stream(...)``), which then never opens the whole dataset (and
by the router, student and baseline of latent / text runs through ``open_all_shards``, every cluster's shards):
- rank r of W owns shards r, r+W, ... when W divides the shard count and reads no other; otherwise every rank
  reads the cluster's shards and takes every W-th sample (as ``data.Stream`` does). Every rank takes the same
  number of samples per epoch (the smallest rank's), so data-parallel ranks take the same number of steps.
- epoch e permutes the rank's shards by (seed, e) and cuts them into windows of shards that fit in a third of
  ``DDM_DATA_CACHE_BYTES``; samples are shuffled within a window. A cluster that fits is one window: a full
  shuffle, fetched once and kept. Otherwise shards are fetched when the plan reaches their window, the next
  window in background threads, and at most three windows are held (the one or two a batch spans, the next).
- images are decoded in worker processes (``workers``), ``prefetch`` batches beyond those in flight. The order
  of batches is planned from (seed, epoch, pos) alone, and each batch travels with the position after it, so
  ``state_dict()`` is the position after the last batch handed out however far the workers have decoded ahead:
  N steps + save + resume + N steps gives the batches of 2N steps.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import queue
import sys
import tarfile
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import layout
from .clustering import Assignments
from .configs.common import DataConfig
from .data import IMAGE_EXTS, ImageBatch, Source, _cache_budget, put_until_stopped, tar_members
from .decode import decode_batch, ignore_stop_signals
from .errors import ConfigError, DataError, MissingArtifactError
from .progress import Reporter
from .store import Store

INDEX = "index.json"  # {"data_uri", "class_field", "labeled", "num_classes", "caption_field", "text",
#                        "clusters": [{"shards": [ShardInfo]}]}
TEXT_TOKENS, TEXT_POOLED = "temb", "tpool"  # the extensions of a sample's caption embeddings
LATENT, LATENT_FLIP = "lat", "latf"  # its VAE latent and the latent of its horizontal flip
TEXT_BATCH = 256  # samples whose stored embeddings / latents are fetched at once while writing
SHARD_SAMPLES = 4096
SHARD_BYTES = 128 << 20
MIN_SHARD_BYTES = 16 << 20
SHARD_MULTIPLE = 8
TAR_OVERHEAD = 1024 + 512  # per sample: two 512-byte headers, half a block of padding each
READER = "cluster-shards"  # names this stream's positions in checkpoints, apart from data.Stream's


@dataclass(frozen=True)
class ShardInfo:
    key: str  # under the run store
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    data_uri: str  # the cluster stage's data.uri
    class_field: str | None  # its data.class_field
    labeled: bool  # whether the samples had that field (written beside each image)
    num_classes: int | None
    clusters: list[list[ShardInfo]]
    caption_field: str | None = None  # its data.caption_field, when captions were stored
    text: dict[str, Any] | None = None  # the text encoder of the stored embeddings: kind, uri, width, max_tokens
    latent: dict[str, Any] | None = None  # the stored latents: channels, size, and the VAE (uri, factors)


@dataclass
class LatentEncoding:
    """The images' latents the shards store: ``meta`` (channels, size, vae) goes into the index; ``encode(start,
    stop)`` gives those of samples [start, stop) (latents, latents of the flipped images: (B, c, h, w) arrays)."""

    meta: dict[str, Any]
    encode: Callable[[int, int], list[np.ndarray]]


@dataclass
class CaptionEncoding:
    """The captions' embeddings the shards store: ``meta`` (kind, uri, width, max_tokens of the text encoder) goes
    into the index; ``encode(start, stop)`` gives those of samples [start, stop) of the source's order (tokens
    (B, L, D), mask (B, L), pooled (B, D) numpy arrays: the encode step's, ``encode.Parts``)."""

    meta: dict[str, Any]
    encode: Callable[[int, int], list[np.ndarray]]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# -- writing -------------------------------------------------------------------------------------------------------
def shard_sizes(num_samples: int, samples_per_shard: int) -> list[int]:
    """Sample counts of one cluster's shards: near-equal, a multiple of SHARD_MULTIPLE of them when possible."""
    if num_samples == 0:
        return []
    count = -(-num_samples // samples_per_shard)
    count = min(num_samples, -(-count // SHARD_MULTIPLE) * SHARD_MULTIPLE)
    return [num_samples // count + (1 if j < num_samples % count else 0) for j in range(count)]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0  # the same samples give the same bytes
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_cluster_shards(store: Store, source: Source, assignments: Assignments,
                         reporter: Reporter | None = None, text: CaptionEncoding | None = None,
                         latents: LatentEncoding | None = None) -> dict[str, Any]:
    """Write every cluster's shards, then commit their index; returns the manifest.

    One pass over ``source`` in its order; each cluster fills one shard at a time, so at most one shard per
    cluster is held in memory (shards are smaller when many clusters would not fit the cache budget together).
    ``text``: store each sample's caption and its embeddings; ``latents``: each image's VAE latents, its flip's too
    (both as the encode step made them, TEXT_BATCH samples at a time).
    """
    keys = source.keys()
    if keys != assignments.keys:
        raise DataError(f"data.uri {source.cfg.uri} now holds other samples than when it was clustered ({len(keys)} vs "
                        f"{len(assignments.keys)} keys); re-cluster it under a new run_uri")
    labels = source.labels()
    captions = source.captions() if text is not None else None  # a sample without one stops here, nothing written
    batch = TEXT_BATCH  # divides encode.PART: a batch never spans two encode parts
    probe = keys[:256]
    sample_bytes = sum(len(source.encoded(k)[1]) for k in probe) // len(probe) + TAR_OVERHEAD
    if text is not None:  # tokens and pooled vector in float16, the caption, three more members
        sample_bytes += 2 * int(text.meta["width"]) * (int(text.meta["max_tokens"]) + 1) + 128 + 3 * TAR_OVERHEAD
    if latents is not None:  # two float16 latents
        m = latents.meta
        sample_bytes += 2 * (2 * int(m["channels"]) * int(m["size"]) ** 2 + 128 + TAR_OVERHEAD)
    target_bytes = min(SHARD_BYTES, max(MIN_SHARD_BYTES, _cache_budget() // assignments.num_clusters))
    per_shard = max(1, min(SHARD_SAMPLES, target_bytes // sample_bytes))
    sizes = [shard_sizes(n, per_shard) for n in assignments.sizes]

    store.delete_prefix(layout.CLUSTER_SHARDS)  # a shard plan killed half-way must not mix with this one
    pending: list[list[tuple[str, bytes]]] = [[] for _ in sizes]  # the tar members of each cluster's next shard
    filled = [0 for _ in sizes]  # samples in it
    written: list[list[ShardInfo]] = [[] for _ in sizes]
    embedded: list[np.ndarray] | None = None  # the current TEXT_BATCH's embeddings
    encoded: list[np.ndarray] | None = None  # and its latents
    for i, (key, k) in enumerate(zip(keys, assignments.cluster.tolist())):
        ext, image = source.encoded(key)
        pending[k].append((f"{key}.{ext}", image))
        if labels is not None:
            pending[k].append((f"{key}.{source.cfg.class_field}", str(labels[key]).encode()))
        if text is not None and captions is not None:
            if i % batch == 0:
                embedded = text.encode(i, min(i + batch, len(keys)))
            assert embedded is not None
            tokens, mask, pooled = embedded
            j = i % batch
            pending[k].append((f"{key}.{source.cfg.caption_field}", captions[i].encode()))
            pending[k].append((f"{key}.{TEXT_TOKENS}", _npy(tokens[j][mask[j]].astype(np.float16))))  # (l, D)
            pending[k].append((f"{key}.{TEXT_POOLED}", _npy(pooled[j].astype(np.float16))))  # (D,)
        if latents is not None:
            if i % batch == 0:
                encoded = latents.encode(i, min(i + batch, len(keys)))
            assert encoded is not None
            j = i % batch
            pending[k].append((f"{key}.{LATENT}", _npy(encoded[0][j].astype(np.float16))))  # (c, h, w)
            pending[k].append((f"{key}.{LATENT_FLIP}", _npy(encoded[1][j].astype(np.float16))))
        filled[k] += 1
        if filled[k] == sizes[k][len(written[k])]:
            shard_key = layout.cluster_shard(k, len(written[k]))
            data = _tar(pending[k])
            store.put_bytes(shard_key, data)
            written[k].append(ShardInfo(shard_key, filled[k], len(data), hashlib.sha256(data).hexdigest()))
            pending[k], filled[k] = [], 0
            if reporter is not None:
                reporter.update(i + 1, phase="shards")
    index = {"data_uri": source.cfg.uri, "class_field": source.cfg.class_field, "labeled": labels is not None,
             "num_classes": source.num_classes,
             "caption_field": source.cfg.caption_field if text is not None else None,
             "text": text.meta if text is not None else None,
             "latent": latents.meta if latents is not None else None,
             "clusters": [{"num_samples": sum(s.samples for s in shards), "shards": [asdict(s) for s in shards]}
                          for shards in written]}
    return store.commit(layout.CLUSTER_SHARDS, {INDEX: json.dumps(index, indent=1).encode()},
                        {"num_clusters": len(written), "num_shards": sum(len(s) for s in written),
                         "samples_per_shard": per_shard})


# -- reading -------------------------------------------------------------------------------------------------------
def load_shard_index(store: Store) -> ShardIndex | None:
    """The committed per-cluster shard index, or None when the run has none (clustered before shards existed)."""
    if store.read_manifest(layout.CLUSTER_SHARDS) is None:
        return None
    raw = json.loads(store.read_committed(layout.CLUSTER_SHARDS, INDEX))
    return ShardIndex(raw["data_uri"], raw["class_field"], raw["labeled"], raw["num_classes"],
                      [[ShardInfo(**s) for s in c["shards"]] for c in raw["clusters"]],
                      raw.get("caption_field"), raw.get("text"), raw.get("latent"))


def _check_text(store: Store, index: ShardIndex, text_dim: int | None) -> dict[str, Any] | None:
    """The stored embeddings' text encoder when the reader is text-conditioned (``text_dim``), checked: the shards
    must hold caption embeddings of that width."""
    if text_dim is None:
        return None
    if index.text is None:
        raise DataError(f"text_dim={text_dim} (a text-conditioned model) but the cluster shards at "
                        f"{store.url(layout.CLUSTER_SHARDS)} hold no caption embeddings: give the cluster stage a "
                        f"text_encoder (spec.textEncoder) and data.caption_field")
    if int(index.text["width"]) != text_dim:
        raise ConfigError(f"text_dim={text_dim} but the caption embeddings at {store.url(layout.CLUSTER_SHARDS)} are "
                          f"{index.text['width']}-d (text encoder {index.text['uri']})")
    return index.text


def _check_latent(store: Store, index: ShardIndex, latents: bool) -> dict[str, Any] | None:
    """The stored latents' description when the reader trains in latent space (an error without them)."""
    if not latents:
        return None
    if index.latent is None:
        raise DataError(f"a latent-space model needs the cluster shards with VAE latents, but those at "
                        f"{store.url(layout.CLUSTER_SHARDS)} hold none: give the cluster stage a vae (spec.vae)")
    return index.latent


def open_all_shards(store: Store, cfg: DataConfig, text_dim: int | None = None,
                    latents: bool = False) -> ClusterShards:
    """Every cluster's shards as one stream (the baseline, the router and the student of a text-conditioned run,
    which train on all the data with its stored caption embeddings)."""
    index = load_shard_index(store)
    if index is None:
        raise DataError(f"no per-cluster shards are committed at {store.url(layout.CLUSTER_SHARDS)} (run the "
                        "cluster stage first)")
    if index.data_uri != cfg.uri:
        raise DataError(f"the cluster shards hold {index.data_uri}, not data.uri {cfg.uri}")
    text = _check_text(store, index, text_dim)
    labeled = cfg.class_field is not None and index.labeled
    return ClusterShards(store, [s for shards in index.clusters for s in shards], cfg,
                         cfg.class_field if labeled else None, index.num_classes if labeled else None, text,
                         _check_latent(store, index, latents))


def open_cluster_shards(store: Store, cluster: int, cfg: DataConfig, text_dim: int | None = None,
                        latents: bool = False) -> ClusterShards | None:
    """Cluster ``cluster``'s shards read as ``cfg`` says, or None (with the reason on stderr) when the run has no
    shards of this data: the caller then reads ``cfg.uri`` whole, as before shards existed. ``text_dim``: the
    reader is text-conditioned and needs the caption embeddings stored with the shards (an error without them)."""
    index = load_shard_index(store)
    if index is None:
        reason = f"no per-cluster shards are committed at {store.url(layout.CLUSTER_SHARDS)}"
    elif index.data_uri != cfg.uri:
        reason = f"the cluster shards hold {index.data_uri}, not data.uri {cfg.uri}"
    elif cfg.class_field is not None and index.class_field != cfg.class_field:
        reason = f"the cluster shards were written with class_field {index.class_field}, not {cfg.class_field}"
    else:
        if not 0 <= cluster < len(index.clusters):
            raise DataError(f"cluster {cluster} is outside 0..{len(index.clusters) - 1}")
        labeled = cfg.class_field is not None and index.labeled  # unlabeled data streams labels=None, as a Source
        return ClusterShards(store, index.clusters[cluster], cfg, cfg.class_field if labeled else None,
                             index.num_classes if labeled else None, _check_text(store, index, text_dim),
                             _check_latent(store, index, latents))
    if text_dim is not None or latents:  # the whole dataset has no embeddings or latents: no fallback
        raise DataError(f"a {'text-conditioned' if text_dim is not None else 'latent-space'} model needs the "
                        f"cluster shards with its {'caption embeddings' if text_dim is not None else 'latents'}, "
                        f"but {reason}")
    print(f"data: {reason}; reading {cfg.uri} whole", file=sys.stderr)
    return None


@dataclass
class _EncodedBatch:
    """One batch before decoding: what the decode workers get and what the consumer hands out beside the images."""

    images: list[bytes]
    wheres: list[str]  # names the shard and key in a corrupt-image error
    labels: np.ndarray | None  # (B,) int64
    keys: list[str]
    text: np.ndarray | None = None  # (B, L, D) float32 token embeddings, zero past each caption
    text_mask: np.ndarray | None = None  # (B, L) bool
    text_pooled: np.ndarray | None = None  # (B, D) float32
    latents: np.ndarray | None = None  # (B, c, h, w) float32: the batch instead of images (a latent-space reader)


Samples = list[tuple[str, dict[str, bytes]]]  # one shard's (key, extension -> bytes), in shard order


class ClusterShards:
    """One cluster's committed shards: the keys, labels and images an expert trains on, read shard by shard."""

    def __init__(self, store: Store, shards: list[ShardInfo], cfg: DataConfig, label_field: str | None,
                 num_classes: int | None, text: dict[str, Any] | None = None,
                 latent: dict[str, Any] | None = None):
        if not shards:
            raise DataError(f"the cluster has no shards under {store.url(layout.CLUSTER_SHARDS)}")
        self.store, self.shards, self.cfg = store, shards, cfg
        self.label_field, self.num_classes = label_field, num_classes
        self.text = text  # the stored caption embeddings' encoder (kind, uri, width, max_tokens): batches carry them
        self.latent = latent  # the stored latents (channels, size, vae): batches are latents, not images

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, prefetch: int = 0,
               workers: int | None = None, skip: Sequence[int] | None = None) -> ShardStream:
        """``workers``: decode processes (0: in the stream's thread, None: ``default_workers()``). Batches are
        pinned where they are copied to a GPU (train_loop.move_to), for every stream alike. ``skip``: sample ids
        (positions over these shards, shard after shard) never handed out, e.g. the router's held-out samples."""
        if self.latent is not None:  # latents are read, not decoded: no decode processes to start
            workers = 0
        return ShardStream(self, batch_size, seed, rank, world_size, prefetch,
                           default_workers() if workers is None else workers, skip)

    def load_ids(self, ids: Sequence[int]) -> ImageBatch:
        """The samples at positions ``ids`` over these shards (shard after shard), in ascending order, reading one
        shard at a time and keeping only those samples: the router's held-out set, without holding the data."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))  # (N,) ascending
        offsets = np.concatenate([[0], np.cumsum([s.samples for s in self.shards])])  # (S + 1,)
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= offsets[-1]):
            raise DataError(f"sample ids must be in [0, {int(offsets[-1])}), got {int(wanted[0])}..{int(wanted[-1])}")
        shard_of = np.searchsorted(offsets, wanted, side="right") - 1  # (N,)
        entries = []
        for s in np.unique(shard_of).tolist():
            samples = self.fetch(s)
            entries += [(s, *samples[i - int(offsets[s])]) for i in wanted[shard_of == s].tolist()]
        encoded = self.encoded_batch(entries)
        return _to_batch(torch.from_numpy(self.decode(encoded)), encoded)

    def load(self, keys: Sequence[str]) -> ImageBatch:
        """These samples, read from the shards in order until all are found: for a few keys near the start of the
        cluster (the sample grid's labels), not for training."""
        wanted, found = set(keys), {}
        for s in range(len(self.shards)):
            found.update({key: (s, parts) for key, parts in self.fetch(s) if key in wanted})
            if len(found) == len(wanted):
                break
        missing = wanted - found.keys()
        if missing:
            raise DataError(f"{len(missing)} keys are not in this cluster's shards, e.g. {sorted(missing)[0]!r}")
        encoded = self.encoded_batch([(found[k][0], k, found[k][1]) for k in keys])
        return _to_batch(torch.from_numpy(self.decode(encoded)), encoded)

    def decode(self, encoded: _EncodedBatch) -> np.ndarray:
        """The batch's images (B, C, H, W) in [-1, 1], decoded here, or its latents."""
        if encoded.latents is not None:
            return encoded.latents
        return decode_batch(encoded.images, encoded.wheres, self.cfg.image_size, self.cfg.channels)

    def fetch(self, s: int) -> Samples:
        """Shard ``s`` read, checked against its index entry and split into samples."""
        info = self.shards[s]
        url = self.store.url(info.key)
        try:
            data = self.store.get_bytes(info.key)
        except MissingArtifactError:
            raise DataError(f"cluster shard {url} does not exist") from None
        if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            raise DataError(f"cluster shard {url} does not match its index (size or sha256); delete "
                            f"{self.store.url(layout.CLUSTER_SHARDS)} and re-run the cluster stage to rewrite them")
        samples: Samples = []
        for name, payload in tar_members(data, url):
            key, _, ext = name.rpartition(".")  # written as <key>.<ext>: keys may hold dots
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = payload
        if len(samples) != info.samples:
            raise DataError(f"cluster shard {url} holds {len(samples)} samples, its index says {info.samples}")
        return samples

    def encoded_batch(self, entries: list[tuple[int, str, dict[str, bytes]]],
                      flips: np.ndarray | None = None) -> _EncodedBatch:
        """(shard, key, parts) of each sample -> the batch's encoded images, labels and keys; with latents, the
        latents (of the flipped image where ``flips`` (B,) bool says so) instead of images."""
        images, wheres, labels, lats = [], [], [], []
        for i, (s, key, parts) in enumerate(entries):
            where = f"in shard {self.store.url(self.shards[s].key)} key {key}"
            wheres.append(where)
            if self.latent is not None:
                ext = LATENT_FLIP if flips is not None and flips[i] else LATENT
                if ext not in parts:
                    raise DataError(f"no VAE latent (.{ext}) {where}")
                lats.append(np.load(io.BytesIO(parts[ext]), allow_pickle=False).astype(np.float32))
            else:
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if image is None:
                    raise DataError(f"no .jpg/.jpeg/.png image {where}")
                images.append(image)
            if self.label_field is not None:
                raw = parts.get(self.label_field, b"")
                try:
                    labels.append(int(raw.decode().strip()))
                except ValueError:
                    raise DataError(f".{self.label_field} is not an integer {where}: {raw[:20]!r}") from None
        label_ids = np.asarray(labels, dtype=np.int64) if self.label_field is not None else None
        batch = _EncodedBatch(images, wheres, label_ids, [key for _, key, _ in entries],
                              latents=np.stack(lats) if lats else None)
        if self.text is not None:
            self._text_of(batch, [parts for _, _, parts in entries])
        return batch

    def _text_of(self, batch: _EncodedBatch, parts_of: list[dict[str, bytes]]) -> None:
        """The batch's stored caption embeddings, padded to the encoder's max_tokens with a mask."""
        assert self.text is not None
        B, L, D = len(parts_of), int(self.text["max_tokens"]), int(self.text["width"])
        tokens, mask, pooled = np.zeros((B, L, D), np.float32), np.zeros((B, L), bool), np.zeros((B, D), np.float32)
        for i, parts in enumerate(parts_of):
            where = batch.wheres[i]
            if TEXT_TOKENS not in parts or TEXT_POOLED not in parts:
                raise DataError(f"no caption embeddings (.{TEXT_TOKENS}, .{TEXT_POOLED}) {where}")
            tok = np.load(io.BytesIO(parts[TEXT_TOKENS]), allow_pickle=False)  # (l, D) float16
            if tok.ndim != 2 or tok.shape[1] != D or tok.shape[0] > L:
                raise DataError(f".{TEXT_TOKENS} has shape {tok.shape}, expected (<= {L}, {D}) {where}")
            tokens[i, : len(tok)], mask[i, : len(tok)] = tok, True
            pooled[i] = np.load(io.BytesIO(parts[TEXT_POOLED]), allow_pickle=False)
        batch.text, batch.text_mask, batch.text_pooled = tokens, mask, pooled


def _to_batch(images: torch.Tensor, encoded: _EncodedBatch) -> ImageBatch:
    """Decoded images (B, C, H, W) in [-1, 1] with what travelled beside them."""
    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)

    return ImageBatch(images=images, labels=tensor(encoded.labels), keys=encoded.keys, text=tensor(encoded.text),
                      text_mask=tensor(encoded.text_mask), text_pooled=tensor(encoded.text_pooled))


def default_workers() -> int:
    """min(4, CPU cores / ranks on this host): enough to feed the fastest expert, cores left for the others."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# -- streaming -----------------------------------------------------------------------------------------------------
@dataclass
class _EpochPlan:
    order: np.ndarray  # (P,) sample ids (offset of the shard + index within it), this rank's, in batch order
    window_of: np.ndarray  # (P,) the window of each sample's shard
    windows: list[np.ndarray]  # shard ids of each window, in reading order
    flips: np.ndarray | None = None  # (P,) bool: take the latent of the flipped image (latent-space shards)


class _ShardCache:
    """The shards a stream needs now or next, fetched in background threads: a window's shards arrive together,
    and the next window's while this one is being decoded."""

    FETCH_THREADS = 4

    def __init__(self, fetch: Callable[[int], Samples]):
        self._fetch = fetch
        self._pool: ThreadPoolExecutor | None = None
        self._shards: dict[int, Future[Samples]] = {}

    def read_ahead(self, shard_ids: Sequence[int]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.FETCH_THREADS, thread_name_prefix="ddm-shard-fetch")
        for s in shard_ids:
            if s not in self._shards:
                self._shards[s] = self._pool.submit(self._fetch, s)

    def get(self, s: int) -> Samples:
        self.read_ahead([s])
        return self._shards[s].result()

    def retain(self, keep: set[int]) -> None:
        for s in [s for s in self._shards if s not in keep]:
            self._shards.pop(s).cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._shards.clear()


class ShardStream:
    """Infinite, shuffled, rank-disjoint, exactly resumable batches of one cluster's shards (see the module doc).

    The protocol of ``data.Stream``: iterate for ``ImageBatch``es; ``state_dict()`` / ``load_state_dict()``;
    ``close()`` stops the reader thread and the decode workers (the position stays; iterating starts them again).
    """

    def __init__(self, shards: ClusterShards, batch_size: int, seed: int, rank: int, world_size: int,
                 prefetch: int, workers: int, skip: Sequence[int] | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if prefetch < 0 or workers < 0:
            raise DataError(f"prefetch and workers must be >= 0, got {prefetch} and {workers}")
        counts = np.asarray([s.samples for s in shards.shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])  # (S + 1,) first sample id of each shard
        self._skip = np.unique(np.asarray(skip if skip is not None else [], dtype=np.int64))  # (N,) ascending
        if self._skip.size and (self._skip[0] < 0 or self._skip[-1] >= self._offsets[-1]):
            raise DataError(f"skipped sample ids must be in [0, {int(self._offsets[-1])})")
        counts = counts - np.bincount(np.searchsorted(self._offsets, self._skip, side="right") - 1,
                                      minlength=len(counts))  # the samples each shard hands out
        self.owns_shards = len(counts) % world_size == 0
        if self.owns_shards:
            self._candidates = np.arange(rank, len(counts), world_size)
            per_rank = min(int(counts[r::world_size].sum()) for r in range(world_size))
        else:
            self._candidates = np.arange(len(counts))
            per_rank = int(counts.sum()) // world_size
        if per_rank < batch_size:
            raise DataError(f"{int(counts.sum())} samples over {world_size} ranks cannot fill a batch of "
                            f"{batch_size} from {shards.store.url(layout.CLUSTER_SHARDS)}")
        self.shards, self.per_rank = shards, per_rank
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.prefetch, self.workers = prefetch, workers
        self.window = max(1, _cache_budget() // (3 * max(s.bytes for s in shards.shards)))
        self.epoch, self.pos = 0, 0
        self._plans: dict[int, _EpochPlan] = {}
        self._cache = _ShardCache(shards.fetch)
        self._executor: ProcessPoolExecutor | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    # -- planning (from the position alone) ----------------------------------------------------------------------
    def _plan(self, epoch: int) -> _EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            rng = np.random.default_rng([self.seed, epoch])
            shard_order = self._candidates[rng.permutation(len(self._candidates))]
            windows = [shard_order[i : i + self.window] for i in range(0, len(shard_order), self.window)]
            ids, window_of = [], []
            for w, members in enumerate(windows):
                samples = np.concatenate([np.arange(self._offsets[s], self._offsets[s + 1]) for s in members])
                if self._skip.size:
                    samples = samples[~np.isin(samples, self._skip)]
                ids.append(samples[rng.permutation(len(samples))])
                window_of.append(np.full(len(samples), w))
            order, where = np.concatenate(ids), np.concatenate(window_of)
            if self.owns_shards:
                keep = slice(0, self.per_rank)
            else:
                keep = slice(self.rank, self.per_rank * self.world_size, self.world_size)
            flips = None
            if self.shards.latent is not None:  # a random horizontal flip per sample, planned like the order
                flips = np.random.default_rng([self.seed, epoch, 1]).random(len(order[keep])) < 0.5
            plan = _EpochPlan(order[keep], where[keep], windows, flips)
            self._plans[epoch] = plan
            while len(self._plans) > 2:  # this epoch and the next (read ahead across the boundary)
                del self._plans[min(self._plans)]
        return plan

    def _next_batch(self, epoch: int, pos: int) -> tuple[_EncodedBatch, int, int]:
        """The batch after position (epoch, pos), gathered from the shard cache, and the position after it."""
        if self.per_rank - pos < self.batch_size:
            epoch, pos = epoch + 1, 0
        plan = self._plan(epoch)
        ids = plan.order[pos : pos + self.batch_size]
        spanned = np.unique(plan.window_of[pos : pos + self.batch_size])
        after = int(spanned[-1]) + 1
        upcoming = plan.windows[after] if after < len(plan.windows) else self._plan(epoch + 1).windows[0]
        current = [int(s) for w in spanned for s in plan.windows[w]]
        self._cache.retain(set(current) | {int(s) for s in upcoming})
        self._cache.read_ahead(current + [int(s) for s in upcoming])
        shard_of = np.searchsorted(self._offsets, ids, side="right") - 1
        entries = []
        for sample, s in zip(ids.tolist(), shard_of.tolist()):
            key, parts = self._cache.get(s)[sample - int(self._offsets[s])]
            entries.append((s, key, parts))
        flips = plan.flips[pos : pos + len(ids)] if plan.flips is not None else None
        return self.shards.encoded_batch(entries, flips), epoch, pos + len(ids)

    # -- handing out ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ImageBatch]:
        return self

    def __next__(self) -> ImageBatch:
        if not self.prefetch and not self.workers:
            encoded, self.epoch, self.pos = self._next_batch(self.epoch, self.pos)
            return self._hand_out(self._decode_here(encoded), encoded)
        if self._thread is None:
            self._start()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        pending, encoded, epoch, pos = item
        try:
            images = pending.result() if isinstance(pending, Future) else pending
        except BaseException:
            self.close()  # a corrupt image (DataError, naming shard and key) or a dead worker
            raise
        self.epoch, self.pos = epoch, pos
        return self._hand_out(images, encoded)

    def _decode_here(self, encoded: _EncodedBatch) -> np.ndarray:
        return self.shards.decode(encoded)

    def _hand_out(self, images: np.ndarray, encoded: _EncodedBatch) -> ImageBatch:
        return _to_batch(torch.from_numpy(images), encoded)

    def start_workers(self) -> None:
        """Start the decode processes now (they take seconds to come up), so that they are ready when the first
        batch is asked for: call it before building and compiling the model. A no-op without workers."""
        if self.workers and self._executor is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            # not fork: the training process has CUDA and threads, which a forked child must not inherit
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=ignore_stop_signals)
            for _ in range(self.workers):  # the pool starts a process per task it cannot hand to an idle one
                self._executor.submit(int)

    def _start(self) -> None:
        self.start_workers()
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.workers + self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self.epoch, self.pos),
                                        name="ddm-shard-stream", daemon=True)
        self._thread.start()

    def _produce(self, out: queue.Queue[Any], epoch: int, pos: int) -> None:
        """The reader thread: plans batches from (epoch, pos) on, hands each to a decode worker (or decodes it) and
        queues it with the position after it; an error is queued for the consumer to raise."""
        cfg = self.shards.cfg
        try:
            while not self._stop.is_set():
                encoded, epoch, pos = self._next_batch(epoch, pos)
                pending: Any
                if self._executor is not None and encoded.latents is None:
                    pending = self._executor.submit(decode_batch, encoded.images, encoded.wheres, cfg.image_size,
                                                    cfg.channels)
                else:
                    pending = self._decode_here(encoded)
                self._put(out, (pending, encoded, epoch, pos))
        except BaseException as exc:
            self._put(out, exc)

    def _put(self, out: queue.Queue[Any], item: Any) -> None:
        if not put_until_stopped(out, item, self._stop) and isinstance(item, tuple) and isinstance(item[0], Future):
            item[0].cancel()

    def _stop_reading(self) -> None:
        """Stop the reader thread and drop what was decoded ahead (it belongs to the old position)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            assert self._queue is not None
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, tuple) and isinstance(item[0], Future):
                    item[0].cancel()
            self._thread, self._queue = None, None

    def close(self) -> None:
        """Stop the reader thread, the decode workers and the shard fetches; the position stays."""
        self._stop_reading()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._cache.close()

    # -- position ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reader": READER, "epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": self._handed_out,
                "window": self.window}

    @property
    def _handed_out(self) -> int:
        """Samples this stream hands out over all ranks (the shards' less the skipped): a resume must match it."""
        return len(self.shards) - int(self._skip.size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position, with its window size, so the order is the one it was saved in."""
        if state.get("reader") != READER:
            raise DataError("the checkpoint's data position is one of the whole-dataset reader (saved before this "
                            "run had cluster shards); this run reads cluster shards in another order")
        for field in ("seed", "world_size", "num_samples"):
            mine = self._handed_out if field == "num_samples" else getattr(self, field)
            if state.get(field) != mine:
                raise DataError(f"data stream state has {field}={state.get(field)}, this stream has {mine}")
        self._stop_reading()
        self.window, self._plans = int(state["window"]), {}
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
