"""bench/paper_study.py drives the product: every arm's generated spec must be one the API accepts, and the arms
must really differ only where the study says (clustering method, K) while seeing the same images."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ddm_operator.api.models import DecentralizedDiffusion
from fixtures.bench import load_bench


def load_study():
    return load_bench("paper_study")


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
    assert models["features-8"].spec.distillation.teacher == "ensemble"  # the product's default, unless --teacher
    paper = study.parse_args(["--data", "d", "--work", str(tmp_path), "--teacher", "expert-of-cluster"])
    student = DecentralizedDiffusion.model_validate(study.arm_spec(paper, "features-8", False, distil=True))
    assert student.spec.distillation is not None and student.spec.distillation.teacher == "expert-of-cluster"
    assert models["random-8"].spec.clustering.method == "random"
    assert models["features-8"].spec.clustering.method == "kmeans"
    assert models["features-8"].spec.experts.class_conditional and models["features-8"].spec.evaluation.cfg_scale == 1.5


def test_an_arm_that_is_not_features_or_random_k_is_refused(tmp_path: Path) -> None:
    study = load_study()
    with pytest.raises(SystemExit, match="not features-K or random-K"):
        study.arm_spec(study.parse_args(["--data", "d", "--work", str(tmp_path)]), "kmeans-4", monolith=False, distil=False)


def test_an_arm_with_a_smaller_expert_batch_sees_the_same_images_in_more_steps(tmp_path: Path) -> None:
    """features-8-b32: experts at batch 32 make 8x the steps of batch 256 on the same images; the router keeps the
    study's batch; the arm gets its own target row against the compute-matched monolith, and never replaces the
    plain features-8 in the paper's targets."""
    study = load_study()
    args = study.parse_args(["--data", "d", "--work", str(tmp_path), "--images", "1500000"])
    plain = DecentralizedDiffusion.model_validate(study.arm_spec(args, "features-8", monolith=True, distil=False))
    small = DecentralizedDiffusion.model_validate(study.arm_spec(args, "features-8-b32", monolith=False, distil=False))
    assert (plain.spec.experts.batch_size, plain.spec.experts.steps) == (256, 732)
    assert (small.spec.experts.batch_size, small.spec.experts.steps) == (32, 5859)
    assert small.spec.router.batch_size == 256 and small.spec.clustering.num_clusters == 8
    assert plain.spec.experts.lr == pytest.approx(3e-4) and small.spec.experts.lr == pytest.approx(3e-4 / 8 ** 0.5)
    monolith = {"strategy": "monolith", "fid": 25.0, "gflops_per_sample": 1200.0}
    goals = {g["target"]: g for g in study.targets(
        [{"arm": "features-8", "table": _table(("top1", 75.0, 1800.0))},
         {"arm": "features-8-b32", "table": _table(("top1", 20.0, 1800.0))}], monolith)}
    assert goals["DDM K=8 top-1 FID <= 0.9 x the compute-matched monolith's"]["ratio"] == pytest.approx(3.0)
    small_goal = goals["features-8-b32: top-1 FID <= 0.9 x the compute-matched monolith's (experts at batch 32)"]
    assert small_goal["ratio"] == pytest.approx(0.8) and small_goal["met"] is True
    with pytest.raises(SystemExit, match="features-K or random-K"):
        study.parse_arm("features-8-32")


def test_an_arm_clustered_on_efficientnet_features_names_its_encoder_and_weights(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture) -> None:
    """features-8-b32-lite0: the same experts as features-8-b32, clustered on EfficientNet-Lite0 features (with the
    weights file --encoder-weights gives that encoder); the plain arms keep --encoder; its target row says both."""
    study = load_study()
    args = study.parse_args(["--data", "d", "--work", str(tmp_path), "--images", "1500000",
                             "--encoder-weights", "efficientnet_lite0=/tmp/lite0-fp16.pt"])
    lite = DecentralizedDiffusion.model_validate(study.arm_spec(args, "features-8-b32-lite0", False, False))
    plain = DecentralizedDiffusion.model_validate(study.arm_spec(args, "features-8-b32", False, False))
    assert (lite.spec.clustering.encoder, lite.spec.clustering.encoder_weights) == ("efficientnet_lite0",
                                                                                    "/tmp/lite0-fp16.pt")
    assert (plain.spec.clustering.encoder, plain.spec.clustering.encoder_weights) == ("raw-pixels", None)
    assert (lite.spec.experts.batch_size, lite.spec.experts.steps) == (32, 5859)
    goals = {g["target"]: g for g in study.targets(
        [{"arm": "features-8", "table": _table(("top1", 75.0, 1800.0))},
         {"arm": "features-8-b32-lite0", "table": _table(("top1", 20.0, 1800.0))}],
        {"strategy": "monolith", "fid": 25.0, "gflops_per_sample": 1200.0})}
    row = goals["features-8-b32-lite0: top-1 FID <= 0.9 x the compute-matched monolith's (experts at batch 32, "
                "clusters of efficientnet_lite0)"]
    assert row["ratio"] == pytest.approx(0.8) and row["met"] is True
    assert goals["DDM K=8 top-1 FID <= 0.9 x the compute-matched monolith's"]["ratio"] == pytest.approx(3.0)
    with pytest.raises(SystemExit, match="features-K or random-K"):
        study.parse_arm("random-8-lite0")  # a random partition has no encoder
    with pytest.raises(SystemExit):
        study.parse_args(["--data", "d", "--work", str(tmp_path), "--encoder-weights", "/tmp/lite0.pt"])
    assert "expected ENCODER=PATH" in capsys.readouterr().err


