"""The paper's claims, through the product: each arm of the study is one ``ddm run`` of a generated spec.

Arms (``--arms``): ``features-K`` (k-means on encoder features, K experts) and ``random-K`` (a random partition, the
paper's ablation), each trained on the same total of images seen (``--images``: experts share it, K x steps x batch =
images; ``features-K-bB``: experts of batch B, so more steps each on the same images; ``features-K-lite0``: k-means
on EfficientNet-Lite0 features instead of ``--encoder``'s, e.g. ``features-8-b32-lite0``; ``...-prop``: each expert's
steps in proportion to its cluster's size, ``experts.stepsAllocation: proportional``), evaluated with the same sampler
under every strategy. The arm named by ``--monolith`` (default: the first) also trains the compute-matched monolith
(``spec.baseline``: one model of the experts' preset on all the data, the same images seen); the arm named by
``--distil`` distils its ensemble into a dense student. The router's training is counted in the compute. The arm named
by ``--equal-steps-monolith`` trains, as its baseline, one model for the experts' own step count (row
``monolith-<steps>-steps``): the control that tells experts short of optimizer steps from experts that do not help.

    python bench/paper_study.py --data "datasets/cifar10/cifar10-train-*.tar.gz" --images 1500000 \\
        --arms features-4,features-8,random-8 --n 10000 --work /tmp/study

Each arm's table (FID, NFE, GFLOPs per strategy, a link to its sample grid), its stage wall times (the runner's
"finished in" lines) and the ratios DDM / monolith go to ``bench/results/paper_study.json`` and, as markdown, to
stdout and ``--md``; then the paper's targets, each with its measured ratio (the distilled student's row is the one
the product adds to the distilled arm's table once distillation commits); then independence: each expert trained as
a separate process, its seconds and GPU-seconds from the run's logs (``logs/<stage>.log`` says when each attempt was
launched, ``logs/<stage>.progress.jsonl`` when it last reported), against the monolith's. Each strategy's sample grid
(the evaluation's 8x8, ``grids/<strategy>.png``) is copied to ``--grids`` as ``<arm>-<strategy>.png``, beside
``fid_vs_steps.png``: every monolith, top-1 and student at its own model's optimizer steps (is the regime step-bound?).
An arm whose run directory already holds a finished evaluation (with the student's row where it distils) is read,
not re-run (a lease that ends mid-study goes on: ``ddm run`` resumes an unfinished one). ``--deadline-s`` stops
ddm run in time (its stages checkpoint; exit 75) so one device command never runs over; the same command goes on.
Each finished arm is also saved as ``<results-dir>/paper_study_arms/<arm>.json``: ``--arms-from`` reads arms run
elsewhere (another device lease), so the tables of arms from several leases are assembled in one place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, get_args

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))  # works without installing the project
from common import RESULTS, record  # noqa: E402

from ddm_trainer.configs.expert import CompileMode  # noqa: E402

STRATEGIES = ["full", "top1", "top-2", "sample-2", "nucleus-0.9"]  # oracle-C is one expert alone: per cluster, not a mix
ARM = re.compile(r"^(features|random)-(\d+)(?:-b(\d+))?(?:-(lite0))?(-prop)?$")  # e.g. features-8-b32-lite0-prop
ENCODERS = {"lite0": "efficientnet_lite0"}  # an arm's encoder suffix -> clustering.encoder (others: --encoder)
FINISHED = re.compile(r"\[ddm\] (\S+) finished in (\d+)s")
ATTEMPT = re.compile(r"^=== attempt \d+: .* \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\)$")  # the runner's launch line
MONOLITH, STUDENT = "monolith", "student"  # the evaluation table's rows of spec.baseline and spec.distillation


class Arm(NamedTuple):
    method: str  # features | random
    k: int
    batch: int | None  # the experts' batch (None: --batch)
    encoder: str | None  # clustering.encoder of a features arm (None: --encoder)
    proportional: bool = False  # experts.stepsAllocation proportional: steps by cluster size

    @property
    def variant(self) -> bool:
        """Not the study's plain arm: its own target rows, never the paper's K=8 row."""
        return self.batch is not None or self.encoder is not None or self.proportional


def parse_arm(arm: str) -> Arm:
    """``features-K`` / ``random-K`` (experts at --batch) or ``...-bB``: the same images seen by experts of batch B,
    so each makes --batch/B times the steps (the study's test of experts short of optimizer steps, not of data), at
    --lr x sqrt(B / --batch); ``...-lite0``: clusters of EfficientNet-Lite0 features (a features arm only);
    ``...-prop``: each expert's steps in proportion to its cluster's size (the same total)."""
    m = ARM.match(arm)
    if not m or (m.group(1) == "random" and m.group(4)):
        raise SystemExit(f"--arms: {arm!r} is not features-K or random-K (optionally -bB: experts' batch B; then "
                         f"-lite0 for a features arm clustered on EfficientNet-Lite0 features; then -prop for "
                         f"experts' steps in proportion to their clusters' sizes)")
    return Arm(m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None,
               ENCODERS[m.group(4)] if m.group(4) else None, bool(m.group(5)))


def arm_spec(args: argparse.Namespace, arm: str, monolith: bool, distil: bool,
             equal_steps: bool = False) -> dict[str, Any]:
    """The spec of one arm: ``features-K`` or ``random-K``; ``equal_steps``: its baseline is one model trained for
    the experts' own step count (1/K of the compute-matched monolith's images), the control that tells experts
    short of steps from experts that do not help."""
    method, k_int, expert_batch, encoder, proportional = parse_arm(arm)
    encoder = encoder or args.encoder
    batch = expert_batch or args.batch
    # Adam's square-root rule (Malladi et al. 2022): lr x sqrt(B / --batch) keeps the update noise of --batch's lr,
    # so a -bB arm changes the number of steps, not how noisy each is
    lr = args.lr * math.sqrt(batch / args.batch)
    expert_steps = max(args.images // (k_int * batch), 1)
    spec: dict[str, Any] = {
        "dataset": {"uri": args.data, "imageSize": args.image_size, "channels": args.channels, "classField": "cls",
                    "numClasses": args.num_classes},
        "clustering": {"encoder": encoder, "fineClusters": args.fine_clusters, "numClusters": k_int, "seed": 0,
                       "method": "kmeans" if method == "features" else "random",
                       **({"encoderWeights": args.encoder_weights[encoder]}
                          if encoder in args.encoder_weights and method == "features" else {})},
        "experts": {"modelPreset": args.preset, "steps": expert_steps, "batchSize": batch, "lr": lr,
                    "emaDecay": args.ema, "precision": args.precision, "checkpointEvery": max(expert_steps // 4, 1),
                    "classConditional": args.cfg > 0, "gpusPerNode": args.gpus,
                    **({"stepsAllocation": "proportional"} if proportional else {}),
                    **({"compileMode": args.compile_mode} if args.compile_mode != "default" else {})},
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
    elif equal_steps:
        spec["baseline"] = {"enabled": True, "steps": expert_steps}
    if distil:
        spec["distillation"] = {"enabled": True, "studentPreset": args.preset, "steps": args.student_steps,
                                "batchSize": args.batch, "lr": args.lr, "teacher": args.teacher}
    return {"apiVersion": "ddm.io/v1alpha1", "kind": "DecentralizedDiffusion",
            "metadata": {"name": f"study-{arm}"}, "spec": spec}


class Deadline(Exception):
    """``--deadline-s`` passed: ddm run was stopped (its stages checkpointed); the same command goes on."""


def run_arm(args: argparse.Namespace, arm: str, spec: dict[str, Any], deadline: float = math.inf) -> dict[str, Any]:
    """``ddm run`` of the arm (unless already evaluated); its table and stage times. At ``deadline`` (monotonic
    seconds) ddm run is interrupted as Ctrl-C does: every stage checkpoints and stops, and ``Deadline`` is raised."""
    run_dir = Path(args.work) / arm
    results = run_dir / "run" / "evaluation" / "results.json"  # --run-dir: the run's store and logs
    saved = Path(args.arms_from) / f"{arm}.json" if args.arms_from else None
    if saved is not None and saved.exists() and not results.exists():  # run elsewhere (another device lease)
        return dict(json.loads(saved.read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out_path = run_dir / "ddm-run.out"
    if not evaluated(results, distil="distillation" in spec["spec"]):
        cmd = [args.ddm, "run", str(spec_path), "--run-dir", str(run_dir / "run")]
        print(f"[study] {arm}: {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        if start >= deadline:
            raise Deadline(f"{arm} not started")
        with out_path.open("a") as out:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            stop = threading.Timer(deadline - start, proc.send_signal, (signal.SIGINT,)) \
                if deadline < math.inf else None
            if stop:
                stop.start()
            try:
                for line in proc.stdout:  # the runner's own lines, shown and kept (stage times come from them)
                    sys.stdout.write(f"  {arm}| {line}")
                    out.write(line)
                code = proc.wait()
            finally:
                if stop:
                    stop.cancel()
        wall = run_dir / "wall_s"  # over every invocation of the arm
        wall.write_text(f"{(float(wall.read_text()) if wall.exists() else 0.0) + time.monotonic() - start:.1f}\n")
        if code == 130 and time.monotonic() >= deadline:
            raise Deadline(f"{arm} stopped after its stages checkpointed")
        if code != 0 or not evaluated(results, distil="distillation" in spec["spec"]):
            raise SystemExit(f"[study] {arm}: ddm run exited {code} without an evaluation; see {out_path}")
    stage_s = {m.group(1): float(m.group(2)) for m in FINISHED.finditer(out_path.read_text())}
    table = json.loads(results.read_text())["table"]
    if steps := (spec["spec"].get("baseline") or {}).get("steps"):  # not the compute-matched monolith: say so
        table = [dict(r, strategy=equal_steps_row(steps), grid=MONOLITH) if r["strategy"] == MONOLITH else r
                 for r in table]
    wall = run_dir / "wall_s"
    out = {"arm": arm, "table": table, "stage_s": stage_s,
           "wall_s": float(wall.read_text()) if wall.exists() else None,
           "images_seen": spec["spec"]["experts"]["steps"] * spec["spec"]["experts"]["batchSize"]
           * spec["spec"]["clustering"]["numClusters"],
           "independence": independence(run_dir / "run" / "logs", spec["spec"]), "spec": spec["spec"]}
    arms_dir = Path(args.results_dir) / "paper_study_arms"  # what --arms-from reads where the run is not
    arms_dir.mkdir(parents=True, exist_ok=True)
    (arms_dir / f"{arm}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def equal_steps_row(steps: int) -> str:
    """The table row of a monolith trained for the experts' own step count (``--equal-steps-monolith``)."""
    return f"{MONOLITH}-{steps}-steps"


