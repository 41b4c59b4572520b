"""The encode step of the cluster stage: image features, caption embeddings and VAE latents of every sample, spread
over the processes of the stage (torchrun ranks: the GPUs of a pod, or pods), committed part by part.

The dataset's samples, in the source's order, are cut into parts of ``part`` samples (PART by default); rank r
of W encodes parts r, r + W, ... and commits each under ``encode/<part>`` as soon as it is done (``part.npz``:
features float32 (n, F); caption tokens, mask and pooled embeddings float16; latents and the latents of the
flipped images float16). A
retry, or a re-run with the same encode config, redoes only the parts that are missing (or were made with another
config). Every part is computed the same way whatever W is (the same samples, the same batches), so any number of
processes gives the same arrays, and k-means on rank 0 the same clusters.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import layout
from .errors import DataError
from .progress import Reporter
from .store import Store

PART = 4096  # default samples per committed part (ClusterConfig.encode_part_size): a multiple of TEXT_BATCH
PART_FILE = "part.npz"


@dataclass
class Encoders:
    """What each sample is encoded with; any of them may be absent."""

    features: Callable[[torch.Tensor], np.ndarray] | None  # images (B, C, H, W) in [-1, 1] -> (B, F) float32
    text: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray, np.ndarray]] | None  # -> tokens, mask, pooled
    latents: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]] | None  # images -> latents, flipped latents
    batch_size: int
    part: int  # samples per part
    config: dict[str, Any]  # what decides the parts' content (encoders, data, batch): a part made otherwise is redone


def part_prefix(p: int) -> str:
    return f"{layout.ENCODE}/{p:06d}"


def config_id(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def num_parts(n: int, part: int) -> int:
    return -(-n // part)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def encode_parts(store: Store, source: Any, keys: list[str], encoders: Encoders, rank: int = 0, world_size: int = 1,
                 reporter: Reporter | None = None) -> int:
    """Encode and commit this rank's missing parts; returns how many it encoded."""
    if encoders.features is None and encoders.text is None and encoders.latents is None:
        return 0  # nothing to encode (a random partition of pixels)
    ident = config_id(encoders.config)
    captions = source.captions() if encoders.text is not None else None
    done = 0
    for p in range(rank, num_parts(len(keys), encoders.part), world_size):
        prefix = part_prefix(p)
        manifest = store.read_manifest(prefix)
        if manifest is not None and manifest.get("config_id") == ident:
            continue
        lo, hi = p * encoders.part, min((p + 1) * encoders.part, len(keys))
        chunks: dict[str, list[np.ndarray]] = {}
        for start in range(lo, hi, encoders.batch_size):
            stop = min(start + encoders.batch_size, hi)
            out: dict[str, np.ndarray] = {}
            if encoders.features is not None or encoders.latents is not None:
                images = source.load(keys[start:stop]).images  # (b, C, H, W)
                if encoders.features is not None:
                    out["features"] = encoders.features(images).astype(np.float32)
                if encoders.latents is not None:
                    lat, flip = encoders.latents(images)
                    out["latents"], out["latents_flip"] = lat.astype(np.float16), flip.astype(np.float16)
            if encoders.text is not None and captions is not None:
                tokens, mask, pooled = encoders.text(captions[start:stop])
                out.update(tokens=tokens.astype(np.float16), mask=mask.astype(bool), pooled=pooled.astype(np.float16))
            for name, array in out.items():
                chunks.setdefault(name, []).append(array)
        arrays = {name: np.concatenate(parts) for name, parts in chunks.items()}
        arrays["keys"] = np.asarray(keys[lo:hi])
        store.commit(prefix, {PART_FILE: _npz(arrays)}, {"config_id": ident, "samples": hi - lo, "rank": rank})
        done += 1
        if reporter is not None:
            reporter.update(hi, phase="encode", part=p, rank=rank)
    return done


class Parts:
    """The committed parts read back in order (rank 0, after every rank is done): features for k-means, and the
    captions' and images' encodings by sample index for the cluster shards."""

    def __init__(self, store: Store, keys: list[str], encoders: Encoders):
        self.store, self.keys, self.ident, self.size = store, keys, config_id(encoders.config), encoders.part
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def part(self, p: int) -> dict[str, np.ndarray]:
        if self._cached is not None and self._cached[0] == p:
            return self._cached[1]
        prefix = part_prefix(p)
        manifest = self.store.read_manifest(prefix)
        if manifest is None or manifest.get("config_id") != self.ident:
            raise DataError(f"encode part {self.store.url(prefix)} is missing or was made with another config "
                            "(a rank failed before committing it): re-run the cluster stage")
        with np.load(io.BytesIO(self.store.read_committed(prefix, PART_FILE)), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        lo = p * self.size
        if arrays["keys"].tolist() != self.keys[lo : lo + len(arrays["keys"])]:
            raise DataError(f"encode part {self.store.url(prefix)} holds other samples than the data now does")
        self._cached = (p, arrays)
        return arrays

    def features(self) -> np.ndarray:
        return np.concatenate([self.part(p)["features"] for p in range(num_parts(len(self.keys), self.size))])  # (N, F)

    def rows(self, names: Sequence[str], start: int, stop: int) -> list[np.ndarray]:
        """``names`` arrays of samples [start, stop), which lie in one part."""
        p = start // self.size
        if (stop - 1) // self.size != p:
            raise ValueError(f"samples [{start}, {stop}) span two encode parts")
        arrays = self.part(p)
        lo, hi = start - p * self.size, stop - p * self.size
        return [arrays[name][lo:hi].astype(bool if name == "mask" else np.float32) for name in names]