def test_a_prop_arm_allocates_its_experts_steps_by_cluster_size(tmp_path: Path) -> None:
    """features-4-b64-lite0-prop: lease G's arm with experts.stepsAllocation proportional (the same mean steps, so
    the same images seen); its own target row says so, and it never stands for the plain arm."""
    study = load_study()
    args = study.parse_args(["--data", "d", "--work", str(tmp_path), "--images", "1500000"])
    prop = DecentralizedDiffusion.model_validate(study.arm_spec(args, "features-4-b64-lite0-prop", False, False))
    plain = DecentralizedDiffusion.model_validate(study.arm_spec(args, "features-4-b64-lite0", False, False))
    assert (prop.spec.experts.steps_allocation, plain.spec.experts.steps_allocation) == ("proportional", "equal")
    assert prop.spec.experts.steps == plain.spec.experts.steps == 5859
    goals = {g["target"] for g in study.targets(
        [{"arm": "features-4-b64-lite0-prop", "table": _table(("top1", 30.0, 1800.0))}],
        {"strategy": "monolith", "fid": 25.0, "gflops_per_sample": 1200.0})}
    assert ("features-4-b64-lite0-prop: top-1 FID <= 0.9 x the compute-matched monolith's (experts at batch 64, "
            "clusters of efficientnet_lite0, steps by cluster size)") in goals
    assert study.parse_arm("features-4-prop").variant and not study.parse_arm("features-4").variant
    with pytest.raises(SystemExit, match="features-K or random-K"):
        study.parse_arm("features-4-prop-lite0")  # the suffixes' order is fixed


def _table(*rows: tuple[str, float, float]) -> list[dict]:
    return [{"strategy": s, "fid": f, "nfe": 50.0, "gflops_per_sample": g, "n": 100} for s, f, g in rows]


def test_targets_read_the_student_row_and_every_arm(tmp_path: Path) -> None:
    study = load_study()
    done = [{"arm": "features-4", "table": _table(("full", 44.0, 400.0), ("top1", 40.0, 100.0),
                                                   ("monolith", 50.0, 100.0))},
            {"arm": "features-8", "table": _table(("full", 46.0, 800.0), ("top1", 44.0, 100.0),
                                                   ("student", 54.0, 100.0))},
            {"arm": "random-8", "table": _table(("full", 47.0, 800.0), ("top1", 48.0, 100.0))}]
    goals = {g["target"]: g for g in study.targets(done, study._row(done[0], "monolith"))}
    k8 = goals["DDM K=8 top-1 FID <= 0.9 x the compute-matched monolith's"]
    assert k8["ratio"] == pytest.approx(0.88) and k8["met"] is True
    feats = goals["feature clusters better than a random partition (K=8, top-1)"]
    assert feats["ratio"] == pytest.approx(44 / 48) and feats["met"] is True
    random_top1 = goals["random-8: top-1 no worse than full, at a fraction of its FLOPs"]
    assert random_top1["met"] is False and "FLOPs 0.12 x full's" in random_top1["measured"]
    student = goals["distilled student within 10% of the monolith"]
    assert student["ratio"] == pytest.approx(1.08) and student["met"] is True and "student 54.00" in student["measured"]
    md = study.targets_markdown(list(goals.values()))
    assert "| distilled student within 10% of the monolith |" in md and "| 1.080 | 1.1 | yes |" in md
    assert "**no**" in md  # random-8's top-1 is worse than its full
    # without a distilled arm the target is listed, not measured
    unmeasured = {g["target"]: g for g in study.targets(done[:1], study._row(done[0], "monolith"))}
    assert unmeasured["distilled student within 10% of the monolith"]["met"] is None


