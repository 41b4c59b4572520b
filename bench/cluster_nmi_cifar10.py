"""Does feature clustering find semantic structure? NMI(clusters, CIFAR-10 classes) for encoder k-means vs a
random partition, K = 10 and K = 8, fine clusters 1024 (fewer when the sample count demands: >= 39 per centroid).

Reads the CIFAR-10 train shards (default ../shared/datasets/cifar10); writes bench/results/cluster_nmi_cifar10.json.

    python bench/cluster_nmi_cifar10.py                                     # all 50k, efficientnet_lite0 @224 (GPU)
    python bench/cluster_nmi_cifar10.py --limit 4000 --resolution 64        # a CPU-sized subset
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from ddm_trainer.clustering import hierarchical_kmeans, nmi, random_partition  # noqa: E402
from ddm_trainer.configs.common import DataConfig  # noqa: E402
from ddm_trainer.data import open_source  # noqa: E402
from ddm_trainer.encoders import build_encoder  # noqa: E402

DEFAULT_SHARDS = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10/cifar10-train-*.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(DEFAULT_SHARDS))
    parser.add_argument("--limit", type=int, default=None, help="first N training images (default: all 50,000)")
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--resolution", type=int, default=None, help="encoder input size (default: the encoder's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fine", type=int, default=1024)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    source = open_source(DataConfig(uri=args.shards, image_size=32, channels=3, limit=args.limit))
    keys = source.keys()
    labels = np.asarray([source.labels()[k] for k in keys])
    encoder = build_encoder(args.encoder, args.weights, args.device, args.resolution)
    t0 = time.perf_counter()
    chunks = []
    for start in range(0, len(keys), args.batch_size):
        chunks.append(encoder.embed(source.load(keys[start : start + args.batch_size]).images, args.batch_size))
        print(f"\rembedded {start + len(chunks[-1])}/{len(keys)}", end="", file=sys.stderr, flush=True)
    features = np.concatenate(chunks)  # (N, D)
    embed_s = time.perf_counter() - t0
    print(f"\n{len(keys)} images -> {features.shape} with {args.encoder}@{encoder.resolution} in {embed_s:.0f} s")
    import torch

    device = "cuda" if torch.cuda.is_available() else None  # as the cluster stage: torch k-means on its GPU
    tag_data = f"cifar10-train[{len(keys)}]"
    res = f"@{encoder.resolution}" if encoder.resolution else ""
    for k in args.ks:
        km = [nmi(labels, hierarchical_kmeans(features, k, args.fine, s, device=device).cluster) for s in args.seeds]
        rnd = [nmi(labels, random_partition(len(keys), k, s)) for s in args.seeds]
        print(f"K={k}: NMI {args.encoder} k-means {np.mean(km):.3f} +- {np.std(km):.3f}, "
              f"random {np.mean(rnd):.4f} +- {np.std(rnd):.4f} (seeds {args.seeds})")
        record("cluster_nmi_cifar10", f"nmi[{args.encoder}{res} kmeans,K={k},{tag_data}]", round(float(np.mean(km)), 4),
               "NMI (mean over seeds)")
        record("cluster_nmi_cifar10", f"nmi[random,K={k},{tag_data}]", round(float(np.mean(rnd)), 4),
               "NMI (mean over seeds)")
    record("cluster_nmi_cifar10", f"embed_seconds[{args.encoder}{res},{tag_data}]", round(embed_s, 1), "s")


if __name__ == "__main__":
    main()
