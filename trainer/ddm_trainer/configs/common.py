"""Pieces shared by every stage config."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    """Unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_uri(value: str, what: str = "URI") -> str:
    """Accept file:// URIs, s3://bucket[/prefix] and plain local paths; reject anything else early."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    parsed = urlparse(value)
    if parsed.scheme == "s3" and not parsed.netloc:
        raise ValueError(f"{what} {value!r} has no bucket")
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{what} {value!r} must be file:///absolute/path")
    if parsed.scheme not in ("", "file", "s3"):
        raise ValueError(f"{what} {value!r}: unsupported scheme {parsed.scheme!r} (use file://, s3:// or a path)")
    return value


class DataConfig(StrictModel):
    """Where the images are and how to read them."""

    uri: str = Field(description="Shards (.tar/.tar.gz, a directory or glob of them), an image folder, or a store URI")
    image_size: int = Field(32, ge=8, le=1024, description="Images are resized (and center-cropped) to this size")
    channels: Literal[1, 3] = Field(3, description="1 = grayscale, 3 = RGB")
    class_field: str | None = Field("cls", description="Per-sample key holding the class index (None: unconditional)")
    caption_field: str | None = Field(None, description="Per-sample key holding a caption")
    limit: int | None = Field(None, ge=1, description="Use only the first N samples (smoke tests, demos)")
    workers: int | None = Field(None, ge=0, le=64,
                                description="Decode processes per rank for an expert's cluster shards (0: decode in "
                                            "the stream's thread; null: min(4, CPU cores / local ranks))")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "data.uri")


class StageBase(StrictModel):
    """Fields every stage has: where the run lives, its seed, and where it runs."""

    run_uri: str = Field(description="Root of the run's artifacts: a local directory, file:// or s3:// URI")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")

    @field_validator("run_uri")
    @classmethod
    def _run_uri(cls, v: str) -> str:
        return check_uri(v, "run_uri")


class TextEncoderConfig(StrictModel):
    """The text encoder whose caption embeddings the cluster stage stores beside each cluster's shards."""

    kind: Literal["sentence-transformers", "clip", "t5"] = Field(
        "sentence-transformers", description="sentence-transformers folder, transformers CLIPTextModel or "
                                             "T5EncoderModel folder")
    uri: str = Field(description="The model folder: a local path, file:// or s3:// URI")
    width: int = Field(ge=1, le=16384, description="Width of its token embeddings (the experts' text_dim)")
    max_tokens: int = Field(16, ge=1, le=512, description="Tokens kept per caption (cut or padded, with a mask)")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "text_encoder.uri")


class VaeConfig(StrictModel):
    """The VAE of latent-space experts (diffusers AutoencoderKL): the cluster stage stores every image's latents."""

    uri: str = Field(description="A diffusers AutoencoderKL folder (config.json + weights) or a .safetensors file "
                                 "beside its config.json: a local path, file:// or s3:// URI")
    scaling_factor: float | None = Field(None, gt=0, description="Latent scale (null: the VAE config's)")
    shift_factor: float | None = Field(None, description="Latent shift (null: the VAE config's, else 0)")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "vae.uri")
