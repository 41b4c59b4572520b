"""Images/s of an expert's data path, against the fastest consumer: DiT-S/2 training at 32 px, batch 256, on one H200.

CIFAR-10 train (50,000 32 px JPEG shards) is partitioned by the real cluster stage (method=random, K=8), which
writes each cluster's shards into a run store; then the stream the expert stage builds reads one cluster (one rank,
batch 256, 2 batches prefetched, the Trainer's pinned non-blocking copy to the GPU when there is one) for each number
of decode worker processes. The first batch (workers started, first shards fetched, one batch decoded: the start-up,
which the expert stage overlaps with building and compiling its model; each worker here re-runs this script, torch
import included, where the trainer's re-run only ``ddm_trainer.cli``, which imports no torch) is timed apart; then the rest of epoch 0
(shards fetched and parsed, every image decoded once) and the later epochs. Reference: the DiT-S/2 stage's images/s that
``bench/stage_throughput.py`` recorded on this machine (run it first in the same command), else 5,500 images/s, the
DiT-S/2 rate on the H200 in BENCHMARKS.md; the target is a ratio >= 1.2. Needs only torch, numpy, pillow, pydantic and the trainer package.

    python bench/data_throughput.py --data /path/to/cifar10                        # the dir of cifar10-train-*.tar.gz
    python bench/data_throughput.py --workers 0,2 --epochs 2 --results-dir /tmp/r  # a quick CPU check
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))  # works without installing the project
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import RESULTS, record  # noqa: E402

from ddm_trainer.cluster_shards import ClusterShards, open_cluster_shards  # noqa: E402
from ddm_trainer.configs.cluster import ClusterConfig  # noqa: E402
from ddm_trainer.configs.common import DataConfig  # noqa: E402
from ddm_trainer.stages.cluster import run as run_cluster  # noqa: E402
from ddm_trainer.store import open_store  # noqa: E402
from ddm_trainer.train_loop import move_to  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared/datasets/cifar10"
CONSUMER_RATE = 5500.0  # images/s: DiT-S/2, 32 px, batch 256, one H200
TARGET_RATIO = 1.2


def cifar10_uri(data: str) -> str:
    """A directory means its CIFAR-10 train shards (it also holds the test shard); anything else is used as is."""
    return str(Path(data) / "cifar10-train-*.tar.gz") if Path(data).is_dir() else data


def consumer_rate(results_dir: str) -> tuple[float, str]:
    """The fastest consumer's images/s: DiT-S/2's stage rate measured on this machine, else the documented one."""
    import json

    from common import machine_name

    path = Path(results_dir) / "stage_throughput.json"
    if path.exists():
        for r in reversed(json.loads(path.read_text())):
            if r["metric"] == "DiT-S/2/stage_images_per_s" and r["machine"] == machine_name():
                return float(r["value"]), f"DiT-S/2 stage, measured {r['date']}"
    return CONSUMER_RATE, "DiT-S/2 on the H200 (BENCHMARKS.md)"


def cluster_run(run_dir: Path, data: DataConfig, num_clusters: int) -> None:
    """The cluster stage writes the per-cluster shards (a no-op when ``run_dir`` already has them)."""
    cfg = ClusterConfig(run_uri=str(run_dir), data=data, num_clusters=num_clusters, method="random",
                        examples_per_cluster=0, device="cpu")
    start = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # progress lines are for the operator
        run_cluster(cfg)
    print(f"cluster stage: {time.perf_counter() - start:.1f} s -> {run_dir}/clustering/shards", flush=True)


def measure(shards: ClusterShards, args: argparse.Namespace, workers: int, device: torch.device) -> dict[str, float]:
    """Seconds of each epoch of the expert's stream, consumed the way the Trainer does (a copy to the device)."""
    stream = shards.stream(args.batch, seed=0, prefetch=args.prefetch, workers=workers)
    epoch_s = []
    try:
        start = time.perf_counter()
        stream.start_workers()  # as the expert stage does, before it builds the model
        first = next(stream)
        first_s = time.perf_counter() - start  # start-up: workers up, first shards fetched, one batch decoded
        start = time.perf_counter()
        for epoch in range(args.epochs):
            for _ in range(stream.batches_per_epoch - (epoch == 0)):
                batch = next(stream)
                if device.type == "cuda":
                    move_to(batch, device)  # pinned, non-blocking: the Trainer's copy
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            epoch_s.append(now - start)
            start = now
    finally:
        stream.close()
    del first
    images = stream.batches_per_epoch * args.batch
    return {"first_batch_s": first_s, "epoch0": (images - args.batch) / epoch_s[0],
            "later": images * (len(epoch_s) - 1) / sum(epoch_s[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="directory of cifar10-train-*.tar.gz (or a shard glob / brace pattern)")
    parser.add_argument("--run-dir", default=None, help="run store to cluster into and read (default: a temp dir)")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--cluster", type=int, default=0, help="the cluster the expert reads")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=2, help="TrainerConfig.prefetch's default")
    parser.add_argument("--workers", default="0,2,4,8", help="decode worker counts (0: in the stream's thread)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per measurement (>= 2: the first is apart)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: epoch 0 is reported apart from the later ones")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference, reference_is = consumer_rate(args.results_dir)
    data = DataConfig(uri=cifar10_uri(args.data), image_size=32, channels=3)
    with tempfile.TemporaryDirectory(prefix="ddm-data-bench-") as tmp:
        run_dir = Path(args.run_dir or tmp)
        cluster_run(run_dir, data, args.clusters)
        shards = open_cluster_shards(open_store(str(run_dir)), args.cluster, data)
        if shards is None:
            raise SystemExit(f"{run_dir} has no cluster shards of {data.uri}")
        print(f"cluster {args.cluster}: {len(shards)} samples in {len(shards.shards)} shards; consumer on {device}")
        rows: list[tuple[int, dict[str, float]]] = []
        for workers in (int(w) for w in args.workers.split(",")):
            r = measure(shards, args, workers, device)
            rows.append((workers, r))
            setup = f"cifar10 32px, cluster {args.cluster} of {args.clusters}, batch {args.batch}, workers={workers}"
            record("data_throughput", f"data_throughput[{setup}, first batch]", round(r["first_batch_s"], 3), "s",
                   results_dir=args.results_dir)
            for phase, label in (("epoch0", "epoch 0 after the first batch"), ("later", "later epochs")):
                record("data_throughput", f"data_throughput[{setup}, {label}]", round(r[phase], 1), "images/s",
                       reference=round(reference, 1), results_dir=args.results_dir)
    print(f"\n{'workers':>7} {'first batch s':>14} {'epoch 0 img/s':>14} {'later img/s':>12} {'ratio (later)':>14}")
    for workers, r in rows:
        print(f"{workers:>7} {r['first_batch_s']:>14.2f} {r['epoch0']:>14.0f} {r['later']:>12.0f} "
              f"{r['later'] / reference:>14.2f}")
    print(f"reference {reference:.0f} images/s ({reference_is}), target ratio >= {TARGET_RATIO}")


if __name__ == "__main__":
    main()
