"""Do a text-conditioned DDM's samples follow their prompts? A CIFAR-10 classifier, trained here on the train
shards and checked on the test shard, labels each sample drawn for "a photo of a <class>"; the share labelled as its
prompt's class is the figure, beside the classifier's own test accuracy (its ceiling) and chance (10%).

The samples come from ``ddm sample RUN -n N --prompt "a photo of a airplane" ... -o grid.png`` (the ten classes, in
order): either its ``samples.npz`` in the run store (``--samples``, every image with its prompt), or the combined
grid PNG (``--grid``: each prompt's rows named on the left; ``--grid-order drawing`` for grids written before
that, in drawing order).

    python bench/prompt_adherence.py --data '../shared/datasets/cifar10' \\
        --grid top1=bench/results/grids/top1.png --grid full=bench/results/grids/full.png --per-prompt 16

The classifier (a small CNN, ~3 minutes an epoch on 2 CPU cores, 77% on the test shard after 6) is kept in
``--classifier`` and reused.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from ddm_trainer.stages.sample import LABEL_WIDTH  # noqa: E402  the prompts' column left of a combined grid

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OUT = Path(__file__).resolve().parent / "results" / "prompt_adherence.json"


def read_shards(pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) uint8 images and (N,) labels from WebDataset shards of <key>.jpg|png and <key>.cls."""
    images: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    paths = sorted(glob.glob(pattern))
    if not paths:
        sys.exit(f"prompt_adherence: no shards match {pattern}")
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member)
                if data is None:
                    continue
                if ext in ("jpg", "png"):
                    images[key] = np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB"))
                elif ext == "cls":
                    labels[key] = int(data.read())
    keys = sorted(set(images) & set(labels))
    x = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return x, torch.tensor([labels[k] for k in keys])


def classifier() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128), nn.MaxPool2d(2),
                         block(128, 192), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(192, 10))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0  # uint8 -> [-1, 1], as the DDM's images


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, device: torch.device) -> nn.Module:
    """SGD with momentum, one-cycle learning rate, random crops (pad 4) and flips."""
    torch.manual_seed(seed)
    model = classifier().to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batch = 256
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch].to(device)
            xb = F.pad(normalise(x[idx]), (4, 4, 4, 4), mode="reflect")  # (B, 3, 40, 40)
            dx, dy = torch.randint(0, 9, (2,)).tolist()
            xb = xb[:, :, dy:dy + 32, dx:dx + 32]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(normalise(x[i:i + 1000].to(device))).argmax(1).cpu() for i in range(0, len(x), 1000)])


def grid_cells(path: str, count: int, size: int = 32, nrow: int = 8, pad: int = 2, left: int = 0) -> torch.Tensor:
    """The first ``count`` images of a grid written by ``torchvision.utils.make_grid`` (padding 2), row-major,
    ``left`` pixels right of the image's edge."""
    arr = np.asarray(Image.open(path).convert("RGB"))[:, left:]
    cells = []
    for i in range(count):
        r, c = divmod(i, nrow)
        top, left = pad + r * (size + pad), pad + c * (size + pad)
        cells.append(arr[top:top + size, left:left + size])
    return torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).contiguous()  # (count, 3, size, size)


def grid_samples(path: str, per_prompt: int, order: str, nrow: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and their prompts' classes from a combined grid of ten prompts (the classes in order)."""
    P = len(CLASSES)
    if order == "drawing":  # image i has prompt i mod P
        images = grid_cells(path, P * per_prompt, nrow=nrow)
        return images, torch.arange(P * per_prompt) % P
    rows = -(-per_prompt // nrow)  # by prompt: each prompt's images in its own rows (the last one padded), named
    cells = grid_cells(path, P * rows * nrow, nrow=nrow, left=LABEL_WIDTH).view(P, rows * nrow, 3, 32, 32)
    cells = cells[:, :per_prompt]
    return cells.reshape(-1, 3, 32, 32), torch.arange(P).repeat_interleave(per_prompt)


def npz_samples(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples.npz`` of ``ddm sample``: uint8 images (N, C, H, W) or (N, H, W, C), and each image's prompt."""
    with np.load(path) as z:
        images, prompts = z["images"], [str(p) for p in z["prompts"]]
    x = torch.from_numpy(images)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    classes = [next((k for k, c in enumerate(CLASSES) if p.rstrip(".").endswith(" " + c)), -1) for p in prompts]
    if -1 in classes:
        sys.exit(f"prompt_adherence: {path}: a prompt names no CIFAR-10 class: {prompts[classes.index(-1)]!r}")
    return x.contiguous(), torch.tensor(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of cifar10-train-*.tar.gz and cifar10-test-*.tar.gz")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=PNG")
    parser.add_argument("--samples", action="append", default=[], metavar="NAME=NPZ")
    parser.add_argument("--grid-order", choices=("by-prompt", "drawing"), default="by-prompt")
    parser.add_argument("--per-prompt", type=int, default=16)
    parser.add_argument("--nrow", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--classifier", type=Path, default=Path("/tmp/cifar10-classifier.pt"))
    parser.add_argument("--label", default="", help="what was sampled, for the records")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    device = torch.device(args.device)
    model = classifier().to(device)
    if args.classifier.exists():
        model.load_state_dict(torch.load(args.classifier, map_location=device))
        model.eval()
    else:
        x, y = read_shards(f"{args.data}/cifar10-train-*.tar.gz")
        print(f"classifier: training on {len(x)} images", flush=True)
        model = train_classifier(x, y, args.epochs, seed=0, device=device)
        torch.save(model.state_dict(), args.classifier)
    xt, yt = read_shards(f"{args.data}/cifar10-test-*.tar.gz")
    test_acc = (predict(model, xt) == yt).float().mean().item()
    print(f"classifier: {test_acc:.1%} on the {len(xt)} test images")

    sources = [(n, *grid_samples(p, args.per_prompt, args.grid_order, args.nrow))
               for n, p in (s.split("=", 1) for s in args.grid)]
    sources += [(n, *npz_samples(p)) for n, p in (s.split("=", 1) for s in args.samples)]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = "python bench/prompt_adherence.py " + " ".join(sys.argv[1:])
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU ({torch.get_num_threads()} threads)") + f", torch {torch.__version__}"
    records: list[dict[str, Any]] = [{
        "metric": "prompt_adherence/classifier_test_accuracy", "value": round(test_acc, 4), "unit": "fraction",
        "reference": 0.1, "ratio": round(test_acc / 0.1, 2), "command": command, "machine": machine, "date": now}]
    for name, images, classes in sources:
        pred = predict(model, images)
        hit = (pred == classes).float()
        per_class = {CLASSES[c]: round(hit[classes == c].mean().item(), 3) for c in range(len(CLASSES))
                     if (classes == c).any()}
        share = hit.mean().item()
        print(f"{name}: {share:.1%} of {len(images)} samples labelled as their prompt's class "
              f"({share / test_acc:.2f} of the classifier's test accuracy); per class {per_class}")
        records.append({"metric": f"prompt_adherence/{name}", "value": round(share, 4),
                        "unit": "fraction of samples labelled as their prompt's class",
                        "reference": round(test_acc, 4), "ratio": round(share / test_acc, 3), "command": command,
                        "machine": machine, "date": now, "samples": len(images), "per_class": per_class,
                        "label": args.label})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(old + records, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
