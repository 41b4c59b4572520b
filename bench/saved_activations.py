"""What one compiled DiT block saves for its backward pass, as inductor's partitioner decides it: the saved tensors
(shape, dtype, bytes at the stated batch) of one block under bf16 autocast.

Runs on the CPU in seconds (the partition is a property of the graph, not of the device): the block is traced with
inductor's decompositions and partitioned by ``min_cut_rematerialization_partition(compiler="inductor")``, the
partitioner ``torch.compile`` uses, at a small batch; the bytes are scaled to ``--batch``. ``--budgets`` lowers
``torch._functorch.config.activation_memory_budget`` (1.0, the default: save what minimises runtime), to see what
the partitioner would recompute instead. The question it answers: does saving activations cost memory traffic a
step could win back (tensors the forward would not otherwise write), or only memory?

    python bench/saved_activations.py --preset DiT-XL/2 --batch 256 --budgets 1.0,0.6
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))
from ddm_trainer.models.dit import build_dit  # noqa: E402


def saved_tensors(block: torch.nn.Module, inputs: tuple[torch.Tensor, ...], budget: float) -> list[dict[str, Any]]:
    """The forward graph's extra outputs (what the backward reads) under inductor's partitioner at ``budget``."""
    import functools

    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    saved: list[dict[str, Any]] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in out:
            meta = node.meta.get("val") if node is not None else None
            if isinstance(meta, torch.Tensor):
                saved.append({"name": node.name, "shape": list(meta.shape), "dtype": str(meta.dtype).replace(
                    "torch.", ""), "bytes": meta.numel() * meta.element_size()})
        return gm

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
                           decompositions=select_decomp_table())
    torch._dynamo.reset()
    with functorch_config.patch(activation_memory_budget=budget):
        compiled = torch.compile(block, backend=backend, fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(*inputs).sum().backward()
    return saved[1:]  # the first output is the block's own


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="the bytes are reported at this batch")
    p.add_argument("--trace-batch", type=int, default=2, help="the batch the block is traced at (CPU memory)")
    p.add_argument("--budgets", default="1.0")
    p.add_argument("--json", default=None, help="also write the tables here")
    args = p.parse_args(argv)

    model = build_dit(args.preset, args.image_size, args.channels, num_classes=10)
    block, dim = model.blocks[0], model.pos_embed.shape[-1]
    tokens = model.pos_embed.shape[1]
    b = args.trace_batch
    x = torch.randn(b, tokens, dim, requires_grad=True)  # (B, T, D): the residual stream, fp32 under autocast
    c = torch.randn(b, dim, requires_grad=True)  # (B, D): the conditioning
    scale = args.batch / b
    result = {}
    for budget in (float(v) for v in args.budgets.split(",")):
        rows = saved_tensors(block, (x, c), budget)
        # activations scale with the batch ((B, ...) or the flattened (B*T, ...)); the bf16 weight copies do not
        per_batch = [r for r in rows if r["shape"] and r["shape"][0] in (b, b * tokens)]
        total = sum(r["bytes"] * (scale if r in per_batch else 1) for r in rows)
        result[budget] = {"saved": rows, "bytes_at_batch": total}
        print(f"\nbudget {budget}: {len(rows)} saved tensors, {total / 1e9:.2f} GB per block at batch {args.batch} "
              f"({args.preset}, {tokens} tokens x {dim})")
        for r in rows:
            at = r["bytes"] * (scale if r in per_batch else 1)
            print(f"  {r['name']:<28} {str(r['shape']):<22} {r['dtype']:<9} {at / 1e6:9.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
