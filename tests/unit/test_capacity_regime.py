"""bench/capacity_regime.py splits the monolith's budget among the experts as the paper study's arms do, and scores
every arm at checkpoints that exist: what it hands ``ddm-train expert`` must be a config the stage accepts."""
from __future__ import annotations

import argparse
import math

from fixtures.bench import load_bench


def test_checkpoints_scored_are_even_fractions_of_a_run_ending_at_its_last_step() -> None:
    bench = load_bench("capacity_regime")
    assert bench.checkpoint_steps(6000, 6) == [1000, 2000, 3000, 4000, 5000, 6000]
    # an expert's share rarely divides evenly: the last point is its final weights, not a checkpoint
    assert bench.checkpoint_steps(4103, 4) == [1025, 2050, 3075, 4103]


def test_each_expert_trains_at_the_studys_square_root_learning_rate_and_keeps_every_scored_checkpoint() -> None:
    from ddm_trainer.configs.expert import ExpertConfig

    bench = load_bench("capacity_regime")
    args = argparse.Namespace(preset="DiT-N/4", device="cpu", seed=0, lr=3e-4, ema=0.9995, batch=256)
    data = {"uri": "shards/*.tar.gz", "image_size": 32, "channels": 3, "class_field": "cls"}
    monolith = ExpertConfig.model_validate(bench.expert_config("/run", data, None, args, 6000, 256, 6))
    expert = ExpertConfig.model_validate(bench.expert_config("/run", data, 2, args, 4103, 64, 6))
    assert monolith.cluster_index is None and monolith.train.lr == 3e-4
    assert expert.cluster_index == 2 and math.isclose(expert.train.lr, 3e-4 * math.sqrt(64 / 256))
    for cfg, steps in ((monolith, 6000), (expert, 4103)):
        scored = bench.checkpoint_steps(steps, 6)[:-1]
        assert all(s % cfg.train.ckpt_every == 0 for s in scored)  # each one is a checkpoint the stage writes
        assert cfg.train.keep_checkpoints >= len(scored)  # and none is pruned before it is scored