def test_independence_from_the_runners_logs(tmp_path: Path) -> None:
    """Each process's seconds run from the runner's launch line to its last progress event; an interrupted expert's
    two attempts both count; the experts' wall clock here is the union of their spans."""
    import json
    import time

    study = load_study()
    logs = tmp_path / "logs"
    logs.mkdir()
    t0 = time.mktime(time.strptime("2026-12-06 10:00:00", "%Y-%m-%d %H:%M:%S"))

    def stage(name: str, attempts: list[tuple[float, float]], rate: float) -> None:
        stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0 + t))  # noqa: E731
        (logs / f"{name}.log").write_text("".join(f"\n=== attempt {i + 1}: ddm-train expert --config c.yaml "
                                                  f"({stamp(s)})\nsome output\n" for i, (s, _) in enumerate(attempts)))
        events = [{"event": "progress", "time": t0 + s + 1, "images_per_s": rate} for s, _ in attempts]
        events += [{"event": "done", "time": t0 + e} for _, e in attempts]
        (logs / f"{name}.progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    stage("expert-000", [(0, 100)], 900.0)
    stage("expert-001", [(10, 50), (60, 120)], 1100.0)  # interrupted at 50 s, resumed at 60 s
    stage("router", [(0, 30)], 2000.0)
    stage("baseline", [(0, 180)], 1000.0)
    spec = {"clustering": {"numClusters": 2}, "experts": {"gpusPerNode": 1}, "router": {"gpusPerNode": 1},
            "parallelism": 3}
    ind = study.independence(logs, spec)
    assert ind["expert_s"] == {"expert-000": 100.0, "expert-001": 100.0}
    assert (ind["experts_process_s"], ind["longest_expert_s"], ind["experts_wall_s"]) == (200.0, 100.0, 120.0)
    assert (ind["router_gpu_s"], ind["monolith_s"], ind["monolith_images_per_s"]) == (30.0, 180.0, 1000.0)
    md = study.independence_markdown([{"arm": "features-2", "independence": ind}])
    assert "| features-2 | 2 x 1 | 200 | 100 | 120 (3) | 230 | 180 | 1.278 | 0.556 | 1,000 / 1,000 |" in md
    assert study.independence(tmp_path / "nothing", spec) is None
    # the heading's seconds span every attempt: a resumed expert's "finished in" line times its last one only
    arm = {"arm": "features-2", "table": [], "images_seen": 1000, "independence": ind,
           "stage_s": {"expert-000": 100.0, "expert-001": 60.0, "router": 30.0, "baseline": 180.0}}
    assert "experts 200 stage-s, router 30 stage-s, monolith 180 stage-s" in study.markdown(arm, None)
    assert "experts 160 stage-s" in study.markdown(dict(arm, independence=None), None)
    control = dict(arm, independence=None, spec={"baseline": {"steps": 732}})
    assert "monolith-732-steps 180 stage-s" in study.markdown(control, None)


def test_grids_are_copied_and_linked_and_an_arm_without_the_students_row_is_not_done(tmp_path: Path) -> None:
    import json

    study = load_study()
    run = tmp_path / "work" / "features-8"
    (run / "run" / "evaluation" / "grids").mkdir(parents=True)
    for name in ("top1", "student"):
        (run / "run" / "evaluation" / "grids" / f"{name}.png").write_bytes(b"\x89PNG " + name.encode())
    arm = {"arm": "features-8", "table": _table(("top1", 44.0, 100.0), ("student", 54.0, 100.0), ("full", 1.0, 1.0)),
           "stage_s": {}, "images_seen": 1000}
    copied = study.copy_grids(arm, run, tmp_path / "repo" / "bench" / "results" / "paper_study")
    assert copied["student"].read_bytes() == b"\x89PNG student" and "full" not in copied
    md = study.markdown(arm, 50.0, copied, links_from=tmp_path / "repo")
    assert "| student | 54.00 | 50.0 | 100.0 | 1.080 | [8x8](bench/results/paper_study/features-8-student.png) |" in md
    assert md.rstrip().endswith("| - |")  # full: no grid committed
    results = run / "run" / "evaluation" / "results.json"
    results.write_text(json.dumps({"table": arm["table"][:1]}))
    assert study.evaluated(results, distil=False) and not study.evaluated(results, distil=True)
    results.write_text(json.dumps({"table": arm["table"]}))
    assert study.evaluated(results, distil=True)


def test_an_arm_run_in_another_lease_is_read_from_its_saved_json(tmp_path: Path) -> None:
    """--arms-from: the arm's run directory is elsewhere (another device lease); its saved JSON is the arm, and its
    grids already in --grids are linked with the --links prefix."""
    import json

    study = load_study()
    saved = tmp_path / "saved"
    saved.mkdir()
    arm = {"arm": "features-8", "table": _table(("top1", 44.0, 100.0)), "stage_s": {}, "images_seen": 1000,
           "independence": None}
    (saved / "features-8.json").write_text(json.dumps(arm))
    args = study.parse_args(["--data", "d", "--work", str(tmp_path / "work"), "--arms-from", str(saved), "--ddm",
                             "/nonexistent/ddm"])
    assert study.run_arm(args, "features-8", study.arm_spec(args, "features-8", False, False)) == arm
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "features-8-top1.png").write_bytes(b"\x89PNG")
    copied = study.copy_grids(arm, tmp_path / "work" / "features-8", grids)
    md = study.markdown(arm, 50.0, copied, links="bench/results/paper_study")
    assert "[8x8](bench/results/paper_study/features-8-top1.png)" in md