def evaluated(results: Path, distil: bool) -> bool:
    """The run's evaluation is committed, with the student's row when the arm distils (the product adds it in a
    second evaluation once distillation commits)."""
    if not results.exists():
        return False
    return not distil or any(r["strategy"] == STUDENT for r in json.loads(results.read_text())["table"])


def process_spans(logs: Path, stage_id: str) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of each attempt of one stage's process: launched at the runner's ``=== attempt``
    line of ``<id>.log`` (local time, whole seconds), ended at its last event in ``<id>.progress.jsonl``."""
    log, progress = logs / f"{stage_id}.log", logs / f"{stage_id}.progress.jsonl"
    if not log.exists() or not progress.exists():
        return []
    starts = [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
              for line in log.read_text(errors="replace").splitlines() if (m := ATTEMPT.match(line))]
    times = sorted(json.loads(line)["time"] for line in progress.read_text().splitlines() if line.strip())
    spans = []
    for i, start in enumerate(starts):
        until = starts[i + 1] if i + 1 < len(starts) else math.inf
        ends = [t for t in times if start <= t < until]
        if ends:
            spans.append((start, ends[-1]))
    return spans


def _union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one span (the wall clock of processes that ran side by side)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _images_per_s(logs: Path, stage_id: str) -> float | None:
    """The mean training rate a stage's process reported (its progress events' images_per_s)."""
    path = logs / f"{stage_id}.progress.jsonl"
    rates = [e["images_per_s"] for e in map(json.loads, path.read_text().splitlines() if path.exists() else [])
             if e.get("event") == "progress" and isinstance(e.get("images_per_s"), (int, float))]
    return sum(rates) / len(rates) if rates else None


def independence(logs: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The experts as K separate processes against the monolith's one: process seconds, GPU-seconds (seconds x the
    GPUs each process held), the wall clock here (side by side, ``parallelism`` at a time) and were each expert on
    its own GPUs (the longest one), and each process's training rate. None when the logs are not there."""
    experts = spec["experts"]
    gpus = max(int(experts.get("gpusPerNode", 1)), 1) * int(experts.get("nodes", 1))
    spans = {f"expert-{k:03d}": process_spans(logs, f"expert-{k:03d}")
             for k in range(int(spec["clustering"]["numClusters"]))}
    if not all(spans.values()):
        return None
    seconds = {key: sum(e - s for s, e in v) for key, v in spans.items()}
    out: dict[str, Any] = {
        "gpus_per_process": gpus, "parallelism": spec.get("parallelism"),
        "experts_process_s": sum(seconds.values()), "experts_gpu_s": sum(seconds.values()) * gpus,
        "experts_wall_s": _union_s([x for v in spans.values() for x in v]), "longest_expert_s": max(seconds.values()),
        "expert_s": seconds, "expert_images_per_s": {key: _images_per_s(logs, key) for key in spans}}
    router = process_spans(logs, "router")
    if router:
        router_gpus = max(int(spec["router"].get("gpusPerNode", 1)), 1)
        out["router_s"] = sum(e - s for s, e in router)
        out["router_gpu_s"] = out["router_s"] * router_gpus
    baseline = process_spans(logs, "baseline")
    if baseline and not (spec.get("baseline") or {}).get("steps"):  # the compute-matched one only
        out["monolith_s"] = sum(e - s for s, e in baseline)
        out["monolith_gpu_s"] = out["monolith_s"] * gpus
        out["monolith_images_per_s"] = _images_per_s(logs, "baseline")
    return out


