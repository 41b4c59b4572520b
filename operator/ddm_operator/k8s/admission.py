"""The operator's own admission of a DecentralizedDiffusion: what its installer allows, beyond what the CRD checks.

Anyone who may create a DDM chooses ``spec.trainerImage``, and that image runs with the namespace's store Secret in
its environment. ``DDM_ALLOWED_TRAINER_IMAGES`` (the chart's ``allowedTrainerImages``) lists the images the operator
will run: comma- or whitespace-separated entries, each an exact image reference (``ghcr.io/ddm/ddm-trainer:0.1.0``,
``...@sha256:<digest>``) or a prefix ending in ``*`` (``ghcr.io/ddm/ddm-trainer:*``, ``registry.example/ml/*``).
Unset or empty: any image (for a single-user cluster or tests; the chart sets it). A DDM naming another image gets
no children at all: phase Failed, with a message naming the image and the setting.
"""
from __future__ import annotations

import os
import re

ALLOWED_IMAGES_ENV = "DDM_ALLOWED_TRAINER_IMAGES"
CHART_VALUE = "allowedTrainerImages"


class ImageNotAllowed(ValueError):
    """spec.trainerImage is not among the images the operator was installed to run (permanent until the spec changes)."""


def allowed_images(environ: dict[str, str] | None = None) -> list[str] | None:
    """The configured entries, or None when every image is allowed."""
    raw = (os.environ if environ is None else environ).get(ALLOWED_IMAGES_ENV, "")
    entries = [e for e in re.split(r"[,\s]+", raw) if e]
    return entries or None


def image_allowed(image: str, entries: list[str] | None) -> bool:
    if entries is None:
        return True
    return any(image.startswith(e[:-1]) if e.endswith("*") else image == e for e in entries)


def check_trainer_image(image: str, environ: dict[str, str] | None = None) -> None:
    """Raise ImageNotAllowed naming the image, the field and the setting, unless the image is allowed."""
    entries = allowed_images(environ)
    if not image_allowed(image, entries):
        raise ImageNotAllowed(
            f"spec.trainerImage {image!r} is not allowed by this operator: its {ALLOWED_IMAGES_ENV} "
            f"(Helm value {CHART_VALUE}) allows only {', '.join(entries or [])}; no job was created")
