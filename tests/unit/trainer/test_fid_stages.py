"""Evaluation, distillation and the monolith baseline on a real file store with tiny DiTs and real Fashion-MNIST."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from ddm_trainer import fid, layout
from ddm_trainer.checkpoint import latest_checkpoint, load_checkpoint, load_final, save_final
from ddm_trainer.cli import load_config
from ddm_trainer.clustering import ASSIGNMENTS, mixture_counts
from ddm_trainer.configs.distill import DistillConfig
from ddm_trainer.configs.evaluate import EvaluateConfig
from ddm_trainer.configs.expert import ExpertConfig
from ddm_trainer.data import open_source
from ddm_trainer.errors import ConfigError, DataError, MissingArtifactError
from ddm_trainer.models.dit import build_dit
from ddm_trainer.models.router import RouterSpec, build_router_from_spec
from ddm_trainer.stages import distill, evaluate, expert
from ddm_trainer.store import FileStore

torch.set_num_threads(1)
SIZE, CHANNELS, N_DATA = 8, 1, 64
TINY_TRAIN = dict(batch_size=8, lr=2e-3, precision="fp32", ema_decay=0.5, warmup_steps=0, log_every=1,
                  deterministic=True)


def _spec(preset: str = "DiT-N/4") -> dict[str, Any]:
    return {"arch": "dit", "preset": preset, "image_size": SIZE, "channels": CHANNELS, "num_classes": None}


def _commit_dit(store: FileStore, stage_dir: str, seed: int, preset: str = "DiT-N/4") -> None:
    torch.manual_seed(seed)
    model = build_dit(preset, SIZE, CHANNELS)
    for p in model.parameters():  # DiT starts with zero output layers: perturb so the velocity is not zero
        p.data.add_(0.05 * torch.randn_like(p))
    save_final(store, stage_dir, model.state_dict(), model.state_dict(), {"model": _spec(preset), "stage": {}})


@pytest.fixture
def data(fashion_mnist_data_config: Callable[..., Any]) -> Any:
    return fashion_mnist_data_config(image_size=SIZE, channels=CHANNELS, limit=N_DATA)


@pytest.fixture
def run_store(tmp_path: Path, data: Any) -> FileStore:
    """Two random-init experts, a K=2 router, a monolith and a committed 2-way clustering of the data."""
    store = FileStore(tmp_path / "run")
    for k in range(2):
        _commit_dit(store, layout.expert(k), 100 + k)
    _commit_dit(store, expert.MONOLITH, 200)
    spec = RouterSpec("Router-N/4", SIZE, CHANNELS, 2)
    torch.manual_seed(7)
    router = build_router_from_spec(spec)
    save_final(store, layout.ROUTER, router.state_dict(), router.state_dict(), {"model": spec.as_dict(), "stage": {}})
    keys = open_source(data).keys()
    cluster = np.arange(len(keys)) % 2  # (N,) a fixed 2-way split
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(keys), cluster=cluster.astype(np.int64), fine=np.full(len(keys), -1))
    store.commit(layout.CLUSTERING, {ASSIGNMENTS: buf.getvalue()}, meta={"num_clusters": 2})
    return store


def _eval_cfg(store: FileStore, data: Any, **kw: Any) -> EvaluateConfig:
    fields: dict[str, Any] = dict(run_uri=store.uri, data=data.model_dump(), device="cpu", n_samples=10,
                                  reference_n=20, batch_size=10, steps=2, kid_subsets=5, grid_count=4)
    fields.update(kw)
    return EvaluateConfig(**fields)


# -- evaluation ----------------------------------------------------------------------------------------------------
def needs_inception() -> None:
    """Skip when the FID Inception weights cannot be had (no registry and no DDM_INCEPTION_WEIGHTS)."""
    try:
        fid.inception_weights_path()
    except fid.FIDSetupError as e:
        pytest.skip(str(e))


def test_evaluate_rejects_bad_input_before_sampling(run_store: FileStore, data: Any, tmp_path: Path) -> None:
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(json.dumps({"run_uri": run_store.uri, "data": {"uri": data.uri}, "strategies": ["best"]}))
    with pytest.raises(ConfigError, match="unknown strategy 'best'"):
        load_config("evaluate", str(cfg_file))
    with pytest.raises(ConfigError, match="keeps 3 experts but the run has only 2"):
        evaluate.validate(_eval_cfg(run_store, data, strategies=["top-3"]), run_store)
    with pytest.raises(ConfigError, match="1x8px images but data .* is 1x16px"):
        evaluate.validate(_eval_cfg(run_store, data.model_copy(update={"image_size": 16})), run_store)
    with pytest.raises(ValueError, match="reference_n=65 exceeds data.limit=64"):
        _eval_cfg(run_store, data, reference_n=N_DATA + 1)
    unlimited = data.model_copy(update={"limit": None})
    total = len(open_source(unlimited))
    with pytest.raises(DataError, match=f"reference_n={total + 1} but data.uri .* holds {total} images"):
        evaluate.validate(_eval_cfg(run_store, unlimited, reference_n=total + 1), run_store)
    run_store.delete_prefix(layout.final(expert.MONOLITH))
    with pytest.raises(MissingArtifactError, match="experts/monolith/final"):
        evaluate.validate(_eval_cfg(run_store, data, strategies=["full", "monolith"]), run_store)
    run_store.delete_prefix(layout.final(layout.expert(1)))  # a partial ensemble: what needs expert 1 is refused
    with pytest.raises(MissingArtifactError, match="experts/001/final"):
        evaluate.run(_eval_cfg(run_store, data, strategies=["full", "oracle-1"]))
    assert run_store.read_manifest(layout.EVALUATION) is None  # nothing sampled, nothing committed


@pytest.mark.slow
def test_a_partial_ensemble_is_evaluated_and_says_which_experts_it_held(run_store: FileStore, data: Any) -> None:
    """An expert failed for good (minExperts below K): the evaluation samples with the others and says so."""
    needs_inception()
    run_store.delete_prefix(layout.final(layout.expert(1)))
    result = evaluate.run(_eval_cfg(run_store, data, strategies=["full", "top1"]))
    assert (result["experts"], result["missing_experts"]) == ([0], [1])
    assert run_store.read_manifest(layout.EVALUATION)["missing_experts"] == [1]  # type: ignore[index]
    md = run_store.get_bytes(f"{layout.EVALUATION}/results.md").decode()
    assert "a partial ensemble of experts [0] of 2 (missing: [1])" in md
    assert all(r["nfe"] == 2.0 for r in result["table"])  # one expert, 2 steps: expert 1 never ran


def test_the_mixture_oracle_row_asks_one_expert_per_sample_and_no_router(run_store: FileStore, data: Any) -> None:
    """This run's clustering manifest predates the class counts: ``oracle`` counts them from the data's labels."""
    needs_inception()
    counts = mixture_counts(run_store, data)
    assert counts.shape[0] == 2 and counts.sum() == N_DATA and counts.sum(axis=1).tolist() == [N_DATA // 2] * 2
    run_store.delete_prefix(layout.final(layout.ROUTER))  # the oracle needs no router
    [row] = evaluate.run(_eval_cfg(run_store, data, strategies=["oracle"]))["table"]
    assert row["strategy"] == "oracle" and row["n"] == 10 and math.isfinite(row["fid"])
    assert row["nfe"] == 2  # 2 steps, one expert each: never a mix


@pytest.mark.slow
def test_evaluate_writes_table_grids_and_reuses_reference(run_store: FileStore, data: Any) -> None:
    needs_inception()
    cfg = _eval_cfg(run_store, data, strategies=["full", "top1", "monolith"])
    result = evaluate.run(cfg)
    rows = {r["strategy"]: r for r in result["table"]}
    assert list(rows) == ["full", "top1", "monolith"]
    for r in rows.values():
        assert math.isfinite(r["fid"]) and r["fid"] > 0 and math.isfinite(r["kid_mean"]) and r["n"] == 10
    assert rows["full"]["nfe"] == 2 * 2 and rows["top1"]["nfe"] == 2 and rows["monolith"]["nfe"] == 2
    manifest = run_store.read_manifest(layout.EVALUATION)
    assert manifest is not None and [r["strategy"] for r in manifest["table"]] == ["full", "top1", "monolith"]
    for name in ("results.json", "results.md", "grids/full.png", "grids/top1.png", "grids/monolith.png"):
        assert name in manifest["files"]
    assert "| monolith |" in run_store.read_committed(layout.EVALUATION, "results.md").decode()
    # The reference features are committed once and reused (not recomputed) by the next run.
    [ref] = run_store.committed_prefixes(evaluate.REFERENCE)
    first = run_store.read_manifest(ref)
    again = evaluate.run(cfg.model_copy(update={"strategies": ["top1"]}))
    assert run_store.read_manifest(ref) == first
    assert again["table"][0]["fid"] == pytest.approx(rows["top1"]["fid"], rel=1e-6)  # same seed, same samples


def test_sample_batches_do_not_depend_on_the_number_of_ranks(run_store: FileStore) -> None:
    """Ranks draw disjoint batches whose union is exactly the single-process draw (noise per sample index)."""
    from ddm_trainer.stages.sample import Draw, sample_batches, sampler_for

    sampler, spec = sampler_for(run_store, "sample-1", steps=2)
    draw = Draw(n=10, batch_size=3, seed=4)
    single = {start: x for start, x, _ in sample_batches(sampler, spec, draw)}
    shared = {start: x for rank in range(3) for start, x, _ in sample_batches(sampler, spec, draw, rank, 3)}
    assert sorted(single) == sorted(shared) == [0, 3, 6, 9]
    assert all(torch.equal(single[k], shared[k]) for k in single)
    assert sum(x.shape[0] for x in single.values()) == 10


@pytest.mark.slow
def test_restarted_evaluation_goes_on_with_the_next_strategy(run_store: FileStore, data: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    needs_inception()
    cfg = _eval_cfg(run_store, data, strategies=["full", "top1"])
    real_strategy = evaluate.evaluate_strategy
    sampled: list[str] = []

    def crash_on_top1(cfg: Any, store: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        sampled.append(name)
        if name == "top1":
            raise RuntimeError("node lost")
        return real_strategy(cfg, store, name, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_strategy", crash_on_top1)
    with pytest.raises(RuntimeError, match="node lost"):
        evaluate.run(cfg)
    assert run_store.read_manifest(layout.EVALUATION) is None
    assert run_store.read_manifest(evaluate.strategy_prefix("full")) is not None
    sampled.clear()
    monkeypatch.setattr(evaluate, "evaluate_strategy", lambda cfg, store, name, *a, **kw: (sampled.append(name),
                                                                                          real_strategy(cfg, store, name, *a, **kw))[1])
    result = evaluate.run(cfg)
    assert sampled == ["top1"]  # full's committed row is reused
    assert [r["strategy"] for r in result["table"]] == ["full", "top1"]
    # Other settings are another row: it is sampled again.
    sampled.clear()
    evaluate.run(cfg.model_copy(update={"steps": 3}))
    assert sampled == ["full", "top1"]


@pytest.mark.slow
def test_the_students_row_joins_the_committed_table(run_store: FileStore, data: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation run again with the student's row (the operator's evaluate-student): the committed rows are read
    back, only the student is sampled, as a K=1 ensemble whose GFLOPs are its own model's."""
    needs_inception()
    cfg = _eval_cfg(run_store, data, strategies=["top1", "monolith"])
    first = evaluate.run(cfg)
    with_student = cfg.model_copy(update={"strategies": ["top1", "monolith", "student"], "progress": "evaluate-student"})
    with pytest.raises(MissingArtifactError, match="'student' needs committed final weights at .*distillation/final"):
        evaluate.validate(with_student, run_store)
    _commit_dit(run_store, layout.DISTILLATION, 300, preset="DiT-T/4")  # wider and deeper than the DiT-N/4s
    real_strategy, sampled = evaluate.evaluate_strategy, []
    monkeypatch.setattr(evaluate, "evaluate_strategy", lambda cfg, store, name, *a, **kw: (
        sampled.append(name), real_strategy(cfg, store, name, *a, **kw))[1])
    result = evaluate.run(with_student)
    assert sampled == ["student"]
    rows = {r["strategy"]: r for r in result["table"]}
    assert list(rows) == ["top1", "monolith", "student"]
    assert [rows[r["strategy"]] for r in first["table"]] == first["table"]  # read back as committed
    student = rows["student"]
    assert math.isfinite(student["fid"]) and student["fid"] > 0 and student["nfe"] == 2 and student["n"] == 10
    flops = build_dit("DiT-T/4", SIZE, CHANNELS).forward_flops(1) / 1e9
    assert student["gflops_per_sample"] == pytest.approx(2 * flops, rel=1e-6)
    assert student["gflops_per_sample"] > 2 * rows["monolith"]["gflops_per_sample"]
    manifest = run_store.read_manifest(layout.EVALUATION)
    assert manifest is not None and [r["strategy"] for r in manifest["table"]] == ["top1", "monolith", "student"]
    assert "grids/student.png" in manifest["files"] and "grids/top1.png" in manifest["files"]
    assert run_store.get_json("progress/evaluate-student.json")["event"] == "done"