def test_the_equal_steps_monolith_is_a_control_not_the_compute_matched_one(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--equal-steps-monolith ARM: that arm's baseline trains for the experts' own steps (1/K of the images); its row
    is renamed monolith-<steps>-steps (the grid still read from the product's grids/monolith.png), it yields a
    diagnostic target against top-1, and it never stands in for the compute-matched monolith's seconds."""
    import json

    study = load_study()
    args = study.parse_args(["--data", "d", "--work", str(tmp_path / "work"), "--images", "1500000",
                             "--monolith", "features-8", "--equal-steps-monolith", "random-8", "--ddm", "/bin/false",
                             "--results-dir", str(tmp_path / "results")])
    spec = study.arm_spec(args, "random-8", monolith=False, distil=False, equal_steps=True)
    model = DecentralizedDiffusion.model_validate(spec)
    assert model.spec.baseline is not None and model.spec.baseline.steps == model.spec.experts.steps == 732
    assert "steps" not in study.arm_spec(args, "features-8", monolith=True, distil=False)["spec"]["baseline"]

    run = tmp_path / "work" / "random-8" / "run"
    (run / "evaluation" / "grids").mkdir(parents=True)
    (run / "evaluation" / "grids" / "monolith.png").write_bytes(b"\x89PNG short")
    (run / "evaluation" / "results.json").write_text(json.dumps({"table": _table(("top1", 60.0, 1800.0),
                                                                                 ("monolith", 80.0, 1200.0))}))
    (tmp_path / "work" / "random-8" / "ddm-run.out").write_text("[ddm] baseline finished in 40s\n")
    arm = study.run_arm(args, "random-8", spec)  # evaluated already: read, ddm (/bin/false) never runs
    assert [r["strategy"] for r in arm["table"]] == ["top1", "monolith-732-steps"]
    assert study._row(arm, "monolith") is None  # the compute-matched monolith is not in this arm
    assert json.loads((tmp_path / "results" / "paper_study_arms" / "random-8.json").read_text())["table"] == arm["table"]
    copied = study.copy_grids(arm, tmp_path / "work" / "random-8", tmp_path / "grids")
    assert copied["monolith-732-steps"].name == "random-8-monolith-732-steps.png"
    assert copied["monolith-732-steps"].read_bytes() == b"\x89PNG short"
    goals = {g["target"]: g for g in study.targets([arm], None)}
    diag = goals["random-8: top-1 better than one model at the experts' own steps (diagnostic)"]
    assert diag["ratio"] == pytest.approx(0.75) and diag["met"] is True

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "baseline.log").write_text("=== attempt 1: ddm-train expert --config c.yaml (2026-12-06 10:00:00)\n")
    (logs / "baseline.progress.jsonl").write_text(json.dumps({"event": "done", "time": 2e9}) + "\n")
    for k in range(8):
        (logs / f"expert-{k:03d}.log").write_text(
            "=== attempt 1: ddm-train expert --config c.yaml (2026-12-06 10:00:00)\n")
        (logs / f"expert-{k:03d}.progress.jsonl").write_text(json.dumps({"event": "done", "time": 2e9}) + "\n")
    assert "monolith_s" not in study.independence(logs, spec["spec"])
    monkeypatch.setattr(sys, "argv", ["paper_study", "--data", "d", "--work", str(tmp_path), "--arms", "features-8",
                                      "--equal-steps-monolith", "features-8"])
    with pytest.raises(SystemExit, match="trains the compute-matched monolith"):
        study.main()


def test_the_equal_steps_control_of_one_arm_serves_every_arm_of_the_same_steps() -> None:
    """random-8 trains the 732-step model; features-8 (732 steps too) is compared with it, features-8-b32 (5,859
    steps) is not: assembling arms of several leases gives every diagnostic row the lease itself gave."""
    study = load_study()
    done = [{"arm": "features-8", "spec": {"experts": {"steps": 732}}, "table": _table(("top1", 73.0, 1800.0))},
            {"arm": "random-8", "spec": {"experts": {"steps": 732}},
             "table": _table(("top1", 81.0, 1800.0), ("monolith-732-steps", 81.0, 1200.0))},
            {"arm": "features-8-b32", "spec": {"experts": {"steps": 5859}}, "table": _table(("top1", 45.0, 1800.0))}]
    goals = {g["target"]: g for g in study.targets(done, None)}
    assert goals["features-8: top-1 better than one model at the experts' own steps (diagnostic)"]["ratio"] == \
        pytest.approx(73.0 / 81.0)
    assert goals["random-8: top-1 better than one model at the experts' own steps (diagnostic)"]["ratio"] == 1.0
    assert not any(t.startswith("features-8-b32: top-1 better than one model") for t in goals)


def test_an_arm_with_the_oracle_row_gets_the_routers_cost() -> None:
    study = load_study()
    done = [{"arm": "features-8", "spec": {"experts": {"steps": 732}}, "table": _table(("top1", 73.0, 1800.0)),
             "images_seen": 1_499_136},
            {"arm": "features-4-b64-lite0", "spec": {"experts": {"steps": 5859}}, "images_seen": 1_499_904,
             "table": _table(("top1", 40.0, 1800.0), ("oracle", 32.0, 1700.0))}]
    goals = {g["target"]: g for g in study.targets(done, None)}
    cost = goals["features-4-b64-lite0: top-1 no worse than the mixture oracle, the router's cost (diagnostic)"]
    assert cost["ratio"] == pytest.approx(1.25) and cost["met"] is False
    assert cost["images_seen"] == 1_499_904  # its own arm's, not the first arm's
    assert not any(t.startswith("features-8: top-1 no worse than the mixture oracle") for t in goals)


def test_each_model_is_placed_at_its_own_optimizer_steps_and_drawn(tmp_path: Path) -> None:
    """The FID-against-steps figure: the compute-matched monolith at K x the experts' steps, the equal-steps control at
    its own, a -bB arm's top-1 at one expert's steps and batch, the student at its distillation steps; rows that are
    neither top-1, a monolith nor the student are left out."""
    study = load_study()
    args = study.parse_args(["--data", "d", "--work", str(tmp_path), "--images", "1500000", "--student-steps", "2000"])

    def arm(name: str, table: list[dict], **kw: bool) -> dict:
        return {"arm": name, "table": table, "spec": study.arm_spec(args, name, **{"monolith": False,
                                                                                   "distil": False, **kw})["spec"]}

    done = [arm("features-8", _table(("top1", 73.0, 1.0), ("monolith", 24.0, 1.0), ("full", 70.0, 1.0)),
                monolith=True),
            arm("random-8", _table(("top1", 81.0, 1.0), ("monolith-732-steps", 80.0, 1.0)), equal_steps=True),
            arm("features-4-b64-prop", _table(("top1", 33.0, 1.0), ("student", 48.0, 1.0)), distil=True)]
    points = {p.label: p for p in study.steps_points(done)}
    assert set(points) == {"features-8 top-1", "monolith (features-8)", "random-8 top-1", "monolith (random-8)",
                           "features-4-b64-prop top-1", "student of features-4-b64-prop"}
    assert (points["monolith (features-8)"].steps, points["monolith (features-8)"].batch) == (5856, 256)
    assert (points["monolith (random-8)"].steps, points["monolith (random-8)"].kind) == (732, "monolith")
    assert (points["features-8 top-1"].steps, points["features-8 top-1"].kind) == (732, "ddm")
    assert (points["features-4-b64-prop top-1"].steps, points["features-4-b64-prop top-1"].batch) == (5859, 64)
    student = points["student of features-4-b64-prop"]
    assert (student.steps, student.batch, student.fid, student.kind) == (2000, 256, 48.0, "student")
    figure = study.steps_plot(list(points.values()), tmp_path / "grids" / "fid_vs_steps.png")
    assert figure is not None and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert study.steps_plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
