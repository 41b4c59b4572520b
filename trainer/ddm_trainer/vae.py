"""The VAE of latent-space experts: diffusers ``AutoencoderKL`` (Stable Diffusion's sd-vae-ft-mse and its kin).

Loaded offline from a local path or a store URI (copied to a local cache first):
- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``);
- a single ``.safetensors`` file beside a ``config.json`` (diffusers key names, or the original Stable Diffusion
  ones, which diffusers converts).
Latents are ``(encode(x).mean - shift) * scale`` with the scaling and shift factors of its config (overridable), so
the experts see roughly unit-variance latents; ``decode`` inverts it back to images in [-1, 1]. A path that holds
no VAE stops with a one-line error naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .text import local_folder

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class LatentShape:
    channels: int
    size: int  # side of the latent: image_size / factor
    factor: int  # spatial downsampling (8 for the SD VAE)


class Vae:
    def __init__(self, uri: str, device: str | torch.device = "cpu", scaling_factor: float | None = None,
                 shift_factor: float | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the path; never from a hub
        self.uri, self.device = uri, torch.device(device)
        path = _local(uri)
        self.model = _load(path, uri).to(self.device).eval().requires_grad_(False)
        config: Any = self.model.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(shift_factor if shift_factor is not None
                                  else getattr(config, "shift_factor", None) or 0.0)
        self.channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)

    def shape(self, image_size: int) -> LatentShape:
        if image_size % self.factor:
            raise ConfigError(f"data.image_size {image_size} is not a multiple of VAE {self.uri}'s downsampling "
                              f"factor {self.factor}")
        return LatentShape(self.channels, image_size // self.factor, self.factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> latents (B, c, H/f, W/f) float32: the posterior mean, scaled."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1 and self.model.config.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)  # grayscale data through an RGB VAE
        mean = self.model.encode(x).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """latents (B, c, h, w) -> images (B, C, h*f, w*f) in [-1, 1]; ``channels`` 1 averages RGB to gray."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        images = self.model.decode(z).sample.clamp(-1, 1).float()
        if channels == 1 and images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        return images

    def meta(self) -> dict[str, Any]:
        """What the cluster stage records with the latent shards (and samplers reload the VAE from)."""
        return {"uri": self.uri, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "channels": self.channels, "factor": self.factor}


def _local(uri: str) -> Path:
    """A local folder or file: a .safetensors file in the store is fetched with its folder (its config.json)."""
    if uri.endswith(".safetensors") and "://" in uri and not uri.startswith("file://"):
        parent = local_folder(uri.rsplit("/", 1)[0], what="VAE")
        return parent / uri.rsplit("/", 1)[1]
    return local_folder(uri, what="VAE")


def _load(path: Path, uri: str) -> Any:
    from diffusers import AutoencoderKL

    try:
        if path.is_file() and path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise ConfigError(f"VAE {uri}: a single .safetensors file needs its config.json beside it")
            return AutoencoderKL.from_single_file(str(path), config=str(path.parent), local_files_only=True,
                                                 low_cpu_mem_usage=False)
        if not path.is_dir() or not (path / "config.json").is_file() \
                or not any((path / w).is_file() for w in WEIGHT_FILES):
            raise ConfigError(f"VAE {uri}: no diffusers AutoencoderKL there (a folder with config.json and "
                              f"{WEIGHT_FILES[0]}, or a .safetensors file beside its config.json)")
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"VAE {uri}: cannot load an AutoencoderKL: {first}") from None
