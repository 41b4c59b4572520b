"""``ddm run`` end to end through the real CLI: interrupted mid-experts, resumed to Succeeded, then a no-op re-run.

One tiny spec (200 Fashion-MNIST images at 16x16, K=2, tens of steps) runs the whole pipeline with real
subprocesses, a real file store and the real trainer stages.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ddm_trainer.store import FileStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DDM = str(Path(sys.executable).parent / "ddm")
STRATEGIES = ["full", "top1"]


def _spec(data_dir: Path, run_dir: Path) -> dict[str, object]:
    return {
        "apiVersion": "ddm.io/v1alpha1",
        "kind": "DecentralizedDiffusion",
        "metadata": {"name": "tiny"},
        "spec": {
            "dataset": {"uri": str(data_dir), "imageSize": 16, "channels": 1, "limit": 200},
            "clustering": {"encoder": "raw-pixels", "fineClusters": 8, "numClusters": 2},
            "experts": {"modelPreset": "DiT-T/4", "steps": 30, "batchSize": 16, "lr": 0.001, "precision": "fp32",
                        "checkpointEvery": 10, "gpusPerNode": 0},
            "router": {"preset": "DiT-T/4", "steps": 10, "batchSize": 16, "precision": "fp32", "gpusPerNode": 0},
            "evaluation": {"strategies": STRATEGIES, "numSamples": 8, "steps": 2},
            "distillation": {"enabled": True, "studentPreset": "DiT-T/4", "steps": 2, "batchSize": 8},
            "baseline": {"steps": 6},  # the monolith on all the data, one more row of the evaluation
            "storage": {"uri": str(run_dir)},
        },
    }


def _run(spec: Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DDM, "run", str(spec), "--parallel", "1"], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen[str]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"ddm run exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out; output: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


def test_interrupt_resume_and_rerun(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(fashion_mnist_dir, run_dir)))
    store = FileStore(run_dir)

    # 1. Start, and Ctrl-C once expert 0 is finished and expert 1 has committed a checkpoint.
    proc = subprocess.Popen([DDM, "run", str(spec), "--parallel", "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: store.read_manifest("experts/000/final") is not None
              and bool(store.committed_prefixes("experts/001/checkpoints")), 400, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Resume with: ddm run" in err
    assert store.read_manifest("experts/001/final") is None, "expert 1 should have been stopped mid-training"
    assert store.read_manifest("evaluation") is None
    # No orphans: every child got SIGTERM and exited (their pids are gone once ddm returned).
    assert "interrupted" in err

    # 2. Resume: finished stages are not relaunched; expert 1 continues from its checkpoint.
    resumed = _run(spec, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    launched = [ln.split()[2] for ln in resumed.stderr.splitlines() if ln.startswith("[ddm] launched")]
    assert "cluster" not in launched and "expert-000" not in launched and "router" not in launched, launched
    assert launched[:1] == ["expert-001"] and "evaluate" in launched and "distill" in launched
    assert launched.index("baseline") < launched.index("evaluate")  # ddm-train expert on all the data
    # the student's row: the evaluation again once both the table and the student are committed
    assert launched[-1] == "evaluate-student" and launched.index("distill") < launched.index("evaluate-student")
    table = store.read_manifest("evaluation")["table"]  # type: ignore[index]
    assert [r["strategy"] for r in table] == [*STRATEGIES, "monolith", "student"]
    student_log = (run_dir / "logs" / "evaluate-student.progress.jsonl").read_text()
    assert student_log.count('"event": "reused"') == len(STRATEGIES) + 1  # read back, not sampled again
    assert store.read_manifest("experts/monolith/final") is not None
    assert '"event": "resumed"' in (run_dir / "logs" / "expert-001.progress.jsonl").read_text()
    assert "Succeeded" in resumed.stderr

    # The report ties it together: one FID row per strategy, a grid per strategy.
    html = (run_dir / "report" / "index.html").read_text()
    for strategy in STRATEGIES:
        assert f"<td>{strategy}</td>" in html
        assert (run_dir / "report" / f"samples-{strategy}.png").stat().st_size > 0
    assert "<td>monolith</td>" in html and "Against the compute-matched monolith" in html
    assert "<td>student</td>" in html and "The distilled student against the monolith" in html
    assert (run_dir / "report" / "losses.png").exists()

    # 3. A third run finds everything committed: launches nothing, finishes fast.
    start = time.monotonic()
    again = _run(spec, tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[ddm] launched" not in again.stderr
    assert time.monotonic() - start < 60

    # `ddm status` on the run directory shows every stage done.
    status = subprocess.run([DDM, "status", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    rows = [ln.split() for ln in status.stdout.splitlines()[2:] if ln.strip() and not ln.startswith(" ")][:8]
    assert [r[0] for r in rows] == ["cluster", "expert-000", "expert-001", "router", "baseline", "evaluate", "distill",
                                    "evaluate-student"]
    assert all(r[1] == "done" for r in rows), status.stdout
    assert rows[4][2] == "6/6", rows[4]  # the baseline's own progress file (progress/baseline.json)
    assert "vs the compute-matched monolith" in status.stdout
    assert "distilled student FID" in status.stdout


def test_bad_spec_is_one_line_error_naming_the_field(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tmp_path / "run")
    spec["spec"]["experts"]["steps"] = 0  # type: ignore[index]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([DDM, "run", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "experts.steps" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_permanent_stage_failure_shows_the_log_tail_and_fails(tmp_path: Path) -> None:
    # A dataset directory with no images: clustering fails with a permanent data error, never retried.
    empty = tmp_path / "empty"
    empty.mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(empty, tmp_path / "run")))
    out = subprocess.run([DDM, "run", str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "cluster failed with exit code 3 (permanent)" in out.stderr
    assert str(tmp_path / "run" / "logs" / "cluster.log") in out.stderr
    assert out.stderr.count("[ddm] launched cluster") == 1
    assert "Failed" in out.stderr


def test_an_expert_lost_for_good_leaves_a_usable_partial_ensemble(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """K=3 with minExperts 2: expert 1's shard is corrupt (a permanent data error, never retried); the run ends
    Degraded, evaluated on experts 0 and 2; `ddm sample` draws from them and says so, as do the status and report."""
    run_dir = tmp_path / "run"
    doc = _spec(fashion_mnist_dir, run_dir)
    spec_body = doc["spec"]
    spec_body["clustering"]["numClusters"] = 3  # type: ignore[index]
    spec_body["experts"]["steps"] = 10  # type: ignore[index]
    spec_body["failurePolicy"] = {"minExperts": 2, "backoffSeconds": 0}  # type: ignore[index]
    del spec_body["distillation"]  # type: ignore[attr-defined]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    store = FileStore(run_dir)

    proc = subprocess.Popen([DDM, "run", str(spec), "--parallel", "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: store.read_manifest("clustering/shards") is not None, 300, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    shard = next(k for k in store.list("clustering/shards/001") if k.endswith(".tar"))
    (run_dir / shard).write_bytes(b"not a tar archive")  # what a bad disk or a truncated upload leaves

    out = _run(spec, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "expert-001 failed with exit code 3 (permanent)" in out.stderr
    assert out.stderr.count("[ddm] launched expert-001") == 1  # a permanent error is not retried
    assert "Degraded" in out.stderr
    results = store.get_json("evaluation/results.json")
    assert (results["experts"], results["missing_experts"]) == ([0, 2], [1])
    assert "A partial ensemble: experts [0, 2] of 3" in (run_dir / "report" / "index.md").read_text()

    sample = subprocess.run([DDM, "sample", str(run_dir), "--strategy", "top1", "-n", "4", "--steps", "2",
                             "-o", str(tmp_path / "s.png")], capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "a partial ensemble: experts [0, 2] of 3 (missing: [1]" in sample.stdout
    assert (tmp_path / "s.png").stat().st_size > 0
