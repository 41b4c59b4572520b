"""bench/paper_study.py drives the product: every arm's generated spec must be one the API accepts, and the arms
must really differ only where the study says (clustering method, K) while seeing the same images."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ddm_operator.api.models import DecentralizedDiffusion

ROOT = Path(__file__).resolve().parents[2]


def load_study():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("paper_study", ROOT / "bench" / "paper_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_every_arm_is_a_valid_spec_with_the_same_images_seen(tmp_path: Path) -> None:
    study = load_study()
    args = study.parse_args(["--data", "datasets/cifar10/*.tar.gz", "--work", str(tmp_path), "--images", "1024000"])
    specs = {arm: study.arm_spec(args, arm, monolith=i == 0, distil=arm == "features-8")
             for i, arm in enumerate(["features-4", "features-8", "random-8"])}
    models = {arm: DecentralizedDiffusion.model_validate(s) for arm, s in specs.items()}
    seen = {arm: m.spec.experts.steps * m.spec.experts.batch_size * m.spec.clustering.num_clusters
            for arm, m in models.items()}
    assert set(seen.values()) == {1_024_000}, seen
    assert models["features-4"].spec.baseline is not None and models["features-8"].spec.baseline is None
    assert models["features-8"].spec.distillation is not None and models["features-8"].spec.distillation.enabled
    assert models["random-8"].spec.clustering.method == "random"
    assert models["features-8"].spec.clustering.method == "kmeans"
    assert models["features-8"].spec.experts.class_conditional and models["features-8"].spec.evaluation.cfg_scale == 1.5


def test_an_arm_that_is_not_features_or_random_k_is_refused(tmp_path: Path) -> None:
    study = load_study()
    with pytest.raises(SystemExit, match="not features-K or random-K"):
        study.arm_spec(study.parse_args(["--data", "d", "--work", str(tmp_path)]), "kmeans-4", monolith=False, distil=False)
