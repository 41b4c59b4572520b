"""Does the compute-matched monolith keep its lead as the budget grows? DDM against the monolith at growing budgets.

The paper study (``bench/paper_study.py``) measured DDM behind its compute-matched monolith at one budget (1.5M
images seen by DiT-S/2 on CIFAR-10: K=8 top-1 1.88x the monolith's FID), and read it as a step-bound regime: each
of K experts makes 1/K of the monolith's steps, and the monolith was still far from what its capacity allows. This
benchmark tests that reading where a small machine can: a model far smaller than the study's (DiT-N/4, 175x fewer
parameters than DiT-S/2), which should come nearer its capacity within the same budget, trained through the
product's own stages and compared at several budgets on held-out images.

What runs (every training step through ``ddm-train STAGE --config``):
1. ``cluster``: k-means of the training images' encoder features into K clusters (the study's encoder,
   EfficientNet-Lite0, by default);
2. ``cluster`` again, on the held-out images, as a grown run with ``growth.assignment: nearest``: each test image
   goes to the cluster of its nearest fine centroid, as new data of a grown DDM would;
3. ``expert`` on all the data (the monolith, ``cluster_index`` null) for ``--budget`` steps of ``--batch``,
   checkpointing at ``--points`` evenly spaced budgets (every checkpoint kept);
4. ``expert`` per cluster, on the same images seen in total, split as the study's arms split them: batch
   ``--batch`` / K (the study's ``-b64`` arms at K=4, ``-b32`` at K=8, against the monolith's 256) and K x
   ``--budget`` steps shared by cluster size (``stepsAllocation: proportional``: every expert passes over its data as
   often as the monolith over all of it), checkpoints at the same fractions of its steps.

Measured at each budget point: the flow-matching loss of the EMA weights on held-out images (the CIFAR-10 test
split), every image at a fixed t and a fixed noise (common random numbers: every model sees exactly the same
(x0, eps, t) triples, so the difference between two models is measured with far less noise than either loss; t at
stratified quantiles of the training's logit-normal distribution, so the loss is the objective the stages lower). The
DDM's loss is the oracle ensemble's: each test image scored by its own cluster's expert (the routed top-1 of the
study came within 1.3% of the oracle's FID). Reported: monolith loss, DDM loss and DDM / monolith per budget, also
on training images (the generalisation gap), and a plot against images seen.

The loss is what training lowers, not FID: it says which model fits the data better, not how much better the
samples look. So at ``--fid-points`` (budget points, 1-based) both are also sampled as the study samples them
(class-conditional, guidance ``--cfg``, 50 Euler steps; the DDM as the product's ``oracle`` strategy: each sample's
expert drawn from its class's share of each cluster) from the same noise and labels, and scored by FID against the
held-out images with the product's Inception (``ddm_trainer.fid``). On a CPU that is FID-``--fid-samples`` (1,000 by
default, ~2 minutes each): higher than FID-10k for the same model and noisier, so read its ratio between the two
arms, not its level. An 8x8 grid of each arm at the last point goes beside the plot.

    python bench/capacity_regime.py --train datasets/cifar10 --test ../shared/datasets/cifar10 --preset DiT-N/4 \\
        --clusters 4 --encoder-resolution 96 --budget 6000 --points 6 --batch 256 --fid-points 2,4,6 \\
        --plot capacity_regime.png          # ~1 h 30 min on 2 CPU cores (BENCHMARKS.md)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import RESULTS, machine_name, record  # noqa: E402
from stage_throughput import run_stage  # noqa: E402

from ddm_trainer import fid, layout  # noqa: E402
from ddm_trainer.checkpoint import CONFIG_FILE, has_final, load_checkpoint, load_final  # noqa: E402
from ddm_trainer.cluster_shards import open_cluster_shards  # noqa: E402
from ddm_trainer.clustering import allocated_steps, load_assignments, mixture_counts  # noqa: E402
from ddm_trainer.configs.common import DataConfig  # noqa: E402
from ddm_trainer.flow import interpolate, velocity_target  # noqa: E402
from ddm_trainer.sampler import CombinedSampler  # noqa: E402
from ddm_trainer.stages.sample import grid_png  # noqa: E402
from ddm_trainer.stages.expert import build_from_spec, stage_dir_of  # noqa: E402
from ddm_trainer.store import open_store  # noqa: E402

BENCHMARK = "capacity_regime"
STAGE_TIMEOUT_S = 6 * 3600  # a stage of this benchmark trains for many minutes on a CPU


def shards(path: str, split: str) -> str:
    return path if "*" in path or path.endswith(".tar.gz") else str(Path(path) / f"cifar10-{split}-*.tar.gz")


def checkpoint_steps(steps: int, points: int) -> list[int]:
    """The steps at which a run of ``steps`` is scored: ``points`` even fractions of it, the last one its end."""
    every = max(1, steps // points)
    return [every * j for j in range(1, points)] + [steps]


def expert_config(run_uri: str, data: dict, cluster: int | None, args: argparse.Namespace, steps: int,
                  batch: int, points: int) -> dict:
    # the study's square-root rule (bench/paper_study.py): a batch b trains at lr x sqrt(b / --batch)
    lr = args.lr * math.sqrt(batch / args.batch)
    return {"run_uri": run_uri, "data": data, "cluster_index": cluster, "model": args.preset, "class_cond": True,
            "num_classes": 10, "device": args.device, "seed": args.seed, "sample_grid": {"count": 0},
            "train": {"steps": steps, "batch_size": batch, "lr": lr, "ckpt_every": max(1, steps // points),
                      "keep_checkpoints": points + 1, "log_every": 200, "ema_decay": args.ema}}


def ema_at(store, stage_dir: str, step: int, final_step: int) -> torch.nn.Module:
    """The EMA weights of ``stage_dir`` at ``step``: its checkpoint, or its final weights at the last step."""
    model = build_from_spec(json.loads(store.read_committed(layout.final(stage_dir), CONFIG_FILE))["model"])
    if step == final_step:
        model.load_state_dict(load_final(store, stage_dir, with_model=False).ema)
    else:  # only the checkpoint's weights are read: the final's EMA is not loaded to be thrown away
        model.load_state_dict(load_checkpoint(store, layout.checkpoint(stage_dir, step))["ema"])
    return model.eval()


class Scored:
    """One cluster's evaluation images with their fixed (eps, t): every model is scored on the same triples."""

    def __init__(self, store, cluster: int, data: DataConfig, fraction: float, seed: int):
        source = open_cluster_shards(store, cluster, data)
        if source is None:
            raise SystemExit(f"no cluster shards for cluster {cluster} at {store.url(layout.CLUSTER_SHARDS)}")
        n = max(1, round(fraction * len(source)))  # the same share of every cluster: the split's own mixture
        batch = source.load_ids(list(range(n)))
        self.x0, self.y = batch.images, batch.labels
        gen = torch.Generator().manual_seed(seed * 1000 + cluster)
        self.eps = torch.randn(self.x0.shape, generator=gen)
        # the training's logit-normal t (ExpertConfig.t_dist), at stratified quantiles: the loss the stage minimises
        u = (torch.randperm(n, generator=gen).double() + 0.5) / n
        self.t = torch.sigmoid(torch.special.ndtri(u)).float()

    def __len__(self) -> int:
        return self.x0.shape[0]

    @torch.no_grad()
    def losses(self, model: torch.nn.Module, chunk: int = 500) -> torch.Tensor:
        """(n,) per-image MSE of the model's velocity against the target, conditioned on the true labels."""
        out = []
        for s in range(0, len(self), chunk):
            x0, eps, t, y = (a[s:s + chunk] for a in (self.x0, self.eps, self.t, self.y))
            v = model(interpolate(x0, eps, t), t, y)
            out.append((v.float() - velocity_target(x0, eps)).pow(2).flatten(1).mean(1))
        return torch.cat(out)


