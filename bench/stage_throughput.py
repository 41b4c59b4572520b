"""The expert stage as users run it, against the model-only step, on real shards: images/s, MFU, checkpoints.

For each preset, in one command: the model-only training step of ``bench/expert_throughput.py`` (random data, no
loader, no progress) and then ``ddm-train expert --config`` on one cluster of the CIFAR-10 shards, through the
product's own config: the cluster stage's per-cluster shards, decode workers, EMA, progress lines, compile by
default on CUDA. The stage's images/s is the median of its progress windows (each ``log_every`` steps, compile
excluded: the trainer resets its window after the first step); ratio = stage / model-only (target >= 0.95). MFU =
3 * forward FLOPs * images/s / the bf16 matmul rate measured first in the same command (target >= 0.55, XL/2).

Checkpoints (``--checkpoint-preset``, DiT-XL/2 by default): a second run of that preset checkpoints every
``--ckpt-every`` steps and is stopped by SIGTERM; its events give the checkpoint's size, the stall (how long the
training loop waits for a device-to-host copy, while the write goes on in a background thread), the write time
and the blocking save on SIGTERM; the stall at checkpointEvery 1000 is stall / (1000 * step time) (target <= 3%).
Then the same command resumes it and reports the resume time (read once, on the CPU; states restored on the GPU).

Latent-space text-to-image experts (``--latent-text``, issue 10's setup): the cluster stage first encodes the
first ``--limit`` images at ``--image-size`` (256) with the Stable Diffusion VAE's architecture into 32x32x4 latents
and their captions (CIFAR-10's ``<key>.txt``, "a photo of a <class>") with a CLIP text tower of ``--text-width``
(768, CLIP ViT-L/14's) padded to ``--text-tokens`` (77); both with random weights, written to folders the stage
loads as a user's (the architecture and shapes, not the weights, set the speed; the tower has ``--text-layers``
layers, as it runs once, before the experts). The expert stage then trains on the latents with cross-attention to
the caption tokens, against the model-only step of the same shapes.

    python bench/stage_throughput.py --data datasets/cifar10                       # H200: S/2, B/2, XL/2
    python bench/stage_throughput.py --data datasets/cifar10 --latent-text --presets DiT-XL/2 --steps 120 \\
        --checkpoint-preset ''                                                      # GPU: issue 10's XL/2 stage
    python bench/stage_throughput.py --data /usr/share/datasets/fashion-mnist --presets DiT-T/4 --batch 8 \\
        --steps 12 --log-every 4 --checkpoint-preset DiT-T/4 --ckpt-every 4 --results-dir /tmp/r   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))  # works without installing the project
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import RESULTS, machine_name, record  # noqa: E402
from encode_throughput import SD_VAE  # noqa: E402  (sd-vae-ft-mse's architecture)
from expert_throughput import bench_preset, matmul_rate  # noqa: E402
from expert_throughput import parse_args as model_only_args  # noqa: E402

from ddm_trainer.configs.expert import CompileMode  # noqa: E402

BENCHMARK = "stage_throughput"
TARGET_RATIO, TARGET_MFU, TARGET_STALL = 0.95, 0.55, 0.03
DEFAULT_DATA = ROOT.parent / "shared/datasets/cifar10"


def trainer_command() -> list[str]:
    exe = shutil.which("ddm-train")
    return [exe] if exe else [sys.executable, "-m", "ddm_trainer.cli"]


def run_stage(stage: str, cfg: dict[str, Any], work: Path, name: str, stop_at_step: int | None = None,
              timeout: float = 590) -> tuple[int, list[dict[str, Any]], float]:
    """``ddm-train STAGE --config`` as a user runs it: (exit code, progress events, wall seconds). With
    ``stop_at_step`` the process gets SIGTERM once a progress line reaches that step (a preemption)."""
    from ddm_trainer.progress import parse_line

    cfg_file = work / f"{name}.json"
    cfg_file.write_text(json.dumps(cfg, indent=1))
    log = (work / f"{name}.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen([*trainer_command(), stage, "--config", str(cfg_file)], stdout=subprocess.PIPE,
                            stderr=log, text=True, bufsize=1)
    events: list[dict[str, Any]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        ev = parse_line(line)
        if ev is None:
            continue
        events.append(ev)
        if stop_at_step is not None and ev.get("event") == "progress" and ev.get("step", 0) >= stop_at_step:
            proc.send_signal(signal.SIGTERM)
            stop_at_step = None
        if time.perf_counter() - start > timeout:
            proc.kill()
    code = proc.wait()
    log.close()
    if code not in (0, 143) or (code == 143 and stop_at_step is not None):
        sys.stderr.write((work / f"{name}.log").read_text()[-4000:])
        raise SystemExit(f"{stage} {name} exited {code}; log {work / (name + '.log')}")
    return code, events, time.perf_counter() - start


def model_only_settings(args: argparse.Namespace, device: torch.device,
                        latent: tuple[int, int] | None = None) -> argparse.Namespace:
    """The reference step's settings through expert_throughput's own parser, so every option it reads exists (a
    Namespace built here by hand missed the text options added there, and the reference crashed on the GPU).
    ``latent`` (channels, size): the stage trains on such latents with cross-attention to the caption tokens."""
    channels, size = latent or (args.channels, args.image_size)
    text = ["--text-dim", str(args.text_width), "--text-tokens", str(args.text_tokens), "--text-mask", "captions"] \
        if latent else []
    return model_only_args(["--batch", str(args.batch), "--image-size", str(size), "--channels",
                            str(channels), "--steps", str(args.model_steps), "--warmup", "4", *text,
                            "--compile", "regional" if device.type == "cuda" else "none",
                            *(["--compile-mode", args.compile_mode] if args.compile_mode != "default" else []),
                            "--residual", args.residual,
                            *(["--coordinate-descent"] if args.coordinate_descent else [])])


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    data = {"uri": args.data, "image_size": args.image_size, "channels": args.channels, "class_field": "cls"}
    if getattr(args, "latent_text", False):
        data.update(caption_field="txt", limit=args.limit)
    return data


def expert_config(args: argparse.Namespace, run_uri: str, preset: str, steps: int, ckpt_every: int,
                  batch: int) -> dict[str, Any]:
    text = {"latents": True, "text_dim": args.text_width, "text_tokens": args.text_tokens, "class_cond": False} \
        if getattr(args, "latent_text", False) else {"class_cond": True, "num_classes": 10}
    return {"run_uri": run_uri, "data": data_config(args), "cluster_index": 0, "model": preset, **text,
            "device": args.device, "sample_grid": {"count": 0},
            "train": {"steps": steps, "batch_size": batch, "lr": 1e-4, "precision": "bf16",
                      "ckpt_every": ckpt_every, "log_every": args.log_every, "ema_decay": 0.9999,
                      "compile_mode": args.compile_mode, "residual_precision": args.residual,
                      "coordinate_descent_tuning": args.coordinate_descent}}


TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.5)  # CPU smoke runs
CAPTION_WORDS = ["a", "an", "photo", "of", "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def encoder_folders(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """A diffusers AutoencoderKL folder and a transformers CLIPTextModel folder (with a word-level tokenizer of
    CIFAR-10's caption words), random weights: what a user's ``vae.uri`` and ``textEncoder.uri`` hold."""
    from diffusers import AutoencoderKL
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae, clip = work / "models" / "vae", work / "models" / "clip"
    AutoencoderKL(**(SD_VAE if args.vae == "sd" else TINY_VAE)).save_pretrained(vae)
    clip.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CAPTION_WORDS]
    (clip / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(clip / "vocab.txt")).save_pretrained(clip)
    heads = max(1, args.text_width // 64)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=args.text_width,
                                 intermediate_size=4 * args.text_width, num_hidden_layers=args.text_layers,
                                 num_attention_heads=heads, max_position_embeddings=args.text_tokens,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(clip)
    return vae, clip


def fresh_run(run_uri: str, name: str) -> str:
    """A run store of its own for one measurement, holding the clustering (and its shards) of ``run_uri``."""
    target = f"{run_uri}-{name}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(run_uri) / "clustering", Path(target) / "clustering")
    return target


def windows(events: list[dict[str, Any]]) -> list[float]:
    """images/s of each progress window after the first (the first after compile still warms caches up)."""
    rates = [e["images_per_s"] for e in events if e.get("event") == "progress" and "images_per_s" in e]
    return rates[1:] if len(rates) > 2 else rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="shards (a dir of cifar10-train-*.tar.gz)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="images are resized to this (default 32; 256 with --latent-text and the SD VAE)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--presets", default="DiT-S/2,DiT-B/2,DiT-XL/2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", default="600,400,160", help="stage steps per preset (one value: all)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--model-steps", type=int, default=30, help="timed model-only steps")
    parser.add_argument("--checkpoint-preset", default="DiT-XL/2", help="'' skips the checkpoint runs")
    parser.add_argument("--ckpt-every", type=int, default=40)
    parser.add_argument("--compile-mode", default="default",
                        choices=get_args(CompileMode),
                        help="train.compile_mode of the stage, and the model-only step's (the records name it)")
    parser.add_argument("--residual", choices=("fp32", "bf16"), default="fp32",
                        help="train.residual_precision of the stage, and the model-only step's")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="train.coordinate_descent_tuning of the stage, and the model-only step's")
    parser.add_argument("--latent-text", action="store_true",
                        help="latent-space text-to-image experts: the cluster stage encodes latents (VAE) and "
                             "caption tokens (CLIP text tower), random weights; see above")
    parser.add_argument("--vae", choices=("sd", "tiny"), default="sd",
                        help="--latent-text: the SD VAE's architecture (256 px -> 32x32x4) or a tiny one (CPU)")
    parser.add_argument("--limit", type=int, default=8192, help="--latent-text: images encoded and trained on")
    parser.add_argument("--text-width", type=int, default=768, help="--latent-text: caption token width")
    parser.add_argument("--text-tokens", type=int, default=77, help="--latent-text: caption tokens (padded)")
    parser.add_argument("--text-layers", type=int, default=2, help="--latent-text: layers of the text tower")
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="only the checkpoint runs of --checkpoint-preset (size, stall, SIGTERM save, resume)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default=None, help="run store and logs (default: a temporary directory)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 256 if args.latent_text and args.vae == "sd" else 32
    device = torch.device(args.device)
    presets = args.presets.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    steps = steps * len(presets) if len(steps) == 1 else steps
    work = Path(args.work or tempfile.mkdtemp(prefix="ddm-stage-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run_uri = str(work / "run")
    machine, command = machine_name(), "python bench/stage_throughput.py " + " ".join(argv or sys.argv[1:])

    def rec(metric: str, value: float, unit: str, reference: float | None = None, ratio: float | None = None,
            **extra: Any) -> None:
        entry = record(BENCHMARK, metric, round(value, 6), unit, reference, ratio, command, machine,
                       args.results_dir)
        if extra:  # details beside the record (setup, targets), same file
            path = Path(args.results_dir) / f"{BENCHMARK}.json"
            rows = json.loads(path.read_text())
            rows[-1].update(extra)
            path.write_text(json.dumps(rows, indent=2) + "\n")
        del entry

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_rate(device, 8192 if device.type == "cuda" else 1024)
    rec("matmul_peak_bf16" if device.type == "cuda" else "matmul_peak_fp32", peak / 1e12, "TFLOP/s")

    # The cluster stage as users run it: it writes each cluster's shards, which the expert stage then streams.
    cluster_cfg = {"run_uri": run_uri, "data": data_config(args), "method": "random", "num_clusters": 2,
                   "device": args.device}
    latent = None
    if args.latent_text:
        vae, clip = encoder_folders(args, work)
        cluster_cfg.update(vae={"uri": str(vae)}, text_encoder={"kind": "clip", "uri": str(clip),
                                                                "width": args.text_width,
                                                                "max_tokens": args.text_tokens})
        levels = len((SD_VAE if args.vae == "sd" else TINY_VAE)["block_out_channels"])
        latent = (4, args.image_size // 2 ** (levels - 1))  # each level after the first halves the size
    _, _, cluster_s = run_stage("cluster", cluster_cfg, work, "cluster")
    print(f"cluster stage (random K=2, shards written{', latents and caption tokens' if latent else ''}): "
          f"{cluster_s:.1f} s", flush=True)
    if args.latent_text:
        rec("cluster_stage_s latent-text", cluster_s, "s", None, None,
            setup=f"{args.limit} images at {args.image_size} px, VAE {args.vae} and CLIP text {args.text_width}-d "
                  f"x {args.text_layers} layers, random weights")

    model_args = model_only_settings(args, device, latent)
    table = []
    for preset, n in zip(presets, steps) if not args.checkpoint_only else ():
        ref = bench_preset(preset, model_args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _, events, wall = run_stage("expert", expert_config(args, fresh_run(run_uri, preset.replace('/', '')), preset, n,
                                                            10**9, args.batch), work, f"expert-{preset.replace('/', '')}")
        rates = windows(events)
        stage_ips = statistics.median(rates)
        compile_s = next((e["compile_s"] for e in events if e.get("event") == "compiled"), None)
        mfu = 3 * ref["fwd_gflops"] * 1e9 * stage_ips / peak
        # a batch or compile mode other than the defaults names its records: they are other measurements
        mode = (f" {args.compile_mode}" if args.compile_mode != "default" else "") + (
            " residual=bf16" if args.residual == "bf16" else "") + (" coordinate-descent" if args.coordinate_descent else "")
        tag = preset + (" latent-text" if latent else "") + (f" batch {args.batch}" if args.batch != 256 else "") + mode
        shape = (f"{latent[1]}x{latent[1]}x{latent[0]} latents with {args.text_tokens} x {args.text_width} caption "
                 f"tokens" if latent else f"{args.image_size}x{args.image_size}x{args.channels}")
        setup = f"{shape}, batch {args.batch}, bf16, {n} steps" + (
            f", compile{mode}" if mode else "")
        rec(f"{tag}/stage_images_per_s", stage_ips, "images/s", ref["images_per_s"], None, setup=setup,
            reference_is="model-only step, same command", target_ratio=TARGET_RATIO)
        rec(f"{tag}/stage_mfu", mfu, "fraction of measured bf16 matmul rate", TARGET_MFU if preset == "DiT-XL/2"
            else None, None, setup=setup, reference_is="target MFU" if preset == "DiT-XL/2" else None)
        if compile_s is not None:
            rec(f"{tag}/compile_s", compile_s, "s", None, None, setup=setup)
        table.append((preset, ref["images_per_s"], stage_ips, mfu, compile_s, wall))
        print(f"{preset}: stage {stage_ips:.0f} images/s vs model-only {ref['images_per_s']:.0f} "
              f"({stage_ips / ref['images_per_s']:.1%}), MFU {mfu:.1%}, compile {compile_s} s, wall {wall:.0f} s",
              flush=True)

    if args.checkpoint_preset:
        preset = args.checkpoint_preset
        n = steps[presets.index(preset)] if preset in presets else 160
        uri = fresh_run(run_uri, "ckpt")
        cfg = expert_config(args, uri, preset, n, args.ckpt_every, args.batch)
        # SIGTERM on a progress line after the last periodic checkpoint, a window before the end
        stop = (n - args.ckpt_every // 2) // args.log_every * args.log_every
        _, events, _ = run_stage("expert", cfg, work, "ckpt-run", stop_at_step=stop)
        ckpts = [e for e in events if e.get("event") == "checkpoint"]
        periodic, on_sigterm = ckpts[:-1], ckpts[-1]  # the last one is the blocking save on SIGTERM
        rates = windows(events)
        step_s = args.batch / statistics.median(rates)
        ckpt_dir = Path(uri) / "experts/000/checkpoints"
        latest = max((p for p in ckpt_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
        size = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
        stall = statistics.mean(e["stall_s"] for e in periodic) if periodic else on_sigterm["stall_s"]
        write = statistics.mean(e["write_s"] for e in periodic) if periodic else on_sigterm["write_s"]
        fraction = stall / (1000 * step_s)
        rec(f"{preset}/checkpoint_bytes", size, "bytes", None, None)
        rec(f"{preset}/checkpoint_stall_s", stall, "s", None, None, write_s=round(write, 3))
        rec(f"{preset}/checkpoint_stall_fraction_at_1000", fraction, "fraction of 1000 steps' time", TARGET_STALL,
            None, step_s=round(step_s, 5), reference_is="target")
        rec(f"{preset}/checkpoint_on_sigterm_s", on_sigterm["stall_s"] + on_sigterm["write_s"], "s", None, None)
        _, events, _ = run_stage("expert", cfg, work, "resume-run")
        resumed = next((e for e in events if e.get("event") == "resumed"), None)
        if resumed is None:
            raise SystemExit(f"the SIGTERM at step {stop} came too late to stop the run; use more --steps")
        rec(f"{preset}/resume_s", resumed["seconds"], "s", None, None, from_step=resumed["step"])
        print(f"{preset} checkpoint: {size / 2**20:.0f} MiB, stall {stall:.3f} s (write {write:.2f} s in the "
              f"background) = {fraction:.2%} of 1000 steps; on SIGTERM {on_sigterm['stall_s'] + on_sigterm['write_s']:.2f} s;"
              f" resume {resumed['seconds']:.2f} s from step {resumed['step']}", flush=True)

    print(f"\n{'preset':<10} {'model-only':>11} {'stage':>8} {'ratio':>7} {'MFU':>7} {'compile s':>10}")
    for preset, ref_ips, ips, mfu, compile_s, _ in table:
        print(f"{preset:<10} {ref_ips:>11.0f} {ips:>8.0f} {ips / ref_ips:>7.1%} {mfu:>7.1%} "
              f"{compile_s if compile_s is None else round(compile_s, 1)!s:>10}")
    print(f"matmul {peak / 1e12:.1f} TFLOP/s on {machine}; work dir {work}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
