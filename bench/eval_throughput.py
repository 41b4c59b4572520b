"""The evaluate stage as users run it, against the ideal from the models' measured forward throughput.

Takes a finished run (experts and router committed; e.g. the one ``examples/cifar10-h200.yaml`` makes), copies it
without its evaluation, and runs ``ddm-train evaluate --config`` on it: FID-N (default 10,000) of each strategy,
bf16, GPU-sized batches, compiled experts and router, samples streamed into Inception. Then, in this process, the
forward throughput of one expert and of the router (compiled, bf16, the stage's batch size) is timed, and each
strategy's ideal time is N * (NFE * t_expert + steps * t_router): pure network time, no ODE arithmetic, routing,
Inception or start-up. ratio = ideal / measured (target >= 0.70). Images/s per strategy beside NFE and GFLOPs.

    python bench/eval_throughput.py --run /tmp/cifar10-run --data 'datasets/cifar10/cifar10-train-*.tar.gz'
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import RESULTS, machine_name, record  # noqa: E402

BENCHMARK = "eval_throughput"
TARGET = 0.70


def forward_seconds(model: torch.nn.Module, shape: tuple[int, ...], batch: int, num_classes: int | None,
                    device: torch.device, reps: int = 20) -> float:
    """Seconds per image of one bf16 forward at ``batch`` (compiled blocks warm)."""
    x = torch.randn(batch, *shape, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device) if num_classes else None
    args = (x, t, y) if y is not None else (x, t)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(3):
            model(*args)
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            model(*args)
        sync(device)
    return (time.perf_counter() - start) / (reps * batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(args: argparse.Namespace) -> tuple[Path, float]:
    """``ddm-train evaluate --config`` on a copy of the run without its evaluation: (the copy, wall seconds)."""
    work = Path(tempfile.mkdtemp(prefix="ddm-eval-bench-"))
    run = work / "run"
    shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("evaluation", "logs", "distill*", "report"))
    cfg = {"run_uri": str(run), "data": {"uri": args.data, "image_size": 32, "channels": 3, "class_field": "cls"},
           "strategies": args.strategies.split(","), "n_samples": args.n, "reference_n": args.n,
           "steps": args.steps, "precision": "bf16", "device": args.device,
           **({"batch_size": args.batch} if args.batch else {})}
    cfg_file = work / "evaluate.json"
    cfg_file.write_text(json.dumps(cfg))
    exe = shutil.which("ddm-train")
    start = time.perf_counter()
    subprocess.run([*([exe] if exe else [sys.executable, "-m", "ddm_trainer.cli"]), "evaluate", "--config",
                    str(cfg_file)], check=True)
    return run, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--data", help="the run's dataset.uri (reference images); not with --from-run")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strategies", default="full,top1,top-2,nucleus-0.9")
    parser.add_argument("--batch", type=int, default=None,
                        help="evaluation.batchSize; default: the stage's own choice, as users run it (about 1,024 "
                             "samples per expert call: routed strategies draw more at once)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu only checks that the benchmark runs (no compile, figures meaningless)")
    parser.add_argument("--from-run", action="store_true",
                        help="measure the evaluation the run already committed (ddm run's own stage, e.g. with "
                             "nothing beside it) instead of running the stage again on a copy")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not args.from_run and not args.data:
        parser.error("--data is needed to run the evaluation stage (or measure a committed one with --from-run)")
    from ddm_trainer.stages.sample import sampler_for
    from ddm_trainer.store import open_store

    device = torch.device(args.device)
    if args.from_run:
        run = Path(args.run)
        results = json.loads((run / "evaluation" / "results.json").read_text())
        wall = sum(row["seconds"] for row in results["table"])
        args.n = results["table"][0]["n"]
    else:
        run, wall = run_stage(args)
        results = json.loads((run / "evaluation" / "results.json").read_text())
    store = open_store(str(run))
    sampler, spec = sampler_for(store, "full", args.steps, "euler", device, precision="bf16",
                                 compile=device.type == "cuda")
    shape = (spec.channels, spec.image_size, spec.image_size)
    batch = args.batch or 1024  # the forward rate at the batch an expert call gets
    t_expert = forward_seconds(sampler.expert(0), shape, batch, spec.num_classes, device)
    t_router = forward_seconds(sampler.router(), shape, batch, None, device)
    machine, command = machine_name(), "python bench/eval_throughput.py " + " ".join(argv or sys.argv[1:])
    rec = lambda metric, value, unit, reference=None, **extra: _record(args.results_dir, metric, value, unit,  # noqa: E731
                                                                       reference, command, machine, extra)
    rec("expert_forward_images_per_s", 1 / t_expert, "images/s", None, preset=spec.preset, batch=batch)
    rec("router_forward_images_per_s", 1 / t_router, "images/s", None, batch=batch)
    rec("evaluate_stage_wall_s", wall, "s", None, n=args.n, strategies=args.strategies)
    print(f"\nexpert forward {1 / t_expert:.0f} images/s, router {1 / t_router:.0f} images/s (bf16, batch "
          f"{batch}); evaluate stage {wall:.0f} s for {len(results['table'])} strategies at N={args.n}")
    print(f"{'strategy':<12} {'FID':>7} {'NFE':>5} {'GFLOPs':>7} {'images/s':>9} {'s':>6} {'ideal s':>8} {'ratio':>6}")
    for row in results["table"]:
        ideal = args.n * (row["nfe"] * t_expert + args.steps * t_router)
        ratio = ideal / row["seconds"]
        ips = row["n"] / row["seconds"]
        rec(f"{row['strategy']}/images_per_s", ips, "images/s", None, nfe=row["nfe"],
            gflops_per_sample=row["gflops_per_sample"], n=row["n"])
        rec(f"{row['strategy']}/time_vs_ideal", ideal / row["seconds"], "ideal s / measured s", TARGET,
            measured_s=round(row["seconds"], 2), ideal_s=round(ideal, 2), reference_is="target",
            phases=row.get("phases", {}))
        rec(f"{row['strategy']}/fid{args.n // 1000}k", row["fid"], "FID", None, n=row["n"], steps=args.steps)
        print(f"{row['strategy']:<12} {row['fid']:>7.2f} {row['nfe']:>5.1f} {row['gflops_per_sample']:>7.1f} "
              f"{ips:>9.0f} {row['seconds']:>6.1f} {ideal:>8.1f} {ratio:>6.1%}")
    print("\nwhere each strategy's seconds went (rank 0): " + ", ".join(
        f"{r['strategy']}: " + " ".join(f"{k[:-2]} {v:.1f}" for k, v in r.get("phases", {}).items())
        for r in results["table"]))
    return 0


def _record(results_dir: str, metric: str, value: float, unit: str, reference: float | None, command: str,
            machine: str, extra: dict) -> None:
    record(BENCHMARK, metric, round(float(value), 4), unit, reference, None, command, machine, results_dir)
    if extra:
        path = Path(results_dir) / f"{BENCHMARK}.json"
        rows = json.loads(path.read_text())
        rows[-1].update(extra)
        path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