# -- monolith baseline ---------------------------------------------------------------------------------------------
def _stream_samples(store: FileStore, stage_dir: str) -> int:
    """How many samples the data stream of a stage's newest checkpoint draws from."""
    prefix = latest_checkpoint(store, stage_dir)
    assert prefix is not None
    state = load_checkpoint(store, prefix)
    found = [v["num_samples"] for v in _walk(state) if isinstance(v, dict) and "num_samples" in v]
    assert found, f"no stream state in {prefix}"
    return int(found[0])


def _walk(obj: Any) -> Any:
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    for c in children:
        yield from _walk(c)


def test_monolith_expert_trains_on_all_keys_and_cluster_expert_on_its_own(run_store: FileStore, data: Any) -> None:
    run_store.delete_prefix(expert.MONOLITH)
    run_store.delete_prefix(layout.expert(0))
    common = dict(run_uri=run_store.uri, data=data.model_dump(), device="cpu", model="DiT-N/4",
                  train=dict(steps=2, ckpt_every=1, keep_checkpoints=1, **TINY_TRAIN), sample_grid=dict(count=0))
    expert.run(ExpertConfig(cluster_index=None, **common))
    expert.run(ExpertConfig(cluster_index=0, **common))
    assert _stream_samples(run_store, expert.MONOLITH) == N_DATA  # every key, not one cluster's
    assert _stream_samples(run_store, layout.expert(0)) == N_DATA // 2
    final = load_final(run_store, expert.MONOLITH)
    assert final.config["stage"]["cluster_index"] is None and final.config["step"] == 2