class FidProbe:
    """FID of a sampler's images against held-out ones; every sampler draws from the same noise and labels."""

    def __init__(self, reference: torch.Tensor, n: int, cfg: float, num_classes: int, seed: int):
        self.extractor = fid.build_extractor("cpu")
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(reference.shape[0], generator=gen)[:n]
        self.real = fid.extract_features(self.extractor, reference[pick])  # (n, 2048)
        self.x1 = torch.randn((n, *reference.shape[1:]), generator=gen)
        self.y = torch.arange(n) % num_classes
        self.cfg, self.num_classes = cfg, num_classes

    def score(self, experts: list[torch.nn.Module], mixture: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        """(FID, the images): one expert (the monolith) or the K experts as ``oracle``."""
        strategy = "oracle" if mixture is not None else "oracle-0"
        sampler = CombinedSampler(experts, None, strategy, steps=50, cfg_scale=self.cfg, null_label=self.num_classes,
                                  mixture=mixture)
        images = torch.cat([sampler.sample(self.x1[s:s + 250], self.y[s:s + 250], seed=s)
                            for s in range(0, len(self.y), 250)])
        return fid.fid_from_features(self.real, fid.extract_features(self.extractor, images)), images


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [r["images_seen"] / 1e3 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("monolith_test", "monolith"), ("ddm_test", "DDM (oracle routing)")):
        a.plot(seen, [r[key] for r in rows], marker="o", label=label)
    a.set_xlabel("images seen (thousands)")
    a.set_ylabel("held-out flow-matching loss")
    a.legend()
    b.plot(seen, [r["ratio_test"] for r in rows], marker="o", label="held-out")
    b.plot(seen, [r["ratio_train"] for r in rows], marker="x", linestyle="--", label="training images")
    b.axhline(1.0, color="grey", linewidth=0.8)
    b.set_xlabel("images seen (thousands)")
    b.set_ylabel("DDM loss / monolith loss")
    b.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="a dir of cifar10-train-*.tar.gz shards (or a glob)")
    parser.add_argument("--test", required=True, help="a dir holding cifar10-test-*.tar.gz (or the shard itself)")
    parser.add_argument("--preset", default="DiT-N/4")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--encoder-resolution", type=int, default=None,
                        help="the encoder's input size (efficientnet_lite0: 224 by default, ~14 images/s on 2 cores)")
    parser.add_argument("--budget", type=int, default=6000, help="the monolith's steps (the experts make K x as many "
                        "of a K x smaller batch)")
    parser.add_argument("--points", type=int, default=6, help="budgets scored: even fractions of --budget")
    parser.add_argument("--batch", type=int, default=256, help="the monolith's batch; each expert's is batch / K")
    parser.add_argument("--lr", type=float, default=3e-4, help="the monolith's (the study's)")
    parser.add_argument("--ema", type=float, default=0.9995, help="EMA decay (the study's)")
    parser.add_argument("--eval-images", type=int, default=10000,
                        help="images scored per split (at most; the same share of every cluster)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=None)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--plot", default=None, help="PNG of the losses and their ratio against images seen; the "
                        "arms' grids are written beside it")
    parser.add_argument("--fid-points", default="", help="budget points (1-based, comma-separated) also scored by "
                        "FID; empty: none")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale of the FID samples (the study's)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="ddm-capacity-"))
    work.mkdir(parents=True, exist_ok=True)
    run_uri, heldout_uri = str(work / "run"), str(work / "heldout")
    data = {"uri": shards(args.train, "train"), "image_size": 32, "channels": 3, "class_field": "cls"}
    test = dict(data, uri=shards(args.test, "test"))
    clustering = {"num_clusters": args.clusters, "encoder": args.encoder, "encoder_resolution": args.encoder_resolution,
                  "device": args.device, "seed": args.seed, "examples_per_cluster": 0}
    run_stage("cluster", {"run_uri": run_uri, "data": data, **clustering}, work, "cluster", timeout=STAGE_TIMEOUT_S)
    run_stage("cluster", {"run_uri": heldout_uri, "data": test, **clustering,
                          "growth": {"parent_uri": run_uri, "assignment": "nearest"}}, work, "cluster-heldout",
              timeout=STAGE_TIMEOUT_S)
    store, heldout = open_store(run_uri), open_store(heldout_uri)
    sizes = load_assignments(store).sizes
    if args.batch % args.clusters:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --clusters {args.clusters}")
    expert_batch = args.batch // args.clusters
    steps = allocated_steps(args.budget, sizes)  # K x budget steps in all, shared by cluster size
    print(f"clusters {sizes}; expert steps {steps} of {expert_batch} (monolith {args.budget} of {args.batch})",
          flush=True)

    runs = [(None, args.budget, args.batch)] + [(k, s, expert_batch) for k, s in enumerate(steps)]
    seconds: dict[str, float] = {}
    for cluster, n_steps, batch in runs:
        name = "monolith" if cluster is None else f"expert-{cluster}"
        if not has_final(store, stage_dir_of(cluster)):  # a re-run goes on with what is missing
            _, _, seconds[name] = run_stage("expert", expert_config(run_uri, data, cluster, args, n_steps, batch,
                                                                    args.points), work, name, timeout=STAGE_TIMEOUT_S)
            print(f"{name}: {n_steps} steps in {seconds[name]:.0f} s", flush=True)

    scored = {}
    for split, st, d in (("test", heldout, test), ("train", store, data)):
        fraction = min(1.0, args.eval_images / sum(load_assignments(st).sizes))
        scored[split] = [Scored(st, k, DataConfig(**d), fraction, args.seed) for k in range(args.clusters)]
    fid_points = {int(j) for j in args.fid_points.split(",") if j}
    probe = None
    if fid_points:
        probe = FidProbe(torch.cat([p.x0 for p in scored["test"]]), args.fid_samples, args.cfg, 10, args.seed)
        mixture = torch.from_numpy(mixture_counts(store))
    rows = []
    mono_points = checkpoint_steps(args.budget, args.points)
    expert_points = [checkpoint_steps(s, args.points) for s in steps]
    for j in range(args.points):
        mono = ema_at(store, stage_dir_of(None), mono_points[j], args.budget)
        experts = [ema_at(store, stage_dir_of(k), expert_points[k][j], steps[k]) for k in range(args.clusters)]
        row = {"images_seen": mono_points[j] * args.batch,
               "expert_steps": [expert_points[k][j] for k in range(args.clusters)], "monolith_steps": mono_points[j]}
        for split, parts in scored.items():
            m = torch.cat([p.losses(mono) for p in parts])
            d = torch.cat([p.losses(experts[k]) for k, p in enumerate(parts)])
            diff = d - m
            row[f"monolith_{split}"], row[f"ddm_{split}"] = m.mean().item(), d.mean().item()
            row[f"ratio_{split}"] = row[f"ddm_{split}"] / row[f"monolith_{split}"]
            row[f"diff_se_{split}"] = (diff.std() / len(diff) ** 0.5).item()  # the paired difference's error
        if probe is not None and j + 1 in fid_points:
            row["monolith_fid"], mono_images = probe.score([mono], None)
            row["ddm_fid"], ddm_images = probe.score(experts, mixture)
            row["ratio_fid"] = row["ddm_fid"] / row["monolith_fid"]
            print(f"{row['images_seen']:>9,} images: FID-{args.fid_samples} monolith {row['monolith_fid']:.2f}, "
                  f"DDM {row['ddm_fid']:.2f} (ratio {row['ratio_fid']:.3f})", flush=True)
            if args.plot and j + 1 == max(fid_points):
                for arm, images in (("monolith", mono_images), ("ddm", ddm_images)):
                    Path(args.plot).with_name(f"{Path(args.plot).stem}-{arm}.png").write_bytes(
                        grid_png(images[:64], nrow=8))
        rows.append(row)
        print(f"{row['images_seen']:>9,} images: monolith {row['monolith_test']:.5f}, DDM {row['ddm_test']:.5f} "
              f"(ratio {row['ratio_test']:.4f}, difference +- {row['diff_se_test']:.5f}); training images ratio "
              f"{row['ratio_train']:.4f}", flush=True)

    command = "python bench/capacity_regime.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = f"{args.preset} K={args.clusters} batch {args.batch}/{expert_batch}"
    machine = machine_name()
    for row in rows:
        at = f"{tag} {row['images_seen']} images seen"
        record(BENCHMARK, f"{at}/monolith_heldout_loss", row["monolith_test"], "loss", None, None, command, machine,
               args.results_dir)
        record(BENCHMARK, f"{at}/ddm_oracle_heldout_loss", row["ddm_test"], "loss", row["monolith_test"], None,
               command, machine, args.results_dir)
        if "ddm_fid" in row:
            record(BENCHMARK, f"{at}/monolith_fid{args.fid_samples}", row["monolith_fid"], "FID", None, None, command,
                   machine, args.results_dir)
            record(BENCHMARK, f"{at}/ddm_oracle_fid{args.fid_samples}", row["ddm_fid"], "FID", row["monolith_fid"],
                   None, command, machine, args.results_dir)
    heldout_sizes = [len(p) for p in scored["test"]]
    (work / "capacity_regime.json").write_text(json.dumps(
        {"command": command, "cluster_sizes": sizes, "heldout_scored": heldout_sizes, "expert_steps": steps,
         "stage_seconds": seconds, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, Path(args.plot), f"{tag}, CIFAR-10: DDM (K experts, steps by cluster size) against the "
                                    "compute-matched monolith")
    print(f"wrote {work / 'capacity_regime.json'}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
