"""The operator's allow-list of trainer images (DDM_ALLOWED_TRAINER_IMAGES, the chart's allowedTrainerImages)."""
from __future__ import annotations

import pytest

from ddm_operator.k8s.admission import ALLOWED_IMAGES_ENV, ImageNotAllowed, allowed_images, check_trainer_image


def test_unset_or_empty_allows_every_image() -> None:
    assert allowed_images({}) is None and allowed_images({ALLOWED_IMAGES_ENV: " , "}) is None
    check_trainer_image("anything:latest", {})


@pytest.mark.parametrize(("image", "ok"), [
    ("ghcr.io/ddm/ddm-trainer:0.1.0", True),
    ("ghcr.io/ddm/ddm-trainer:0.2.0-cu130", True),
    ("registry.example/ml/trainer@sha256:" + "a" * 64, True),
    ("ghcr.io/ddm/ddm-trainer-evil:0.1.0", False),  # a prefix entry ends at its '*': the ':' is part of it
    ("ghcr.io/ddm/ddm-trainer", False),
    ("docker.io/library/python:3.12", False),
    ("registry.example/ml/trainer:latest", False),  # exact entries match exactly
])
def test_exact_and_prefix_entries(image: str, ok: bool) -> None:
    env = {ALLOWED_IMAGES_ENV: "ghcr.io/ddm/ddm-trainer:*,\n registry.example/ml/trainer@sha256:" + "a" * 64}
    if ok:
        check_trainer_image(image, env)
        return
    with pytest.raises(ImageNotAllowed) as info:
        check_trainer_image(image, env)
    message = str(info.value)
    assert f"spec.trainerImage {image!r}" in message and ALLOWED_IMAGES_ENV in message
    assert "allowedTrainerImages" in message and "ghcr.io/ddm/ddm-trainer:*" in message
