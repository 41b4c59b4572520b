"""bench/saved_activations.py reads what a compiled DiT block saves for its backward from inductor's partitioner (its
figures corrected an estimate in BENCHMARKS.md): the block's input and the MLP's hidden activations must be there,
with the batch scaling of activations and not of weights."""
from __future__ import annotations

import torch

from ddm_trainer.models.dit import build_dit
from fixtures.bench import load_bench


def test_the_saved_tensors_of_a_block_are_read_from_the_partition() -> None:
    bench = load_bench("saved_activations")
    model = build_dit("DiT-N/4", 8, 3, num_classes=10)
    block, dim, tokens = model.blocks[0], model.pos_embed.shape[-1], model.pos_embed.shape[1]
    x, c = torch.randn(2, tokens, dim, requires_grad=True), torch.randn(2, dim, requires_grad=True)
    saved = bench.saved_tensors(block, (x, c), 1.0)
    shapes = {(tuple(r["shape"]), r["dtype"]) for r in saved}
    assert ((2, tokens, dim), "float32") in shapes  # the residual stream entering the block (fp32 under autocast)
    assert ((2 * tokens, 4 * dim), "bfloat16") in shapes  # fc1's output: GELU's input, for its backward
    assert all(r["bytes"] > 0 for r in saved)
