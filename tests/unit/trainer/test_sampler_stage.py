"""The sample stage and ``generate()`` on a real file store holding tiny (random-init) DiT experts and a router."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm_trainer import layout
from ddm_trainer.checkpoint import save_final
from ddm_trainer.cli import load_config, main
from ddm_trainer.errors import ConfigError, MissingArtifactError
from ddm_trainer.models.dit import build_dit
from ddm_trainer.models.router import RouterSpec, build_router_from_spec
from ddm_trainer.stages.sample import generate, validate_ensemble
from ddm_trainer.store import FileStore

torch.set_num_threads(1)
SIZE, CHANNELS = 8, 1


def _commit_expert(store: FileStore, k: int, num_classes: int | None = None) -> None:
    torch.manual_seed(100 + k)
    model = build_dit("DiT-N/4", SIZE, CHANNELS, num_classes)
    for p in model.parameters():  # DiT starts with zero output layers; perturb so experts differ
        p.data.add_(0.05 * torch.randn_like(p))
    spec = {"arch": "dit", "preset": "DiT-N/4", "image_size": SIZE, "channels": CHANNELS, "num_classes": num_classes}
    save_final(store, layout.expert(k), model.state_dict(), model.state_dict(), {"model": spec, "stage": {}})


def _commit_router(store: FileStore, k: int) -> None:
    spec = RouterSpec("Router-N/4", SIZE, CHANNELS, k)
    torch.manual_seed(7)
    router = build_router_from_spec(spec)
    router.head.weight.data.normal_(std=1.0)  # confident enough that top1 and full differ
    save_final(store, layout.ROUTER, router.state_dict(), router.state_dict(), {"model": spec.as_dict(), "stage": {}})


@pytest.fixture
def run_store(tmp_path: Path) -> FileStore:
    store = FileStore(tmp_path / "run")
    for k in range(3):
        _commit_expert(store, k)
    _commit_router(store, 3)
    return store


def test_generate_is_deterministic_and_counts_cost(run_store: FileStore):
    images, stats = generate(run_store, "top1", n=6, batch_size=4, steps=3, seed=1)
    assert images.shape == (6, CHANNELS, SIZE, SIZE)
    assert images.min() >= -1 and images.max() <= 1
    again, _ = generate(run_store, "top1", n=6, batch_size=4, steps=3, seed=1)
    assert torch.equal(images, again)
    other, _ = generate(run_store, "top1", n=6, batch_size=4, steps=3, seed=2)
    assert not torch.equal(images, other)
    expert_gflops = build_dit("DiT-N/4", SIZE, CHANNELS).forward_flops() / 1e9
    router_gflops = build_router_from_spec(RouterSpec("Router-N/4", SIZE, CHANNELS, 3)).forward_flops() / 1e9
    assert stats["nfe"] == 3 and stats["router_nfe"] == 3
    assert stats["gflops_per_sample"] == pytest.approx(3 * (expert_gflops + router_gflops))
    _, full = generate(run_store, "full", n=2, batch_size=2, steps=3, seed=1)
    assert full["nfe"] == 3 * 3
    full_images, _ = generate(run_store, "full", n=6, batch_size=4, steps=3, seed=1)
    assert not torch.equal(full_images, images)


def test_a_partial_ensemble_samples_with_the_committed_experts(run_store: FileStore):
    """Expert 1 failed for good (or still trains): the others sample, the router renormalised over them; what
    needs expert 1 is refused before sampling, naming its missing weights."""
    run_store.delete_prefix(layout.final(layout.expert(1)))
    ensemble = validate_ensemble(run_store, "full")
    assert (ensemble.present, ensemble.missing) == ([0, 2], [1])
    with pytest.raises(MissingArtifactError) as err:
        validate_ensemble(run_store, "oracle-1")
    assert run_store.url(layout.final(layout.expert(1))) in str(err.value)
    with pytest.raises(ConfigError, match="keeps 3 experts but only 2 of 3 have committed"):
        validate_ensemble(run_store, "top-3")
    for strategy in ("full", "top1", "nucleus-0.9", "oracle-0"):
        images, stats = generate(run_store, strategy, n=4, steps=2)
        assert images.shape == (4, 1, SIZE, SIZE) and torch.isfinite(images).all()
        assert (stats["experts"], stats["missing_experts"]) == ([0, 2], [1])
        assert "1" not in stats["expert_calls"], (strategy, stats["expert_calls"])  # never asked
    _, full = generate(run_store, "full", n=4, steps=2)
    assert full["nfe"] == 2 * 2  # two present experts at every step


def test_router_cluster_count_must_match_committed_experts(run_store: FileStore):
    _commit_expert(run_store, 3)
    with pytest.raises(ConfigError, match="router has 3 clusters but 4 experts"):
        generate(run_store, "full", n=2, steps=1)
    _commit_router(run_store, 5)  # expert 4 not (yet) committed: a partial ensemble of 4 of 5
    _, stats = generate(run_store, "full", n=2, steps=1)
    assert stats["missing_experts"] == [4]


def test_unknown_strategy_and_missing_router(run_store: FileStore, tmp_path: Path):
    with pytest.raises(ConfigError, match="'best-of'"):
        generate(run_store, "best-of", n=2, steps=1)
    run_store.delete_prefix(layout.ROUTER)
    with pytest.raises(MissingArtifactError, match="router/final"):
        generate(run_store, "top1", n=2, steps=1)
    images, stats = generate(run_store, "oracle-2", n=2, steps=2)  # the oracle needs no router
    assert stats["router_nfe"] == 0 and images.shape[0] == 2


def test_class_conditional_experts_with_guidance(tmp_path: Path):
    store = FileStore(tmp_path / "cond")
    for k in range(2):
        _commit_expert(store, k, num_classes=4)
    _commit_router(store, 2)
    images, stats = generate(store, "top1", n=4, batch_size=4, steps=2, cfg_scale=2.0, labels=[1, 3])
    assert stats["labels"] == [1, 3, 1, 3]
    assert stats["nfe"] == 2 * 2  # a guided pair per step
    with pytest.raises(ConfigError, match="label 9"):
        generate(store, "top1", n=2, steps=1, labels=[9])


def test_sample_stage_cli_writes_grid_npz_and_manifest(run_store: FileStore, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    cfg_path = tmp_path / "sample.yaml"
    cfg_path.write_text(json.dumps({"run_uri": str(run_store.root), "strategy": "top-2", "n": 5, "batch_size": 4,
                                    "steps": 2, "device": "cpu", "nrow": 3}))
    assert main(["sample", "--config", str(cfg_path)]) == 0
    manifest = run_store.read_manifest("samples/top-2")
    assert manifest is not None and set(manifest["files"]) == {"grid.png", "samples.npz"}
    assert manifest["nfe"] == 2 * 2 and manifest["strategy"] == "top-2"
    data = np.load(io.BytesIO(run_store.read_committed("samples/top-2", "samples.npz")))
    assert data["images"].shape == (5, CHANNELS, SIZE, SIZE) and data["images"].dtype == np.uint8
    assert run_store.read_committed("samples/top-2", "grid.png")[:4] == b"\x89PNG"
    assert "nfe/image=4.00" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"run_uri": str(run_store.root), "strategy": "top-two"}))
    with pytest.raises(ConfigError, match="strategy.*'top-two'"):
        load_config("sample", str(bad))
    assert main(["sample", "--config", str(bad)]) == 2


@pytest.mark.parametrize("preset,size,channels,k", [("Router-T/4", 16, 1, 4), ("Router-N/4", 8, 3, 2),
                                                    ("Router-T/2", 8, 3, 8)])
def test_router_forward_flops_match_torch_flop_counter(preset: str, size: int, channels: int, k: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    router = build_router_from_spec(RouterSpec(preset, size, channels, k))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math path: attention as bmm
        logits = router(torch.randn(2, channels, size, size), torch.rand(2))
    assert logits.shape == (2, k)
    assert router.forward_flops(batch=2) == counter.get_total_flops()


def test_router_presets_are_validated():
    with pytest.raises(ConfigError, match="unknown router preset 'Router-XL/2'"):
        build_router_from_spec(RouterSpec("Router-XL/2", 32, 3, 4))
    with pytest.raises(ConfigError, match="not a multiple"):
        build_router_from_spec(RouterSpec("Router-T/4", 18, 3, 4))
    with pytest.raises(ConfigError, match="num_clusters >= 2"):
        build_router_from_spec(RouterSpec("Router-T/4", 16, 3, 1))


def test_bf16_autocast_stays_close_to_fp32(run_store: FileStore):
    fp32, _ = generate(run_store, "top-2", n=4, batch_size=4, steps=3, seed=3)
    bf16, stats = generate(run_store, "top-2", n=4, batch_size=4, steps=3, seed=3, precision="bf16")
    assert bf16.dtype == torch.float32 and stats["precision"] == "bf16"
    assert not torch.equal(fp32, bf16)  # autocast really ran in bf16
    assert (fp32 - bf16).abs().max() < 0.1
    with pytest.raises(ConfigError, match="'fp8'"):
        generate(run_store, "top-2", n=1, steps=1, precision="fp8")


def test_samplers_sharing_a_cache_read_each_model_once(run_store: FileStore, monkeypatch: pytest.MonkeyPatch):
    """The evaluation's strategies share one cache: each expert and the router is read (and compiled) once."""
    from ddm_trainer.stages import sample as sample_stage

    reads: list[str] = []
    real = sample_stage.load_final
    monkeypatch.setattr(sample_stage, "load_final", lambda store, d, **kw: reads.append(d) or real(store, d, **kw))
    models: dict = {}
    x1 = torch.randn(4, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    drawn = []
    for strategy in ("full", "top1", "top-2"):
        sampler, _ = sample_stage.sampler_for(run_store, strategy, steps=2, models=models)
        drawn.append(sampler.sample(x1, seed=0))
    assert sorted(reads) == [layout.expert(k) for k in range(3)]  # once each, not once per strategy
    assert {key[0] for key in models} == {"expert", "router"} and len(models) == 4
    uncached, _ = sample_stage.sampler_for(run_store, "top-2", steps=2)  # the cache changes no image
    assert torch.equal(uncached.sample(x1, seed=0), drawn[2])


@pytest.mark.parametrize("strategy,k,n,world,expected", [
    ("full", 4, 5000, 1, 1000),       # 5 batches of 1,000: every expert sees the whole batch
    ("top1", 4, 5000, 1, 2500),       # 4,096 wanted, evened out to 2 x 2,500 (each expert ~625 a call)
    ("top-2", 4, 10000, 1, 2000),     # 2,048 wanted -> 5 x 2,000
    ("top1", 8, 10000, 1, 3334),      # capped at 4 x 1,024, evened out: 3 x 3,334
    ("sample-2", 4, 10000, 2, 1667),  # per rank 5,000 at 2,048 -> 3 x 1,667
    ("oracle-1", 4, 3000, 1, 1000),   # one expert takes every sample: no growth
    ("nucleus-0.9", 4, 1024, 1, 1024),
])
def test_routed_strategies_draw_larger_batches(strategy: str, k: int, n: int, world: int, expected: int):
    from ddm_trainer.combine import parse_strategy
    from ddm_trainer.stages.evaluate import strategy_batch

    assert strategy_batch(1024, parse_strategy(strategy), k, n, world) == expected


def test_a_class_conditional_router_sees_the_labels():
    """The sampler (evaluation, sampling, the distillation teacher) hands y to a conditional router."""
    from ddm_trainer.models.router import build_router
    from ddm_trainer.sampler import CombinedSampler

    torch.manual_seed(0)
    router = build_router("Router-N/4", SIZE, CHANNELS, 3, num_classes=4)
    for param in router.parameters():  # adaLN-zero starts label-blind: perturb so labels change the logits
        param.data.add_(torch.randn_like(param))
    calls: list = []
    real = router.forward
    router.forward = lambda x, t, y=None: (calls.append((y, real(x, t, y))), calls[-1][1])[1]  # type: ignore
    experts = [build_dit("DiT-N/4", SIZE, CHANNELS, 4) for _ in range(3)]
    sampler = CombinedSampler(experts, router, "top1", steps=1, null_label=4)
    x, t = torch.randn(6, CHANNELS, SIZE, SIZE), torch.full((6,), 0.99)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    sampler.weights(x, t, y=y)
    sampler.weights(x, t)
    (given, with_y), (none, marginal) = calls
    assert given is y and none is None and not torch.allclose(with_y, marginal)
    sampler.sample(x, y)
    assert calls[-1][0] is not None and torch.equal(calls[-1][0], y)


def test_compiled_blocks_take_any_batch_size_without_recompiling() -> None:
    """Routed strategies give every expert call a new batch size: the sampling compile marks the batch dynamic from
    the first call, so a second size costs no recompile (a static first compile paid ~5 s at the first routed
    step on an H100)."""
    import torch._dynamo

    from ddm_trainer.models.dit import build_dit
    from ddm_trainer.stages.sample import compile_blocks

    torch._dynamo.reset()
    model = compile_blocks(build_dit("DiT-T/4", 8, 1, num_classes=3).eval())
    graphs = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        model(torch.randn(6, 1, 8, 8), torch.rand(6), torch.randint(0, 3, (6,)))
        first = graphs["unique_graphs"]
        for b in (5, 11, 2):
            model(torch.randn(b, 1, 8, 8), torch.rand(b), torch.randint(0, 3, (b,)))
    assert first >= 1 and graphs["unique_graphs"] == first


def test_sigterm_stops_sampling_within_one_batch(run_store: FileStore, monkeypatch: pytest.MonkeyPatch):
    """A SIGTERM (the flag ``install_preemption_handler`` sets) stops the evaluation's and the sample stage's
    sampling before the next batch, with PreemptedError (exit 143: retry), instead of sampling on until the grace
    period's SIGKILL (an evaluation on the H100 went on 90 s after its SIGTERM)."""
    from ddm_trainer import progress
    from ddm_trainer.errors import ExitCode, PreemptedError
    from ddm_trainer.stages import sample

    drawn = []
    real_sample = sample.CombinedSampler.sample

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN202 - the second batch raises the flag
        drawn.append(1)
        if len(drawn) == 2:
            monkeypatch.setattr(progress, "_preempted", True)
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(sample.CombinedSampler, "sample", counting)
    with pytest.raises(PreemptedError, match="before sample 4 of 8") as e:
        generate(run_store, "full", n=8, batch_size=2, steps=2, seed=1)
    assert len(drawn) == 2 and e.value.exit_code == ExitCode.PREEMPTED


def test_combined_grid_gives_each_prompt_its_own_rows() -> None:
    """ddm sample's grid.png with several prompts: drawn image i has prompt i mod P, so in drawing order every row
    mixed the prompts (a CIFAR-10 grid of ten captions looked as if no prompt was followed)."""
    from ddm_trainer.stages.sample import by_prompt

    P, per_prompt, nrow = 3, 5, 4
    images = torch.arange(P * per_prompt, dtype=torch.float32).remainder(P).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    images = images / 10 - 0.9  # prompt p -> value p / 10 - 0.9 (never 1.0, the blank)
    grid = by_prompt(images, P, grid_max=P * per_prompt, nrow=nrow)
    rows = grid[:, 0, 0, 0].view(-1, nrow)  # one value per image, a row of the grid per line
    assert rows.shape == (P * 2, nrow)  # 5 images per prompt: 2 rows each, the second padded
    for p in range(P):
        block = rows[2 * p: 2 * p + 2].flatten()
        assert torch.allclose(block[:per_prompt], torch.full((per_prompt,), p / 10 - 0.9))
        assert torch.all(block[per_prompt:] == 1.0)  # white blanks, the grid's padding colour
    assert len(by_prompt(images, P, grid_max=6, nrow=nrow)) == P * nrow  # grid_max // P = 2 per prompt, one row


def test_combined_grid_names_each_prompt_beside_its_rows() -> None:
    from PIL import Image

    from ddm_trainer.stages.sample import LABEL_WIDTH, by_prompt, grid_png

    P, per_prompt, nrow, size = 3, 8, 4, 16
    images = by_prompt(torch.zeros(P * per_prompt, 3, size, size), P, P * per_prompt, nrow)  # black samples
    plain = np.asarray(Image.open(io.BytesIO(grid_png(images, nrow))))
    labelled = np.asarray(Image.open(io.BytesIO(grid_png(images, nrow, [(0, "a red square"), (2, "a green one"),
                                                                         (4, "x" * 200)]))))
    assert labelled.shape == (plain.shape[0], plain.shape[1] + LABEL_WIDTH, 3)
    assert np.array_equal(labelled[:, LABEL_WIDTH:], plain)  # the samples unchanged, right of the labels
    block = 2 * (size + 2)  # two grid rows per prompt
    for p in range(P):  # some text in each prompt's band of the label column
        band = labelled[p * block: (p + 1) * block, :LABEL_WIDTH]
        assert (band < 128).any(), f"no label beside prompt {p}'s rows"
    assert (labelled[:, LABEL_WIDTH - 4: LABEL_WIDTH] == 255).all()  # the 200-character label was cut to fit