def copy_grids(arm: dict[str, Any], run_dir: Path, grids: Path) -> dict[str, Path]:
    """Each row's sample grid (the evaluation's grids/<row>.png) copied to ``grids/<arm>-<row>.png`` (an arm read
    from --arms-from links the grids already there)."""
    grids.mkdir(parents=True, exist_ok=True)
    out = {}
    for row in arm["table"]:
        name, src_name = (row["strategy"].replace(":", "-"), row.get("grid", row["strategy"]).replace(":", "-"))
        src, dst = run_dir / "run" / "evaluation" / "grids" / f"{src_name}.png", grids / f"{arm['arm']}-{name}.png"
        if src.exists():
            shutil.copyfile(src, dst)
        if dst.exists():
            out[row["strategy"]] = dst
    return out


def href(path: Path, links_from: Path, links: str | None) -> str:
    """A committed picture's link in the markdown: the ``--links`` prefix + its name, else relative to the markdown."""
    return f"{links.rstrip('/')}/{path.name}" if links else os.path.relpath(path, links_from)


def markdown(arm: dict[str, Any], monolith_fid: float | None, grids: dict[str, Path] | None = None,
             links_from: Path = Path.cwd(), links: str | None = None) -> str:
    # a resumed stage's "finished in" line times its last attempt only; the logs span every attempt
    ind, stage_s = arm.get("independence") or {}, arm["stage_s"]
    experts_s = ind.get("experts_process_s", sum(s for k, s in stage_s.items() if k.startswith("expert-")))
    router_s = ind.get("router_s", stage_s.get("router", 0.0))
    monolith_s = ind.get("monolith_s", stage_s.get("baseline"))
    steps = ((arm.get("spec") or {}).get("baseline") or {}).get("steps")  # the equal-steps control, if that
    baseline = equal_steps_row(steps) if steps else MONOLITH
    lines = [f"### {arm['arm']}: {arm['images_seen']:,} images seen by the experts; experts {experts_s:.0f} "
             f"stage-s, router {router_s:.0f} stage-s" + (f", {baseline} {monolith_s:.0f} stage-s"
                                                          if monolith_s is not None else ""),
             "", "| strategy | FID | NFE | GFLOPs/sample | / monolith | samples |", "|---|---:|---:|---:|---:|---|"]
    for row in arm["table"]:
        ratio = f"{row['fid'] / monolith_fid:.3f}" if monolith_fid and row.get("fid") is not None else "-"
        grid = (grids or {}).get(row["strategy"])
        link = f"[8x8]({href(grid, links_from, links)})" if grid else "-"
        lines.append(f"| {row['strategy']} | {row['fid']:.2f} | {row.get('nfe', 0):.1f} | "
                     f"{row.get('gflops_per_sample', 0):,.1f} | {ratio} | {link} |")
    return "\n".join(lines) + "\n"


