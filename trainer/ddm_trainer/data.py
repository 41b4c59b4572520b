"""Image input for every stage: WebDataset-style shards, image folders and IDX files, local or in the store.

``open_source(cfg, store)`` gives a ``Source``: sample keys in a canonical order, labels, random access with
``load(keys)`` and an infinite, shuffled, rank-disjoint, resumable ``stream(...)`` of ``ImageBatch``es.

Sources (``cfg.uri``):
- shards: a ``.tar``/``.tar.gz`` file, a directory of them, a glob, or a brace pattern
  (``train-{000000..000004}.tar.gz``); a sample is ``<key>.jpg|jpeg|png`` with optional ``<key>.cls``/``<key>.txt``;
- an image folder: ``root/<class_name>/*.png|jpg`` (class ids by sorted folder name) or a flat folder (no labels);
- an IDX directory (``train-images-idx3-ubyte.gz`` + labels), ``DIR#t10k`` picks the split (default ``train``).
Any of them may be ``s3://bucket/...`` or, when a run store is given, a key under it.

Memory: encoded bytes are cached up to ``DDM_DATA_CACHE_BYTES`` (default 2 GiB) and decoded uint8 images up to
the same budget. Beyond it, shards are read one at a time and the shuffle is shard-grouped (shard order, then
samples within a shard) so a rank never needs more than one shard in memory.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import os
import queue
import re
import struct
import tarfile
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from .configs.common import DataConfig
from .decode import decode_image, to_uint8, to_unit_range
from .errors import DataError, MissingArtifactError
from .store import FileStore, Store, open_store

IMAGE_EXTS = ("jpg", "jpeg", "png")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = "*?["


def _cache_budget() -> int:
    return int(os.environ.get("DDM_DATA_CACHE_BYTES", str(2 << 30)))


@dataclass
class ImageBatch:
    images: torch.Tensor  # (B, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None  # (B,) int64
    keys: list[str]
    # caption embeddings stored with the cluster shards (text-conditioned runs), else None:
    text: torch.Tensor | None = None  # (B, L, D) float32 token embeddings, zero past each caption
    text_mask: torch.Tensor | None = None  # (B, L) bool, True = a real token
    text_pooled: torch.Tensor | None = None  # (B, D) float32 sentence embeddings (the router's condition)


# -- locating files ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _File:
    store: Store
    key: str

    @property
    def url(self) -> str:
        return _url(self.store, self.key)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def read(self) -> bytes:
        try:
            return self.store.get_bytes(self.key)
        except MissingArtifactError:
            raise DataError(f"data file {self.url} does not exist") from None


def _url(store: Store, key: str) -> str:
    """A plain path for local files (what the user typed), the store URL otherwise."""
    local = store.local_path()
    return str(local / key) if local is not None else store.url(key)


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names (zero padding kept); ``{x,y}`` lists too; nested braces expand left first."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _split_uri(uri: str, store: Store | None) -> tuple[Store, str, str | None, bool]:
    """(store holding the data, key or pattern under it, '#fragment', is_local)."""
    uri, _, fragment = uri.partition("#")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return open_store(f"s3://{parsed.netloc}"), parsed.path.strip("/"), fragment or None, False
    path = parsed.path if parsed.scheme == "file" else uri
    is_relative = not os.path.isabs(path)
    if store is not None and parsed.scheme == "" and is_relative and not glob.glob(expand_braces(path)[0]):
        return store, path.strip("/"), fragment or None, False  # a key under the run store
    return FileStore("/"), str(Path(path).absolute()).lstrip("/"), fragment or None, True


def _list_files(uri: str, store: Store | None) -> tuple[list[_File], str | None]:
    data_store, pattern, fragment, is_local = _split_uri(uri, store)
    files: list[_File] = []
    for pat in expand_braces(pattern):
        if any(c in pat for c in _GLOB_CHARS):
            if is_local:
                keys = sorted(p.lstrip("/") for p in glob.glob("/" + pat) if os.path.isfile(p))
            else:
                base = re.split(r"[*?\[]", pat, maxsplit=1)[0].rsplit("/", 1)[0] if "/" in pat else ""
                keys = [k for k in data_store.list(base) if fnmatch.fnmatch(k, pat)]
            if not keys:
                raise DataError(f"data.uri pattern {_url(data_store, pat)} matches no files")
            files += [_File(data_store, k) for k in keys]
        elif data_store.exists(pat):
            files.append(_File(data_store, pat))
        else:
            keys = data_store.list(pat)
            if not keys:
                raise DataError(f"data path {_url(data_store, pat)} does not exist (or is empty)")
            files += [_File(data_store, k) for k in keys]
    return files, fragment


# -- tar shards ----------------------------------------------------------------------------------------------------
def read_tar_samples(data: bytes, url: str) -> dict[str, dict[str, bytes]]:
    """A shard's samples in tar order: key -> extension -> bytes (WebDataset: the key ends at the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    for name, payload in tar_members(data, url):
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        samples.setdefault(name[: len(name) - len(base)] + stem, {})[ext.lower()] = payload
    return samples


