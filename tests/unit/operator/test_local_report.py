"""The run report from a store holding what the stages commit (no torch, no training)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from ddm_operator.local.report import fid_rows, read_loss_curves, write_report
from ddm_trainer.store import FileStore


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_report_ties_fid_grids_clusters_losses_and_router(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "run")
    store.commit("clustering", {"sizes.json": json.dumps([30, 50, 20]).encode(), "examples.png": _png(90)})
    store.commit("router/eval", {"accuracy.json": json.dumps({"bins": [
        {"t_lo": 0.0, "t_hi": 0.5, "accuracy": 0.9, "n": 10}, {"t_lo": 0.5, "t_hi": 1.0, "accuracy": 0.4, "n": 10}]}
    ).encode()})
    results = {"table": [  # as the evaluate stage writes it
        {"strategy": "full", "fid": 41.5, "kid_mean": 0.02, "kid_std": 0.001, "nfe": 60, "gflops_per_sample": 1.5,
         "n": 200, "seconds": 3.0},
        {"strategy": "top1", "fid": 45.0, "kid_mean": 0.03, "kid_std": 0.001, "nfe": 20, "gflops_per_sample": 0.5,
         "n": 200, "seconds": 1.0}]}
    store.commit("evaluation", {"results.json": json.dumps(results).encode(), "grids/full.png": _png(10),
                                "grids/top1.png": _png(200)})
    store.commit("experts/001/report", {"samples.png": _png(120), "loss_curve.json": json.dumps(
        {"step": [1, 2], "loss": [0.9, 0.8]}).encode()})
    store.commit("distillation/report", {"samples.png": _png(60)})
    logs = tmp_path / "run" / "logs"
    logs.mkdir()
    (logs / "expert-000.progress.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)) + "\nnot json\n")
    (logs / "router.progress.jsonl").write_text(json.dumps({"step": 5, "loss": 0.7}) + "\n")

    html = write_report(store, tmp_path / "run", title="t").read_text()
    out = tmp_path / "run" / "report"
    assert "<td>41.5</td>" in html and "<td>top1</td>" in html
    for name in ("samples-full.png", "samples-top1.png", "cluster-sizes.png", "cluster-examples.png",
                 "losses.png", "router-accuracy.png", "expert-001-samples.png", "student-samples.png"):
        assert f'src="{name}"' in html
        assert Image.open(out / name).size[0] > 0  # a real PNG
    from ddm_operator.local.report import gather

    curves = gather(store, tmp_path / "run").loss_curves
    assert curves["expert-000"] == [(1, 1.0), (2, 0.5), (3, 1 / 3)] and curves["expert-001"] == [(1, 0.9), (2, 0.8)]
    md = (out / "index.md").read_text()
    assert "| strategy | FID | KID | NFE | GFLOPs/sample | N |" in md
    assert "| full | 41.5 | 0.02 | 60 | 1.5 | 200 |" in md


def test_report_of_an_empty_run_still_renders(tmp_path: Path) -> None:
    html = write_report(FileStore(tmp_path / "run"), tmp_path / "run").read_text()
    assert html.startswith("<!doctype html>") and "<table>" not in html


def test_fid_rows_accepts_lists_and_mappings() -> None:
    assert fid_rows([{"strategy": "top1", "fid": 3.0}])[0]["fid"] == 3.0
    assert fid_rows({"top-2": {"fid": 2.0, "num_samples": 9}})[0] == {
        "strategy": "top-2", "fid": 2.0, "kid": None, "nfe": None, "gflops_per_sample": None, "n": 9}


def test_resumed_run_keeps_the_latest_loss_per_step(tmp_path: Path) -> None:
    (tmp_path / "expert-001.progress.jsonl").write_text(
        "\n".join(json.dumps(e) for e in ({"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
                                            {"step": 2, "loss": 3.0}, {"step": 3, "loss": None})))
    assert read_loss_curves(tmp_path) == {"expert-001": [(1, 5.0), (2, 3.0)]}