# -- distillation --------------------------------------------------------------------------------------------------
def _distill_cfg(store: FileStore, data: Any, **train: Any) -> DistillConfig:
    fields: dict[str, Any] = dict(steps=30, ckpt_every=1000, **TINY_TRAIN)
    fields.update(train)
    return DistillConfig(run_uri=store.uri, data=data.model_dump(), device="cpu", model="DiT-N/4", seed=3,
                         train=fields, sample_grid=dict(count=4, nrow=2, steps=2))


def _student_teacher_mse(store: FileStore, data: Any, student: torch.nn.Module) -> float:
    """The distillation loss on 64 fixed (x_t, t) draws against each image's own cluster expert."""
    teachers = [expert.load_expert(store, layout.expert(k)) for k in range(2)]
    source = open_source(data)
    batch = source.load(source.keys())
    cluster = torch.arange(len(batch.keys)) % 2  # the fixture's split
    loss_fn = distill.distill_loss(distill.expert_of_cluster_teacher(teachers), "uniform")
    with torch.no_grad():
        return float(loss_fn(student.eval(), {"x0": batch.images, "cluster": cluster}, torch.Generator().manual_seed(0)))


def test_distillation_reduces_student_teacher_mse(run_store: FileStore, data: Any) -> None:
    torch.manual_seed(3)
    before = _student_teacher_mse(run_store, data, build_dit("DiT-N/4", SIZE, CHANNELS))
    losses = distill.run(_distill_cfg(run_store, data))
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    final = load_final(run_store, layout.DISTILLATION)
    student = build_dit(final.config["model"]["preset"], SIZE, CHANNELS)
    student.load_state_dict(final.model)
    after = _student_teacher_mse(run_store, data, student)
    assert after < 0.7 * before, (before, after)
    report = run_store.read_manifest(f"{layout.DISTILLATION}/report")
    assert report is not None and "samples.png" in report["files"]


