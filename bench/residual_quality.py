"""Does a bf16 residual stream (train.residual_precision bf16) train as well as the default fp32 one?

The same expert stage twice through ``ddm-train expert --config`` on one cluster of the CIFAR-10 shards, from the
same seed and the same data order, once with each setting; the training losses of both are read from the committed
final weights (``losses.json``). Reported: the mean loss of the last ``--window`` steps of each, and bf16 / fp32
(1.0: no loss of quality visible in the objective; the flow-matching loss at a fixed seed is what the step optimises,
so a stream that rounds too coarsely shows as a higher plateau). The speed side is ``bench/expert_throughput.py
--residual bf16`` and ``bench/stage_throughput.py --residual bf16``.

    python bench/residual_quality.py --data datasets/cifar10 --preset DiT-T/4 --steps 600 --batch 64 --device cpu
    python bench/residual_quality.py --data /tmp/datasets/cifar10 --preset DiT-XL/2 --steps 400 --batch 256  # GPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import RESULTS, machine_name, record  # noqa: E402
from stage_throughput import run_stage  # noqa: E402

from ddm_trainer import layout  # noqa: E402
from ddm_trainer.store import open_store  # noqa: E402

BENCHMARK = "residual_quality"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dir of cifar10-train-*.tar.gz shards (or a glob)")
    parser.add_argument("--preset", default="DiT-T/4")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--window", type=int, default=0, help="steps averaged at the end (default: the last quarter)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default=None)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    data = args.data if "*" in args.data else str(Path(args.data) / "cifar10-train-*.tar.gz")
    work = Path(args.work or tempfile.mkdtemp(prefix="ddm-residual-"))
    work.mkdir(parents=True, exist_ok=True)
    run_uri = str(work / "run")
    data_cfg = {"uri": data, "image_size": 32, "channels": 3, "class_field": "cls"}
    run_stage("cluster", {"run_uri": run_uri, "data": data_cfg, "method": "random", "num_clusters": 2,
                          "device": args.device}, work, "cluster")
    window = args.window or max(1, args.steps // 4)
    means: dict[str, float] = {}
    for residual in ("fp32", "bf16"):
        uri = f"{run_uri}-{residual}"
        shutil.copytree(run_uri, uri, dirs_exist_ok=True)  # the same clusters, a run of its own
        cfg = {"run_uri": uri, "data": data_cfg, "cluster_index": 0, "model": args.preset, "class_cond": True,
               "num_classes": 10, "device": args.device, "sample_grid": {"count": 0},
               "train": {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "precision": "bf16",
                         "ckpt_every": 10**9, "log_every": 50, "ema_decay": 0.999, "residual_precision": residual}}
        run_stage("expert", cfg, work, f"expert-{residual}")
        losses = json.loads(open_store(uri).read_committed(layout.final(layout.expert(0)), "losses.json"))
        means[residual] = statistics.fmean(losses[-window:])
        print(f"residual {residual}: mean loss of the last {window} of {len(losses)} steps {means[residual]:.5f}",
              flush=True)
    command = "python bench/residual_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = f"{args.preset} batch {args.batch} {args.steps} steps"
    record(BENCHMARK, f"{tag}/final_loss_residual_fp32", means["fp32"], "loss", None, None, command,
           machine_name(), args.results_dir)
    record(BENCHMARK, f"{tag}/final_loss_residual_bf16", means["bf16"], "loss", means["fp32"], None, command,
           machine_name(), args.results_dir)
    print(f"bf16 / fp32 residual: {means['bf16'] / means['fp32']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