def _row(arm: dict[str, Any] | None, strategy: str) -> dict[str, Any] | None:
    return next((r for r in arm["table"] if r["strategy"] == strategy and r.get("fid") is not None), None) \
        if arm else None


def targets(done: list[dict[str, Any]], monolith: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The paper's targets at its scale, each with the measured ratio (None where the study lacks the arms)."""
    arms = {a["arm"]: a for a in done}
    k_max = max((arm.k for a in arms if (arm := parse_arm(a)).method == "features" and not arm.variant), default=8)
    features, random = arms.get(f"features-{k_max}"), arms.get(f"random-{k_max}")
    out = []

    def add(target: str, measured: str, ratio: float | None, limit: float,
            arm: dict[str, Any] | None = None) -> None:  # arm: whose images seen the record names
        out.append({"target": target, "measured": measured, "ratio": ratio, "limit": limit,
                    "met": None if ratio is None else ratio <= limit,
                    "images_seen": (arm or features or done[0]).get("images_seen") if done else None})

    top1 = _row(features, "top1")
    add(f"DDM K={k_max} top-1 FID <= 0.9 x the compute-matched monolith's",
        f"top-1 {top1['fid']:.2f}, monolith {monolith['fid']:.2f}" if top1 and monolith else "-",
        top1["fid"] / monolith["fid"] if top1 and monolith else None, 0.9)
    for a in done:  # variants: experts of a smaller batch on the same images (-bB), other clusters' encoder (-lite0)
        t1, arm = _row(a, "top1"), parse_arm(a["arm"])
        what = ", ".join(([f"experts at batch {arm.batch}"] if arm.batch else [])
                         + ([f"clusters of {arm.encoder}"] if arm.encoder else [])
                         + (["steps by cluster size"] if arm.proportional else []))
        if arm.variant and t1 and monolith:
            add(f"{a['arm']}: top-1 FID <= 0.9 x the compute-matched monolith's ({what})",
                f"top-1 {t1['fid']:.2f}, monolith {monolith['fid']:.2f}", t1["fid"] / monolith["fid"], 0.9, a)
    rand = _row(random, "top1")
    add(f"feature clusters better than a random partition (K={k_max}, top-1)",
        f"features {top1['fid']:.2f}, random {rand['fid']:.2f}" if top1 and rand else "-",
        top1["fid"] / rand["fid"] if top1 and rand else None, 1.0)
    for a in done:
        t1, full = _row(a, "top1"), _row(a, "full")
        if t1 and full:
            flops = t1["gflops_per_sample"] / full["gflops_per_sample"] if full.get("gflops_per_sample") else None
            add(f"{a['arm']}: top-1 no worse than full, at a fraction of its FLOPs",
                f"top-1 {t1['fid']:.2f}, full {full['fid']:.2f}" + (f"; FLOPs {flops:.2f} x full's" if flops else ""),
                t1["fid"] / full["fid"], 1.0, a)
    # a diagnostic, not a paper target: the experts against one model of their own step count, trained by any arm
    # (random-8's control serves features-8 too: the same steps, from --equal-steps-monolith)
    controls = {r["strategy"]: r for a in done for r in a["table"]
                if r["strategy"].startswith(f"{MONOLITH}-") and r.get("fid") is not None}
    for a in done:
        t1, steps = _row(a, "top1"), a.get("spec", {}).get("experts", {}).get("steps")
        short = controls.get(f"{MONOLITH}-{steps}-steps") or next(
            (r for r in a["table"] if r["strategy"].startswith(f"{MONOLITH}-") and r.get("fid")), None)
        if t1 and short:
            add(f"{a['arm']}: top-1 better than one model at the experts' own steps (diagnostic)",
                f"top-1 {t1['fid']:.2f}, {short['strategy']} {short['fid']:.2f}", t1["fid"] / short["fid"], 1.0, a)
    for a in done:  # a diagnostic: what routing costs against the perfect assignment of the mixture oracle
        t1, oracle = _row(a, "top1"), _row(a, "oracle")
        if t1 and oracle:
            add(f"{a['arm']}: top-1 no worse than the mixture oracle, the router's cost (diagnostic)",
                f"top-1 {t1['fid']:.2f}, oracle {oracle['fid']:.2f}", t1["fid"] / oracle["fid"], 1.0, a)
    distilled = next((a for a in done if _row(a, STUDENT)), None)
    student = _row(distilled, STUDENT)
    add("distilled student within 10% of the monolith",
        (f"student {student['fid']:.2f} ({student['gflops_per_sample']:,.1f} GFLOPs/sample), monolith "
         f"{monolith['fid']:.2f} ({monolith['gflops_per_sample']:,.1f})") if student and monolith else "-",
        student["fid"] / monolith["fid"] if student and monolith else None, 1.1, distilled)
    return out


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["### Targets (the paper's, at its scale)", "", "| target | measured | ratio | limit | met |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        lines.append(f"| {r['target']} | {r['measured']} | {ratio} | {r['limit']} | {met} |")
    return "\n".join(lines) + "\n"


class StepsPoint(NamedTuple):
    """One model's FID against its optimizer steps: the evidence for (or against) a step-bound regime."""

    label: str
    kind: str  # "monolith", "ddm" (top-1; steps and batch of one expert, the mean under -prop) or "student"
    steps: int
    batch: int
    fid: float


def steps_points(done: list[dict[str, Any]]) -> list[StepsPoint]:
    """Every monolith row (compute-matched or equal-steps), each arm's top-1 and each student, with the optimizer
    steps and batch of one model as its spec sets them: the monolith numClusters x experts.steps unless
    ``baseline.steps``; an expert ``experts.steps`` (under ``stepsAllocation: proportional`` the experts' mean);
    the student ``distillation.steps``."""
    points = []
    for a in done:
        spec = a.get("spec") or {}
        experts, k = spec.get("experts") or {}, (spec.get("clustering") or {}).get("numClusters")
        if not experts or not k:
            continue
        distil = spec.get("distillation") or {}
        for row in a["table"]:
            if row.get("fid") is None:
                continue
            name = row["strategy"]
            if name == MONOLITH or name.startswith(f"{MONOLITH}-"):
                steps = (spec.get("baseline") or {}).get("steps") or k * experts["steps"]
                points.append(StepsPoint(f"monolith ({a['arm']})", "monolith", steps, experts["batchSize"],
                                         row["fid"]))
            elif name == "top1":
                points.append(StepsPoint(f"{a['arm']} top-1", "ddm", experts["steps"], experts["batchSize"],
                                         row["fid"]))
            elif name == STUDENT and distil:
                points.append(StepsPoint(f"student of {a['arm']}", "student", distil["steps"], distil["batchSize"],
                                         row["fid"]))
    return points


def steps_plot(points: list[StepsPoint], path: Path) -> Path | None:
    """FID against optimizer steps per model (log-log), the monoliths joined by a line; None without points."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8, 5.5))
    mono = sorted((p for p in points if p.kind == "monolith"), key=lambda p: p.steps)
    if len(mono) > 1:
        ax.plot([p.steps for p in mono], [p.fid for p in mono], "k--", lw=1, zorder=1)
    style = {"monolith": ("s", "black", "one model on all the data"), "ddm": ("o", "tab:blue", "DDM top-1"),
             "student": ("^", "tab:red", "distilled student")}
    for kind, (marker, color, name) in style.items():
        ps = [p for p in points if p.kind == kind]
        if ps:
            ax.scatter([p.steps for p in ps], [p.fid for p in ps], s=[30 + p.batch / 2 for p in ps],
                       marker=marker, color=color, label=name, zorder=2)
    placed: list[StepsPoint] = []
    for p in sorted(points, key=lambda p: (p.steps, -p.fid)):
        # points within ~10% of each other in both axes get their labels stacked downwards, not on top of each other
        near = sum(abs(math.log(q.steps / p.steps)) < 0.1 and abs(math.log(q.fid / p.fid)) < 0.1 for q in placed)
        placed.append(p)
        ax.annotate(f"{p.label}, b{p.batch}: {p.fid:.1f}", (p.steps, p.fid), textcoords="offset points",
                    xytext=(8, 2 - 11 * near), fontsize=7)
    steps = [p.steps for p in points]
    ax.set(xscale="log", yscale="log", xlim=(min(steps) / 1.3, max(steps) * 3.5),
           xlabel="optimizer steps of one model (DDM: one expert)", ylabel="FID-10k",
           title="FID against each model's optimizer steps")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks([t for t in (500, 1000, 2000, 5000, 10000, 20000) if min(steps) / 1.3 <= t <= max(steps) * 3.5])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", title="marker area ~ batch", title_fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def independence_markdown(done: list[dict[str, Any]]) -> str:
    """Experts as separate processes against the monolith (the first arm trains it)."""
    mono = next((a["independence"] for a in done if a["independence"] and "monolith_s" in a["independence"]), None)
    lines = ["### Independence: experts as separate processes against the monolith", "",
             "Seconds of each process from the run's logs (launched: logs/<stage>.log; last report: "
             "logs/<stage>.progress.jsonl); GPU-seconds = seconds x the GPUs a process held (processes sharing one "
             "card, parallelism > 1 on one GPU, each count their whole time: measure GPU-seconds at parallelism 1). "
             "The longest expert is the wall clock were each expert on its own GPUs.", "",
             "| arm | experts x GPUs | expert s (sum) | longest expert s | wall s here (parallelism) | "
             "experts + router GPU-s | monolith GPU-s | GPU-s ratio | longest expert / monolith s | "
             "images/s per expert / monolith |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in done:
        ind = a["independence"]
        if not ind:
            lines.append(f"| {a['arm']} | no process logs | | | | | | | | |")
            continue
        ddm_gpu_s = ind["experts_gpu_s"] + ind.get("router_gpu_s", 0.0)
        rates = [r for r in ind["expert_images_per_s"].values() if r]
        rate = sum(rates) / len(rates) if rates else None
        m_rate = mono.get("monolith_images_per_s") if mono else None
        lines.append(
            f"| {a['arm']} | {len(ind['expert_s'])} x {ind['gpus_per_process']} | {ind['experts_process_s']:.0f} | "
            f"{ind['longest_expert_s']:.0f} | {ind['experts_wall_s']:.0f} ({ind['parallelism']}) | {ddm_gpu_s:.0f} | "
            + (f"{mono['monolith_gpu_s']:.0f} | {ddm_gpu_s / mono['monolith_gpu_s']:.3f} | "
               f"{ind['longest_expert_s'] / mono['monolith_s']:.3f} | " if mono else "- | - | - | ")
            + (f"{rate:,.0f} / {m_rate:,.0f} |" if rate and m_rate else "- |"))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset.uri of every arm (shards with a cls key)")
    p.add_argument("--work", required=True, help="one folder per arm: spec, run store, logs")
    p.add_argument("--arms", default="features-4,features-8,random-8")
    p.add_argument("--distil", default="features-8", help="the arm whose ensemble is distilled ('' : none)")
    p.add_argument("--monolith", default=None, help="the arm that also trains the compute-matched monolith "
                                                      "(default: the first of --arms; keep it the same when arms "
                                                      "are run by separate commands)")
    p.add_argument("--equal-steps-monolith", default="",
                   help="an arm (not --monolith's) whose baseline trains for the experts' own steps: its row "
                        "monolith-<steps>-steps is the control for experts short of steps")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop ddm run after this many seconds (its stages checkpoint) and exit 75; the same "
                        "command goes on from there")
    p.add_argument("--images", type=int, default=1_500_000, help="images seen by each arm's experts together")
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument("--router-preset", default="DiT-S/2")
    p.add_argument("--router-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=1000)
    p.add_argument("--teacher", default="ensemble", choices=["ensemble", "expert-of-cluster"],
                   help="distillation.teacher: the routed ensemble, or each image's own cluster expert (the paper's; "
                        "one expert per image, about 1/K of the ensemble's teacher work)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile-mode", default="default",
                   choices=get_args(CompileMode), help="experts.compileMode of every arm (reduce-overhead: CUDA graphs, for the -bB arms' small "
                        "batches)")
    p.add_argument("--cfg", type=float, default=1.5, help="class-conditional experts with this guidance; 0: none")
    p.add_argument("--encoder", default="raw-pixels", help="clustering encoder of the features arms")
    p.add_argument("--encoder-weights", action="append", default=[], metavar="ENCODER=PATH",
                   help="clustering.encoderWeights of the arms clustered with ENCODER (e.g. efficientnet_lite0=a "
                        "state dict; default: the encoder's own)")
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
    p.add_argument("--md", default=None, help="also write the markdown tables here (grid links relative to it)")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--grids", default=str(RESULTS / "paper_study"),
                   help="where each arm's sample grids are copied (<arm>-<strategy>.png)")
    p.add_argument("--links", default=None, help="the markdown's grid links: this prefix + the file name (default: "
                                                   "the path relative to --md); e.g. bench/results/paper_study")
    p.add_argument("--arms-from", default=None,
                   help="a folder of <arm>.json (--results-dir/paper_study_arms of an earlier run, e.g. another "
                        "device lease's): an arm whose run directory holds no evaluation is read from there")
    args = p.parse_args(argv)
    pairs = [w.partition("=") for w in args.encoder_weights]
    if bad := [w for w, (name, eq, path) in zip(args.encoder_weights, pairs) if not (name and eq and path)]:
        p.error(f"--encoder-weights {bad[0]!r}: expected ENCODER=PATH, e.g. efficientnet_lite0=/tmp/lite0.pt")
    args.encoder_weights = {name: path for name, _, path in pairs}
    return args


def main() -> None:
    args = parse_args()

    arms = [a for a in args.arms.split(",") if a]
    with_monolith = args.monolith or arms[0]
    if args.equal_steps_monolith and args.equal_steps_monolith == with_monolith:
        raise SystemExit(f"--equal-steps-monolith {args.equal_steps_monolith}: that arm trains the compute-matched "
                         "monolith (--monolith); name another")
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else math.inf
    try:
        done = [run_arm(args, arm, arm_spec(args, arm, monolith=arm == with_monolith, distil=arm == args.distil,
                                            equal_steps=arm == args.equal_steps_monolith), deadline)
                for arm in arms]
    except Deadline as stopped:
        print(f"[study] --deadline-s {args.deadline_s:.0f} reached: {stopped}; run the same command again to go on",
              flush=True)
        sys.exit(75)  # EX_TEMPFAIL
    done.sort(key=lambda a: a["arm"] != with_monolith)  # the monolith's arm first: the ratios are to its row
    monolith_row = _row(done[0], MONOLITH)
    monolith = monolith_row["fid"] if monolith_row else None
    links_from = Path(args.md).resolve().parent if args.md else Path.cwd()
    grids = {a["arm"]: copy_grids(a, Path(args.work) / a["arm"], Path(args.grids)) for a in done}
    report = "\n".join(markdown(a, monolith, grids[a["arm"]], links_from, args.links) for a in done)
    goals = targets(done, monolith_row)
    report += "\n" + targets_markdown(goals) + "\n" + independence_markdown(done)
    figure = steps_plot(steps_points(done), Path(args.grids) / "fid_vs_steps.png")
    if figure:
        report += f"\n![FID against each model's optimizer steps]({href(figure, links_from, args.links)})\n"
    print(report)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(report)
    for a in done:
        for row in a["table"]:
            if row["strategy"] == MONOLITH or row.get("fid") is None:
                continue
            record("paper_study", f"{a['arm']} {row['strategy']} FID-{row.get('n', args.n)} "
                   f"({a['images_seen']:,} images seen, {args.preset})", row["fid"], "FID",
                   reference=monolith, results_dir=args.results_dir)
    if monolith is not None:
        record("paper_study", f"monolith FID-{args.n} ({done[0]['images_seen']:,} images seen, {args.preset})",
               monolith, "FID", results_dir=args.results_dir)
    for goal in goals:
        if goal["ratio"] is not None:
            images = goal["images_seen"] or done[0]["images_seen"]
            record("paper_study", f"target: {goal['target']} ({images:,} images seen)",
                   goal["ratio"], "ratio", ratio=goal["ratio"], results_dir=args.results_dir)
    mono = next((a["independence"] for a in done if a["independence"] and "monolith_s" in a["independence"]), None)
    for a in done:
        ind = a["independence"]
        if ind and mono:
            ddm_gpu_s = ind["experts_gpu_s"] + ind.get("router_gpu_s", 0.0)
            record("paper_study", f"{a['arm']} experts + router GPU-s ({a['images_seen']:,} images seen, "
                   f"parallelism {ind['parallelism']})", ddm_gpu_s, "GPU-s", reference=mono["monolith_gpu_s"],
                   results_dir=args.results_dir)
            record("paper_study", f"{a['arm']} longest expert s, each on its own GPUs ({a['images_seen']:,} images "
                   f"seen)", ind["longest_expert_s"], "s", reference=mono["monolith_s"], results_dir=args.results_dir)


if __name__ == "__main__":
    main()