def test_distillation_from_the_router_ensemble_runs(run_store: FileStore, data: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _distill_cfg(run_store, data, steps=2).model_copy(update={"teacher": "ensemble", "strategy": "top1"})
    assert len(distill.run(cfg)) == 2
    said = capsys.readouterr().out  # unconditional teachers: nothing to drop
    assert "distill: student DiT-N/4, 2 steps of 8, from teacher ensemble (top1) over 2 experts\n" in said
    run_store.delete_prefix(layout.DISTILLATION)
    run_store.delete_prefix(layout.final(layout.expert(1)))
    with pytest.raises(MissingArtifactError, match="experts/001/final"):
        distill.run(_distill_cfg(run_store, data, steps=2))


def test_distillation_resumes_exactly_after_a_kill(run_store: FileStore, data: Any, tmp_path: Path) -> None:
    """ddm-train distill SIGKILLed right after its step-2 checkpoint, rerun: the same weights as an unbroken run."""
    import shutil

    other = FileStore(tmp_path / "unbroken")
    shutil.copytree(run_store.root, other.root)

    def command(store: FileStore, name: str) -> list[str]:
        cfg_file = tmp_path / name
        cfg_file.write_text(_distill_cfg(store, data, steps=4, ckpt_every=2).model_dump_json())
        return [sys.executable, "-m", "ddm_trainer.cli", "distill", "--config", str(cfg_file)]

    # Both runs in subprocesses with one thread: bitwise equality needs the same reduction order on both sides.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    unbroken = subprocess.run(command(other, "unbroken.json"), env=env, capture_output=True, text=True, timeout=300)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    cmd = command(run_store, "distill.json")
    env["DDM_TEST_CRASH_AT"] = "after_manifest:step=2"
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_checkpoint(run_store, layout.DISTILLATION) is not None
    assert run_store.read_manifest(layout.final(layout.DISTILLATION)) is None
    env.pop("DDM_TEST_CRASH_AT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"event": "resumed"' in done.stdout
    ours, theirs = load_final(run_store, layout.DISTILLATION), load_final(other, layout.DISTILLATION)
    for name, tensor in theirs.model.items():
        assert torch.equal(ours.model[name], tensor), name


@pytest.mark.slow
def test_two_rank_evaluation_matches_one_process(run_store: FileStore, data: Any, tmp_path: Path) -> None:
    """torchrun with 2 CPU ranks (gloo): each samples half, rank 0 gathers the features; the FID is the one a
    single process gets from the same seed."""
    needs_inception()
    single = evaluate.run(_eval_cfg(run_store, data, strategies=["top1"], batch_size=3))
    two = FileStore(tmp_path / "two")
    for key in run_store.list(""):
        if not key.startswith(layout.EVALUATION):
            two.put_bytes(key, run_store.get_bytes(key))
    cfg_file = tmp_path / "eval.json"
    cfg_file.write_text(_eval_cfg(two, data, strategies=["top1"], batch_size=3).model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        try:
            code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   "2", "-m", "ddm_trainer.cli", "evaluate", "--config", str(cfg_file)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
        except subprocess.TimeoutExpired:
            code = None
    assert code == 0, log.read_text()[-4000:]
    row = json.loads(two.read_committed(layout.EVALUATION, "results.json"))["table"][0]
    assert json.loads(two.read_committed(layout.EVALUATION, "results.json"))["world_size"] == 2
    assert row["fid"] == pytest.approx(single["table"][0]["fid"], rel=1e-4)
    assert row["nfe"] == single["table"][0]["nfe"] and row["n"] == 10
