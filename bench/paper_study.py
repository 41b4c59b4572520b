"""The paper's claims, through the product: each arm of the study is one ``ddm run`` of a generated spec.

Arms (``--arms``): ``features-K`` (k-means on encoder features, K experts) and ``random-K`` (a random partition,
the paper's ablation), each trained on the same total of images seen (``--images``: experts share it, K x steps x
batch = images), evaluated with the same sampler under every strategy. The first arm also trains the compute-matched
monolith (``spec.baseline``: one model of the experts' preset on all the data, the same images seen); the arm named
by ``--distil`` distils its ensemble into a dense student. The router's training is counted in the compute.

    python bench/paper_study.py --data "datasets/cifar10/cifar10-train-*.tar.gz" --images 1500000 \\
        --arms features-4,features-8,random-8 --n 10000 --work /tmp/study

Each arm's table (FID, NFE, GFLOPs per strategy), its stage wall times (the runner's "finished in" lines) and the
ratios DDM / monolith go to ``bench/results/paper_study.json`` and, as markdown, to stdout and ``--md``. An arm
whose run directory already holds a finished evaluation is read, not re-run (a lease that ends mid-study goes on).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, record  # noqa: E402

STRATEGIES = ["full", "top1", "top-2", "sample-2", "nucleus-0.9"]  # oracle-C is one expert alone: per cluster, not a mix
FINISHED = re.compile(r"\[ddm\] (\S+) finished in (\d+)s")


def arm_spec(args: argparse.Namespace, arm: str, monolith: bool, distil: bool) -> dict[str, Any]:
    """The spec of one arm: ``features-K`` or ``random-K``."""
    method, k = arm.rsplit("-", 1)
    if method not in ("features", "random") or not k.isdigit():
        raise SystemExit(f"--arms: {arm!r} is not features-K or random-K")
    k_int = int(k)
    expert_steps = max(args.images // (k_int * args.batch), 1)
    spec: dict[str, Any] = {
        "dataset": {"uri": args.data, "imageSize": args.image_size, "channels": args.channels, "classField": "cls",
                    "numClasses": args.num_classes},
        "clustering": {"encoder": args.encoder, "fineClusters": args.fine_clusters, "numClusters": k_int, "seed": 0,
                       "method": "kmeans" if method == "features" else "random"},
        "experts": {"modelPreset": args.preset, "steps": expert_steps, "batchSize": args.batch, "lr": args.lr,
                    "emaDecay": args.ema, "precision": args.precision, "checkpointEvery": max(expert_steps // 4, 1),
                    "classConditional": args.cfg > 0, "gpusPerNode": args.gpus},
        "router": {"preset": args.router_preset, "steps": args.router_steps, "batchSize": args.batch, "lr": args.lr,
                   "gpusPerNode": args.gpus},
        "evaluation": {"strategies": [s for s in args.strategies.split(",") if s], "numSamples": args.n,
                       "steps": args.sample_steps, "gpusPerNode": args.gpus,
                       **({"cfgScale": args.cfg} if args.cfg > 0 else {})},
        "storage": {"uri": str(Path(args.work) / arm / "store")},
        "parallelism": args.parallelism,
    }
    if monolith:
        spec["baseline"] = {"enabled": True}  # numClusters x experts.steps at the experts' batch: the same images
    if distil:
        spec["distillation"] = {"enabled": True, "studentPreset": args.preset, "steps": args.student_steps,
                                "batchSize": args.batch, "lr": args.lr}
    return {"apiVersion": "ddm.io/v1alpha1", "kind": "DecentralizedDiffusion",
            "metadata": {"name": f"study-{arm}"}, "spec": spec}


def run_arm(args: argparse.Namespace, arm: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``ddm run`` of the arm (unless already evaluated); its table and stage times."""
    run_dir = Path(args.work) / arm
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out_path = run_dir / "ddm-run.out"
    results = run_dir / "run" / "evaluation" / "results.json"  # --run-dir: the run's store and logs
    if not results.exists():
        cmd = [args.ddm, "run", str(spec_path), "--run-dir", str(run_dir / "run")]
        print(f"[study] {arm}: {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        with out_path.open("a") as out:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:  # the runner's own lines, shown and kept (stage times come from them)
                sys.stdout.write(f"  {arm}| {line}")
                out.write(line)
            code = proc.wait()
        if code != 0 or not results.exists():
            raise SystemExit(f"[study] {arm}: ddm run exited {code} without an evaluation; see {out_path}")
        (run_dir / "wall_s").write_text(f"{time.monotonic() - start:.1f}\n")
    stage_s = {m.group(1): float(m.group(2)) for m in FINISHED.finditer(out_path.read_text())}
    table = json.loads(results.read_text())["table"]
    wall = run_dir / "wall_s"
    return {"arm": arm, "table": table, "stage_s": stage_s,
            "wall_s": float(wall.read_text()) if wall.exists() else None,
            "images_seen": spec["spec"]["experts"]["steps"] * spec["spec"]["experts"]["batchSize"]
            * spec["spec"]["clustering"]["numClusters"]}


def markdown(arm: dict[str, Any], monolith_fid: float | None) -> str:
    experts_s = sum(s for k, s in arm["stage_s"].items() if k.startswith("expert-"))
    router_s = arm["stage_s"].get("router", 0.0)
    lines = [f"### {arm['arm']}: {arm['images_seen']:,} images seen by the experts; experts {experts_s:.0f} "
             f"stage-s, router {router_s:.0f} stage-s" + (f", monolith {arm['stage_s']['baseline']:.0f} stage-s"
                                                          if "baseline" in arm["stage_s"] else ""),
             "", "| strategy | FID | NFE | GFLOPs/sample | / monolith |", "|---|---:|---:|---:|---:|"]
    for row in arm["table"]:
        ratio = f"{row['fid'] / monolith_fid:.3f}" if monolith_fid and row.get("fid") is not None else "-"
        lines.append(f"| {row['strategy']} | {row['fid']:.2f} | {row.get('nfe', 0):.1f} | "
                     f"{row.get('gflops_per_sample', 0):,.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset.uri of every arm (shards with a cls key)")
    p.add_argument("--work", required=True, help="one folder per arm: spec, run store, logs")
    p.add_argument("--arms", default="features-4,features-8,random-8")
    p.add_argument("--distil", default="features-8", help="the arm whose ensemble is distilled ('' : none)")
    p.add_argument("--images", type=int, default=1_500_000, help="images seen by each arm's experts together")
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument("--router-preset", default="DiT-S/2")
    p.add_argument("--router-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--cfg", type=float, default=1.5, help="class-conditional experts with this guidance; 0: none")
    p.add_argument("--encoder", default="raw-pixels", help="clustering encoder of the features arms")
    p.add_argument("--fine-clusters", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--n", type=int, default=10_000, help="samples per strategy (FID-N)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--gpus", type=int, default=1, help="gpusPerNode of every stage (0: CPU)")
    p.add_argument("--parallelism", type=int, default=4)
    p.add_argument("--ddm", default="ddm")
    p.add_argument("--md", default=None, help="also write the markdown tables here")
    p.add_argument("--results-dir", default=str(RESULTS))
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    arms = [a for a in args.arms.split(",") if a]
    done = [run_arm(args, arm, arm_spec(args, arm, monolith=i == 0, distil=arm == args.distil))
            for i, arm in enumerate(arms)]
    monolith = next((r["fid"] for r in done[0]["table"] if r["strategy"] == "monolith"), None)
    report = "".join(markdown(a, monolith) for a in done)
    print(report)
    if args.md:
        Path(args.md).write_text(report)
    for a in done:
        for row in a["table"]:
            if row["strategy"] == "monolith" or row.get("fid") is None:
                continue
            record("paper_study", f"{a['arm']} {row['strategy']} FID-{row.get('n', args.n)} "
                   f"({a['images_seen']:,} images seen, {args.preset})", row["fid"], "FID",
                   reference=monolith, results_dir=args.results_dir)
    if monolith is not None:
        record("paper_study", f"monolith FID-{args.n} ({done[0]['images_seen']:,} images seen, {args.preset})",
               monolith, "FID", results_dir=args.results_dir)


if __name__ == "__main__":
    main()
