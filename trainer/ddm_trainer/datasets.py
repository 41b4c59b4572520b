"""Write WebDataset-style shards: ``<key>.png`` + ``<key>.cls`` (+ ``<key>.txt``) in ``.tar`` files.

Used by tests, demos and benchmarks to turn Fashion-MNIST (or any images) into the format every stage reads.
"""
from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (H, W) or (H, W, 3) uint8
    cls: int | None = None
    caption: str | None = None


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[Sample], out_dir: str | Path, shard_size: int = 1000,
                 prefix: str = "shard", gzip: bool = False) -> list[Path]:
    """Write samples in order into ``out_dir/<prefix>-NNNNNN.tar[.gz]``, ``shard_size`` per shard; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".tar.gz" if gzip else ".tar"
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    count = 0
    for sample in samples:
        if tar is None or count == shard_size:
            if tar is not None:
                tar.close()
            paths.append(out / f"{prefix}-{len(paths):06d}{suffix}")
            tar = tarfile.open(paths[-1], "w:gz" if gzip else "w")
            count = 0
        _add(tar, f"{sample.key}.png", _png(sample.image))
        if sample.cls is not None:
            _add(tar, f"{sample.key}.cls", str(int(sample.cls)).encode())
        if sample.caption is not None:
            _add(tar, f"{sample.key}.txt", sample.caption.encode())
        count += 1
    if tar is not None:
        tar.close()
    return paths


def fashion_mnist_to_shards(out_dir: str | Path, split: str = "train", limit: int | None = None,
                            shard_size: int = 1000, source_dir: str | Path = FASHION_MNIST_DIR,
                            classes: Collection[int] | None = None) -> list[Path]:
    """Fashion-MNIST ``split`` (train | t10k) as PNG shards with .cls and a caption, first ``limit`` images (of
    ``classes`` only, when given: data islands of a grown DDM)."""
    from .configs.common import DataConfig
    from .data import IdxSource, _list_files

    cfg = DataConfig(uri=f"{source_dir}#{split}", image_size=28, channels=1)
    files, _ = _list_files(str(source_dir), None)
    src = IdxSource(cfg, files, split)
    labels = src._label_ids
    picked = [i for i in range(len(src)) if classes is None or (labels is not None and int(labels[i]) in classes)]
    picked = picked if limit is None else picked[:limit]

    def samples() -> Iterable[Sample]:
        for i in picked:
            cls = None if labels is None else int(labels[i])
            caption = None if cls is None else f"a photo of a {FASHION_MNIST_CLASSES[cls].lower()}"
            yield Sample(key=f"{split}-{i:06d}", image=src._raw[i], cls=cls, caption=caption)

    return write_shards(samples(), out_dir, shard_size, prefix=f"fashion-mnist-{split}")