def tar_members(data: bytes, url: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file in a (gzipped) tar, in order; DataError naming ``url`` when it is corrupt.

    Plain ustar members are sliced straight out of the bytes: ``tarfile`` costs ~100 us a sample, as much as
    decoding a 32 px image. Anything else (bzip2/xz, pax or GNU long-name headers) goes through ``tarfile``.
    """
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        members = _ustar_members(data)
        if members is None:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                members = []
                for member in tar:
                    if member.isfile():
                        fh = tar.extractfile(member)
                        members.append((member.name, fh.read() if fh else b""))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"corrupt shard {url}: {e}") from None
    return members


def _ustar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, bytes) of each regular file, or None when the archive needs ``tarfile`` (or is damaged)."""
    members: list[tuple[str, bytes]] = []
    pos = 0
    while pos + 512 <= len(data):
        header = data[pos : pos + 512]
        if header.count(0) == 512:
            return members  # end-of-archive marker
        try:
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None  # base-256 sizes, garbage
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32 or pos + 512 + size > len(data):
            return None
        kind = header[156:157]
        if kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            members.append((name, data[pos + 512 : pos + 512 + size]))
        elif kind != b"5":  # directories are skipped; pax/GNU headers, links, devices: tarfile's job
            return None
        pos += 512 + -(-size // 512) * 512
    return members if members and pos == len(data) else None


# -- sources -------------------------------------------------------------------------------------------------------
class Source:
    """Common part: keys, labels, decode cache, random access, streams. Subclasses fill ``_keys``/``_labels``."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._keys: list[str] = []
        self._label_ids: np.ndarray | None = None  # (N,) int64, aligned with _keys
        self._num_classes: int | None = None
        self._captions: list[str | None] | None = None  # aligned with _keys; None: this source has no captions
        self._caption_where: list[str] = []  # names the shard of each caption, for the error of a missing one
        self._index: dict[str, int] = {}
        self._decoded: dict[int, np.ndarray] = {}
        self._decoded_bytes = 0
        self._lock = threading.RLock()  # a stream's prefetch thread and the caller share the decode caches

    def _finish(self) -> None:
        if self.cfg.limit is not None:
            self._keys = self._keys[: self.cfg.limit]
            if self._label_ids is not None:
                self._label_ids = self._label_ids[: self.cfg.limit]
        if not self._keys:
            raise DataError(f"data.uri {self.cfg.uri} holds no images")
        self._index = {k: i for i, k in enumerate(self._keys)}
        if len(self._index) != len(self._keys):
            raise DataError(f"data.uri {self.cfg.uri} has duplicate sample keys")
        if self.cfg.class_field is None:
            self._label_ids, self._num_classes = None, None

    # public
    def keys(self) -> list[str]:
        return list(self._keys)

    def labels(self) -> dict[str, int] | None:
        if self._label_ids is None:
            return None
        return dict(zip(self._keys, self._label_ids.tolist()))

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def captions(self) -> list[str]:
        """Every sample's caption (``data.caption_field``), aligned with ``keys()``; DataError naming the field and
        the first sample without one."""
        field = self.cfg.caption_field
        if field is None:
            raise DataError("data.caption_field is not set: the run has no captions to encode")
        if self._captions is None:
            raise DataError(f"data.caption_field {field!r}: data.uri {self.cfg.uri} ({type(self).__name__}) holds "
                            "no captions (only tar shards carry <key>.<caption_field>)")
        for i, caption in enumerate(self._captions[: len(self._keys)]):
            if caption is None:
                raise DataError(f"data.caption_field {field!r}: {self._caption_where[i]} key {self._keys[i]} has no "
                                f".{field}")
        return [c for c in self._captions[: len(self._keys)] if c is not None]

    def __len__(self) -> int:
        return len(self._keys)

    def load(self, keys: Sequence[str]) -> ImageBatch:
        idx = []
        for k in keys:
            if k not in self._index:
                raise DataError(f"sample key {k!r} is not in {self.cfg.uri}")
            idx.append(self._index[k])
        return self._batch(np.asarray(idx, dtype=np.int64))

    def encoded(self, key: str) -> tuple[str, bytes]:
        """(extension, bytes) of a sample's image as stored, so it can be copied into new shards undecoded."""
        if key not in self._index:
            raise DataError(f"sample key {key!r} is not in {self.cfg.uri}")
        with self._lock:
            return self._encoded_one(self._index[key])

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
               keys: Collection[str] | None = None, drop_last: bool = True, prefetch: int = 0) -> "Stream":
        if keys is None:
            indices = np.arange(len(self._keys), dtype=np.int64)
        else:
            wanted = set(keys)
            missing = wanted - self._index.keys()
            if missing:
                raise DataError(f"{len(missing)} selected keys are not in {self.cfg.uri}, e.g. {sorted(missing)[0]!r}")
            indices = np.asarray(sorted(self._index[k] for k in wanted), dtype=np.int64)
        if len(indices) == 0:
            raise DataError(f"empty key selection for {self.cfg.uri}")
        return Stream(self, indices, batch_size, seed, rank, world_size, drop_last, prefetch)

    # internals
    def _group_of(self, i: int) -> int:
        """Which shard holds sample i (shard-grouped shuffling); one group for in-memory sources."""
        return 0

    def _grouped(self) -> bool:
        return False

    def _decode_one(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _encoded_one(self, i: int) -> tuple[str, bytes]:
        raise NotImplementedError

    def _image(self, i: int) -> np.ndarray:
        arr = self._decoded.get(i)
        if arr is None:
            arr = self._decode_one(i)
            if self._decoded_bytes + arr.nbytes <= _cache_budget():
                self._decoded[i] = arr
                self._decoded_bytes += arr.nbytes
        return arr

    def _batch(self, idx: np.ndarray) -> ImageBatch:
        with self._lock:
            arrs = np.stack([self._image(int(i)) for i in idx])  # (B, C, H, W) uint8
        images = torch.from_numpy(to_unit_range(arrs))  # (B, C, H, W) in [-1, 1]
        labels = None if self._label_ids is None else torch.from_numpy(self._label_ids[idx].copy())
        return ImageBatch(images=images, labels=labels, keys=[self._keys[int(i)] for i in idx])


class IdxSource(Source):
    """MNIST-style IDX files: decoded once into memory (Fashion-MNIST train is 47 MB)."""

    def __init__(self, cfg: DataConfig, files: list[_File], split: str):
        super().__init__(cfg)
        by_name = {f.name: f for f in files}
        img_file = by_name.get(f"{split}-images-idx3-ubyte.gz") or by_name.get(f"{split}-images-idx3-ubyte")
        if img_file is None:
            raise DataError(f"no {split}-images-idx3-ubyte[.gz] in {cfg.uri} (splits: {_idx_splits(files)})")
        self._raw = _read_idx(img_file, 3)  # (N, H, W) uint8
        self._keys = [f"{split}-{i:06d}" for i in range(len(self._raw))]
        lbl_file = by_name.get(f"{split}-labels-idx1-ubyte.gz") or by_name.get(f"{split}-labels-idx1-ubyte")
        if lbl_file is not None:
            self._label_ids = _read_idx(lbl_file, 1).astype(np.int64)
            if len(self._label_ids) != len(self._keys):
                raise DataError(f"{lbl_file.url} has {len(self._label_ids)} labels for {len(self._keys)} images")
            self._num_classes = int(self._label_ids.max()) + 1
        self._finish()

    def _decode_one(self, i: int) -> np.ndarray:
        from PIL import Image

        return to_uint8(Image.fromarray(self._raw[i]), self.cfg.image_size, self.cfg.channels)

    def _encoded_one(self, i: int) -> tuple[str, bytes]:
        """IDX holds raw pixels: PNG keeps them exactly."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self._raw[i]).save(buf, format="PNG")
        return "png", buf.getvalue()


def _idx_splits(files: list[_File]) -> list[str]:
    return sorted({f.name.split("-images-")[0] for f in files if "-images-idx3-ubyte" in f.name})


def _read_idx(f: _File, ndim: int) -> np.ndarray:
    data = f.read()
    try:
        if f.name.endswith(".gz"):
            data = gzip.decompress(data)
        magic, = struct.unpack(">I", data[:4])
        if magic != 0x800 + ndim:
            raise ValueError(f"magic {magic:#x}, expected {0x800 + ndim:#x}")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (ValueError, OSError, EOFError, struct.error) as e:
        raise DataError(f"corrupt IDX file {f.url}: {e}") from None


class FolderSource(Source):
    """``root/<class>/*.png`` (labels by sorted folder name) or a flat folder of images."""

    def __init__(self, cfg: DataConfig, files: list[_File], root_key: str):
        super().__init__(cfg)
        prefix = root_key.strip("/") + "/" if root_key.strip("/") else ""
        images = [f for f in files if f.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
        rel = {f: f.key[len(prefix) :] if f.key.startswith(prefix) else f.name for f in images}
        self._files = sorted(images, key=lambda f: rel[f])
        self._keys = [rel[f].rsplit(".", 1)[0] for f in self._files]
        classes = sorted({r.split("/")[0] for r in rel.values() if "/" in r})
        if classes and all("/" in r for r in rel.values()):
            class_id = {c: i for i, c in enumerate(classes)}
            self._label_ids = np.asarray([class_id[rel[f].split("/")[0]] for f in self._files], dtype=np.int64)
            self._num_classes = len(classes)
            self.class_names = classes
        self._finish()
        self._files = self._files[: len(self._keys)]

    def _decode_one(self, i: int) -> np.ndarray:
        f = self._files[i]
        return decode_image(f.read(), self.cfg.image_size, self.cfg.channels, f"{f.url} (key {self._keys[i]})")

    def _encoded_one(self, i: int) -> tuple[str, bytes]:
        f = self._files[i]
        return f.name.rsplit(".", 1)[-1].lower(), f.read()


class ShardSource(Source):
    """WebDataset-style tar shards. The index (keys, labels, shard of each key) is built by one pass at open."""

    def __init__(self, cfg: DataConfig, files: list[_File]):
        super().__init__(cfg)
        self._shards = files
        self._shard_of: list[int] = []
        self._ext_of: list[str] = []
        self._cache: OrderedDict[int, dict[str, dict[str, bytes]]] = OrderedDict()  # shard -> key -> ext -> bytes
        self._cache_bytes: dict[int, int] = {}
        labels: list[int] = []
        has_labels = cfg.class_field is not None
        total = 0
        for s, f in enumerate(files):
            samples = self._read_shard(s)
            size = sum(len(b) for parts in samples.values() for b in parts.values())
            total += size
            self._remember(s, samples, size)
            for key, parts in samples.items():
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if ext is None:
                    continue  # a sample without an image (e.g. only a caption): not a training sample
                self._keys.append(key)
                self._shard_of.append(s)
                self._ext_of.append(ext)
                if cfg.caption_field is not None:
                    raw_caption = parts.get(cfg.caption_field.lower())
                    self._captions = self._captions if self._captions is not None else []
                    self._captions.append(None if raw_caption is None else raw_caption.decode("utf-8", "replace"))
                    self._caption_where.append(f"shard {f.url}")
                if has_labels:
                    raw = parts.get(cfg.class_field or "")
                    if raw is None:
                        has_labels = False
                    else:
                        try:
                            labels.append(int(raw.decode().strip()))
                        except ValueError:
                            raise DataError(f"{f.url} key {key}: .{cfg.class_field} is not an integer: {raw[:20]!r}")
            if cfg.limit is not None and len(self._keys) >= cfg.limit:
                break
        self._total_bytes = total
        if has_labels and labels:
            self._label_ids = np.asarray(labels, dtype=np.int64)
            self._num_classes = int(self._label_ids.max()) + 1
        self._finish()
        self._shard_of = self._shard_of[: len(self._keys)]

    def _read_shard(self, s: int) -> dict[str, dict[str, bytes]]:
        f = self._shards[s]
        return read_tar_samples(f.read(), f.url)

    def _remember(self, s: int, samples: dict[str, dict[str, bytes]], size: int) -> None:
        self._cache[s] = samples
        self._cache_bytes[s] = size
        self._cache.move_to_end(s)
        while len(self._cache) > 1 and sum(self._cache_bytes[k] for k in self._cache) > _cache_budget():
            old, _ = self._cache.popitem(last=False)
            del self._cache_bytes[old]

    def _shard(self, s: int) -> dict[str, dict[str, bytes]]:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        samples = self._read_shard(s)
        self._remember(s, samples, sum(len(b) for parts in samples.values() for b in parts.values()))
        return samples

    def _grouped(self) -> bool:
        return self._total_bytes > _cache_budget()

    def _group_of(self, i: int) -> int:
        return self._shard_of[i]

    def _decode_one(self, i: int) -> np.ndarray:
        s, key = self._shard_of[i], self._keys[i]
        data = self._shard(s)[key][self._ext_of[i]]
        return decode_image(data, self.cfg.image_size, self.cfg.channels, f"in shard {self._shards[s].url} key {key}")

    def _encoded_one(self, i: int) -> tuple[str, bytes]:
        return self._ext_of[i], self._shard(self._shard_of[i])[self._keys[i]][self._ext_of[i]]


def put_until_stopped(out: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    """Queue ``item`` for the consumer unless ``stop`` is set first; False when it was not queued."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def open_source(cfg: DataConfig, store: Store | None = None) -> Source:
    """Open ``cfg.uri`` (see module doc). Raises DataError for missing/empty/corrupt data."""
    files, fragment = _list_files(cfg.uri, store)
    names = [f.name for f in files]
    if any(n.endswith(SHARD_SUFFIXES) for n in names):
        return ShardSource(cfg, [f for f in files if f.name.endswith(SHARD_SUFFIXES)])
    if any("-images-idx3-ubyte" in n for n in names):
        return IdxSource(cfg, files, fragment or "train")
    if any(n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for n in names):
        _, root_key, _, _ = _split_uri(cfg.uri, store)
        return FolderSource(cfg, files, root_key)
    raise DataError(f"data.uri {cfg.uri} holds no shards (.tar/.tar.gz), IDX files or images")


# -- streaming -----------------------------------------------------------------------------------------------------
class Stream:
    """Infinite batches: epoch e uses a permutation seeded by (seed, e); rank r takes every world_size-th sample.

    Every rank gets the same number of samples per epoch (the tail that does not divide evenly is dropped), so
    data-parallel ranks take the same number of steps. ``state_dict()`` after a batch resumes at the next one.

    ``prefetch`` > 0 decodes that many batches ahead in one background thread, in order, so decoding overlaps the
    training step; the batches and ``state_dict()`` are exactly those without prefetch (the order is planned from
    the position, and the state is that of the last batch handed out).
    """

    def __init__(self, source: Source, indices: np.ndarray, batch_size: int, seed: int, rank: int,
                 world_size: int, drop_last: bool, prefetch: int = 0):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if prefetch < 0:
            raise DataError(f"prefetch must be >= 0, got {prefetch}")
        per_rank = len(indices) // world_size
        if per_rank == 0 or (drop_last and per_rank < batch_size):
            raise DataError(f"{len(indices)} samples over {world_size} ranks cannot fill a batch of {batch_size} "
                            f"from {source.cfg.uri}")
        self.source, self.indices = source, indices
        self.batch_size, self.seed, self.rank, self.world_size, self.drop_last = (
            batch_size, seed, rank, world_size, drop_last)
        self.epoch, self.pos = 0, 0
        self.prefetch = prefetch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.source._grouped():  # bounded memory: shard order, then samples within each shard
                groups = np.asarray([self.source._group_of(int(i)) for i in self.indices])
                order = []
                for g in rng.permutation(np.unique(groups)):
                    members = self.indices[groups == g]
                    order.append(members[rng.permutation(len(members))])
                full = np.concatenate(order)
            else:
                full = self.indices[rng.permutation(len(self.indices))]
            usable = (len(full) // self.world_size) * self.world_size
            self._order = full[:usable][self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._order

    def _advance(self, epoch: int, pos: int) -> tuple[np.ndarray, int, int]:
        """(sample indices of the batch after position (epoch, pos), the position after it)."""
        order = self._epoch_order(epoch)
        remaining = len(order) - pos
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            epoch, pos = epoch + 1, 0
            order = self._epoch_order(epoch)
        chunk = order[pos : pos + self.batch_size]
        return chunk, epoch, pos + len(chunk)

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.indices) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[ImageBatch]:
        return self

    def __next__(self) -> ImageBatch:
        if not self.prefetch:
            chunk, self.epoch, self.pos = self._advance(self.epoch, self.pos)
            return self.source._batch(chunk)
        if self._thread is None:
            self._start_prefetch()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self.epoch, self.pos = item
        return batch  # type: ignore[no-any-return]

    def _start_prefetch(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self.epoch, self.pos),
                                        name="ddm-data-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, out: queue.Queue[Any], epoch: int, pos: int) -> None:
        """The prefetch thread: batches from (epoch, pos) on, each with the position after it; an error ends it."""
        try:
            while not self._stop.is_set():
                chunk, epoch, pos = self._advance(epoch, pos)
                item: Any = (self.source._batch(chunk), epoch, pos)
                self._put(out, item)
        except BaseException as exc:  # handed to the consumer, who raises it (DataError keeps its exit code)
            self._put(out, exc)

    def _put(self, out: queue.Queue[Any], item: Any) -> None:
        put_until_stopped(out, item, self._stop)

    def close(self) -> None:
        """Stop the prefetch thread (batches decoded ahead are dropped; the position stays)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": len(self.indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("seed", "world_size", "num_samples"):
            mine = len(self.indices) if field == "num_samples" else getattr(self, field)
            if state.get(field) != mine:
                raise DataError(f"data stream state has {field}={state.get(field)}, this stream has {mine}")
        self.close()  # batches decoded ahead belong to the old position
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
