"""The run report: ``<run_dir>/report/index.html`` and ``index.md`` tying a finished run together.

Sources, all read without torch: the evaluation's ``results.json`` (FID table) and per-strategy grids, the
clustering's sizes and example images, the loss curves the local runner recorded from each stage's
``DDM_PROGRESS`` lines (``logs/<stage-id>.progress.jsonl``), and the router's accuracy-vs-t, if the stage wrote one.
Anything missing is left out of the report rather than failing it: a report of a half-finished run is still useful.
"""
from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddm_trainer import layout
from ddm_trainer.store import Store

from ..comparison import compare, compare_student
from ..partial import PARTIAL

PARENT_ROW = "parent:"  # a grown run's rows of its parent's ensemble (the trainer's configs.evaluate.PARENT_ROW)

ROUTER_EVAL = f"{layout.ROUTER}/eval"  # the router stage commits accuracy.json + accuracy_vs_t.png here
EXPERT_REPORT = "report"  # experts/NNN/report: loss_curve.json + samples.png, committed by the expert stage
FID_HEADERS = ("strategy", "FID", "KID", "NFE", "GFLOPs/sample", "N")
FID_COLUMNS = ("strategy", "fid", "kid", "nfe", "gflops_per_sample", "n")


@dataclass
class ReportInputs:
    """What was found for the report; every field may be empty."""

    fid_rows: list[dict[str, Any]] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)  # the experts the evaluated ensemble held
    missing_experts: list[int] = field(default_factory=list)  # and those it lacked (a partial ensemble)
    parent: dict[str, Any] | None = None  # a grown run's parent (uri, num_clusters, experts); rows parent:<strategy>
    partials: list[dict[str, Any]] = field(default_factory=list)  # the partial ensembles evaluated while training
    grids: dict[str, bytes] = field(default_factory=dict)  # strategy -> PNG
    prompt_grids: dict[str, bytes] = field(default_factory=dict)  # evaluation prompt -> PNG (text-conditioned runs)
    cluster_sizes: list[int] = field(default_factory=list)
    cluster_examples: bytes | None = None  # PNG
    loss_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # stage id -> (step, loss)
    router_accuracy: list[tuple[float, float]] = field(default_factory=list)  # (t, accuracy)
    router_accuracy_png: bytes | None = None
    expert_grids: dict[str, bytes] = field(default_factory=dict)  # expert stage id -> PNG of its own samples  # the router stage's own plot, preferred when present


def _first(d: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return None


def fid_rows(results: Any) -> list[dict[str, Any]]:
    """Normalise results.json into rows with FID_COLUMNS; accepts ``{"table": [...]}`` (the evaluate stage's),
    ``{"strategies": {name: {...}}}``,
    ``{"rows"|"results": [...]}``, ``{name: {...}}`` or a plain list of rows."""
    if isinstance(results, dict):
        inner = _first(results, "table", "strategies", "rows", "results")
        results = inner if inner is not None else results
    if isinstance(results, dict):
        raw = [{"strategy": name, **row} for name, row in results.items() if isinstance(row, dict)]
    elif isinstance(results, list):
        raw = [r for r in results if isinstance(r, dict)]
    else:
        raw = []
    rows = []
    for r in raw:
        rows.append({
            "strategy": _first(r, "strategy", "name"),
            "fid": _first(r, "fid", "FID"),
            "kid": _first(r, "kid", "kid_mean", "KID"),
            "nfe": _first(r, "nfe", "NFE"),
            "gflops_per_sample": _first(r, "gflops_per_sample", "gflops", "GFLOPs"),
            "n": _first(r, "n", "num_samples", "n_samples"),
        })
    return rows


def _read_evaluation(store: Store, out: ReportInputs) -> None:
    if store.read_manifest(layout.EVALUATION) is None:
        return
    key = f"{layout.EVALUATION}/results.json"
    if store.exists(key):
        results = store.get_json(key)
        out.fid_rows = fid_rows(results)
        if isinstance(results, dict):
            out.experts = list(results.get("experts") or [])
            out.missing_experts = list(results.get("missing_experts") or [])
            out.parent = results.get("parent")
        # spec.evaluation.prompts: {"prompts/<slug>.png": prompt}, a grid per prompt beside the strategies' grids
        prompts = results.get("prompts") if isinstance(results, dict) else None
        for rel, prompt in (prompts or {}).items():
            if store.exists(f"{layout.EVALUATION}/{rel}"):
                out.prompt_grids[str(prompt)] = store.get_bytes(f"{layout.EVALUATION}/{rel}")
    for k in store.list(layout.EVALUATION):
        name = k.rsplit("/", 1)[-1]
        if name.endswith(".png") and not any(f"/{d}/" in k for d in ("checkpoints", "strategies", "prompts")):
            strategy = name[: -len(".png")].removeprefix("grid-").removeprefix("grid_").removesuffix("_grid")
            out.grids[strategy] = store.get_bytes(k)


def _read_partials(store: Store, out: ReportInputs) -> None:
    """spec.evaluation.partial: each committed probe's experts and its one row, in the order experts landed."""
    for prefix in store.committed_prefixes(PARTIAL):
        manifest = store.read_manifest(prefix) or {}
        rows = fid_rows(manifest.get("table") or [])
        if rows:
            out.partials.append({**rows[0], "experts": list(manifest.get("experts") or []),
                                 "missing": list(manifest.get("missing_experts") or [])})


def _fid_table(rows: list[dict[str, Any]], strip: str = "") -> tuple[str, list[str]]:
    """(HTML, Markdown lines) of FID rows; ``strip`` is cut from the strategy names (parent:)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in FID_HEADERS)
    cells = [{**r, "strategy": str(r["strategy"]).removeprefix(strip)} for r in rows]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in FID_COLUMNS) + "</tr>"
                   for r in cells)
    md = ["| " + " | ".join(FID_HEADERS) + " |", "|" + "---|" * len(FID_COLUMNS)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in FID_COLUMNS) + " |" for r in cells]
    return f"<table><tr>{head}</tr>{body}</table>", md


def _read_clustering(store: Store, out: ReportInputs) -> None:
    manifest = store.read_manifest(layout.CLUSTERING)
    if manifest is None:
        return
    sizes = _first(manifest, "sizes", "cluster_sizes")
    for name in ("sizes.json", "cluster_sizes.json"):
        if sizes is None and store.exists(f"{layout.CLUSTERING}/{name}"):
            sizes = store.get_json(f"{layout.CLUSTERING}/{name}")
    if isinstance(sizes, dict):
        sizes = _first(sizes, "sizes", "coarse", "cluster_sizes") or [sizes[k] for k in sorted(sizes, key=str)]
    if isinstance(sizes, list):
        out.cluster_sizes = [int(s) for s in sizes]
    for name in ("examples.png", "cluster_examples.png"):
        if store.exists(f"{layout.CLUSTERING}/{name}"):
            out.cluster_examples = store.get_bytes(f"{layout.CLUSTERING}/{name}")
            break


def _read_router_accuracy(store: Store, out: ReportInputs) -> None:
    plot = f"{ROUTER_EVAL}/accuracy_vs_t.png"
    if store.read_manifest(ROUTER_EVAL) is not None and store.exists(plot):
        out.router_accuracy_png = store.get_bytes(plot)
    for k in store.list(layout.ROUTER):
        if "/checkpoints/" in k or not k.endswith(".json") or "acc" not in k.rsplit("/", 1)[-1]:
            continue
        data = store.get_json(k)
        if isinstance(data, dict) and isinstance(data.get("bins"), list):  # the router stage's accuracy.json
            out.router_accuracy = [((b["t_lo"] + b["t_hi"]) / 2, float(b["accuracy"])) for b in data["bins"]
                                   if isinstance(b, dict) and {"t_lo", "t_hi", "accuracy"} <= b.keys()]
        elif isinstance(data, dict):
            ts = _first(data, "t", "ts", "t_bins")
            acc = _first(data, "accuracy", "acc", "top1")
            if isinstance(ts, list) and isinstance(acc, list):
                out.router_accuracy = [(float(t), float(a)) for t, a in zip(ts, acc)]
        elif isinstance(data, list):
            out.router_accuracy = [(float(_first(r, "t")), float(_first(r, "accuracy", "acc"))) for r in data
                                   if isinstance(r, dict) and _first(r, "t") is not None]
        if out.router_accuracy:
            return


def read_loss_curves(logs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) per stage id from the runner's ``<stage-id>.progress.jsonl`` files; later steps of a resumed
    run replace the earlier copies of the same step."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logs_dir.glob("*.progress.jsonl")):
        by_step: dict[int, float] = {}
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("step"), int) and isinstance(ev.get("loss"), (int, float)):
                by_step[ev["step"]] = float(ev["loss"])
        if by_step:
            curves[path.name.removesuffix(".progress.jsonl")] = sorted(by_step.items())
    return curves


def _read_expert_reports(store: Store, out: ReportInputs) -> None:
    """Each expert's own report (``experts/NNN/report``): its sample grid, and its loss curve where the runner
    recorded none (a run made by the operator has no local progress logs)."""
    for key in store.list(layout.EXPERTS):
        parts = key.split("/")  # experts / 000 / report / MANIFEST.json
        if len(parts) != 4 or parts[2:] != [EXPERT_REPORT, "MANIFEST.json"]:
            continue
        report = "/".join(parts[:3])
        stage = layout.stage_id("expert", int(parts[1])) if parts[1].isdigit() else f"expert-{parts[1]}"
        if store.exists(f"{report}/samples.png"):
            out.expert_grids[stage] = store.get_bytes(f"{report}/samples.png")
        if stage not in out.loss_curves and store.exists(f"{report}/loss_curve.json"):
            curve = store.get_json(f"{report}/loss_curve.json")
            if isinstance(curve, dict) and isinstance(curve.get("loss"), list):
                out.loss_curves[stage] = [(int(s), float(v)) for s, v in zip(curve.get("step", []), curve["loss"])
                                          if isinstance(v, (int, float))]


def _read_student(store: Store, out: ReportInputs) -> None:
    key = f"{layout.DISTILLATION}/{EXPERT_REPORT}/samples.png"
    if store.read_manifest(f"{layout.DISTILLATION}/{EXPERT_REPORT}") is not None and store.exists(key):
        out.expert_grids["student (distilled)"] = store.get_bytes(key)


def gather(store: Store, run_dir: Path) -> ReportInputs:
    out = ReportInputs()
    _read_evaluation(store, out)
    _read_partials(store, out)
    _read_clustering(store, out)
    _read_router_accuracy(store, out)
    out.loss_curves = read_loss_curves(run_dir / "logs")
    _read_expert_reports(store, out)
    _read_student(store, out)
    return out


# -- plots (matplotlib, imported lazily: `ddm status` must not pay for it) -------------------------------------------
def _plot_cluster_sizes(sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(sizes) + 2), 3))
    ax.bar(range(len(sizes)), sizes, color="#4c72b0")
    ax.set_xlabel("cluster (expert)")
    ax.set_ylabel("images")
    ax.set_xticks(range(len(sizes)))
    ax.set_title("Cluster sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_group(stage_id: str) -> str:
    """Losses of different kinds get their own panel: flow MSE (experts), cross-entropy (router), distillation."""
    return "experts" if stage_id.startswith("expert") else stage_id


def _plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    order = {"experts": 0, "router": 1, "distill": 2}
    for name, points in sorted(curves.items(), key=lambda kv: (order.get(_loss_group(kv[0]), 3), kv[0])):
        groups.setdefault(_loss_group(name), {})[name] = points
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    titles = {"experts": "experts (flow matching MSE)", "router": "router (cross-entropy)",
              "distill": "student (distillation MSE)"}
    for ax, (group, members) in zip(axes[0], groups.items()):
        for name, points in members.items():
            steps, losses = zip(*points)
            ax.plot(steps, losses, label=name, linewidth=1.2, marker="." if len(points) < 3 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if all(v > 0 for pts in members.values() for _, v in pts):
            ax.set_yscale("log")
        ax.set_title(titles.get(group, group), fontsize=10)
        if len(members) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_router_accuracy(points: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, acc = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(ts, acc, marker="o")
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("router top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Router accuracy vs t")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _img(src: str, png: bytes, alt: str, target_px: int = 384) -> str:
    """An <img> that shows small pixel grids (28x28 images) enlarged, never shrunk below their natural size."""
    width = None
    try:
        from PIL import Image

        natural = Image.open(io.BytesIO(png)).size[0]
        width = natural * max(1, target_px // max(natural, 1))
    except Exception:  # an unreadable PNG still gets linked; the browser says what is wrong
        pass
    size = f' width="{width}"' if width else ""
    return f'<img src="{src}" alt="{html.escape(alt)}"{size}>'


def _slug(text: str) -> str:
    """A file name part for a prompt: lower-case letters and digits, runs of anything else as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "prompt"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(store: Store, run_dir: Path, title: str = "DDM run") -> Path:
    """Writes ``run_dir/report/{index.html,index.md,*.png}``; returns the HTML path."""
    inputs = gather(store, run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections_html: list[str] = []
    sections_md: list[str] = [f"# {title}", "", f"Run store: `{store.uri}`", ""]

    own_rows = [r for r in inputs.fid_rows if not str(r["strategy"]).startswith(PARENT_ROW)]
    parent_rows = [r for r in inputs.fid_rows if str(r["strategy"]).startswith(PARENT_ROW)]
    if inputs.parent is not None and own_rows:
        # a grown run: its FID table beside its parent's ensemble's, both against the same reference images
        k_grown = len(inputs.experts) + len(inputs.missing_experts)
        grown_html, grown_md = _fid_table(own_rows)
        left = f"<div><h3>grown: K={k_grown}, experts {html.escape(str(inputs.experts))}</h3>{grown_html}</div>"
        right = ""
        title = (f"parent: K={inputs.parent.get('num_clusters')}, experts {inputs.parent.get('experts')} "
                 f"({inputs.parent.get('uri')})")
        sections_md += ["## Grown ensemble beside its parent", "",
                        "Both tables are against the same reference images (the parent's data and the new data).", "",
                        f"### grown: K={k_grown}, experts {inputs.experts}", "", *grown_md, ""]
        if parent_rows:
            parent_html, parent_md = _fid_table(parent_rows, PARENT_ROW)
            right = f"<div><h3>{html.escape(title)}</h3>{parent_html}</div>"
            sections_md += [f"### {title}", "", *parent_md, ""]
        sections_html.append("<h2>Grown ensemble beside its parent</h2><p>Both tables are against the same reference "
                             "images (the parent's data and the new data).</p>"
                             f"<div class=grid>{left}{right}</div>")
    elif inputs.fid_rows:
        table_html, table_md = _fid_table(inputs.fid_rows)
        sections_html.append(f"<h2>Sample quality per routing strategy</h2>{table_html}")
        sections_md += ["## Sample quality per routing strategy", "", *table_md]
        sections_md.append("")
    if inputs.fid_rows:
        if inputs.missing_experts:
            held = (f"A partial ensemble: experts {inputs.experts} of {len(inputs.experts) + len(inputs.missing_experts)}"
                    f" (missing: {inputs.missing_experts}, failed for good); the router was renormalised over them.")
            sections_html.append(f"<p><b>{html.escape(held)}</b></p>")
            sections_md += [f"**{held}**", ""]
        vs = compare((r["strategy"], r["fid"] if isinstance(r["fid"], (int, float)) else None) for r in own_rows)
        if vs is not None:  # spec.baseline: the answer to "is it better than one model on the same compute?"
            sections_html.append(f"<p><b>Against the compute-matched monolith:</b> {html.escape(vs.sentence())}</p>")
            sections_md += [f"**Against the compute-matched monolith:** {vs.sentence()}", ""]
        student = compare_student((r["strategy"], r["fid"] if isinstance(r["fid"], (int, float)) else None)
                                  for r in own_rows)
        if student is not None:  # spec.distillation: the dense student, at one model's cost per step
            sections_html.append(f"<p><b>The distilled student against the monolith:</b> "
                                 f"{html.escape(student.sentence())}</p>")
            sections_md += [f"**The distilled student against the monolith:** {student.sentence()}", ""]

    if inputs.partials:  # spec.evaluation.partial: quality as experts landed
        rows_html = "".join(f"<tr><td>{html.escape(str(p['experts']))}</td><td>{html.escape(str(p['strategy']))}</td>"
                            f"<td>{html.escape(_fmt(p['fid']))}</td><td>{html.escape(_fmt(p['n']))}</td></tr>"
                            for p in inputs.partials)
        sections_html.append("<h2>Partial ensembles while experts trained</h2><table><tr><th>experts</th>"
                             f"<th>strategy</th><th>FID</th><th>N</th></tr>{rows_html}</table>")
        sections_md += ["## Partial ensembles while experts trained", "", "| experts | strategy | FID | N |",
                        "|---|---|---|---|"]
        sections_md += [f"| {p['experts']} | {p['strategy']} | {_fmt(p['fid'])} | {_fmt(p['n'])} |"
                        for p in inputs.partials]
        sections_md.append("")

    if inputs.grids:
        figs = []
        sections_md += ["## Samples", ""]
        table_order = {r["strategy"]: i for i, r in enumerate(inputs.fid_rows)}
        for strategy, png in sorted(inputs.grids.items(), key=lambda kv: (table_order.get(kv[0], 99), kv[0])):
            name = f"samples-{strategy}.png"
            (out / name).write_bytes(png)
            figs.append(f"<figure>{_img(name, png, strategy)}<figcaption>{html.escape(strategy)}</figcaption></figure>")
            sections_md += [f"### {strategy}", "", f"![{strategy}]({name})", ""]
        sections_html.append("<h2>Samples</h2><div class=grid>" + "".join(figs) + "</div>")

    if inputs.prompt_grids:
        figs = []
        sections_md += ["## Samples per prompt", ""]
        for prompt, png in inputs.prompt_grids.items():
            name = f"prompt-{_slug(prompt)}.png"
            (out / name).write_bytes(png)
            figs.append(f"<figure>{_img(name, png, prompt, 256)}<figcaption>{html.escape(prompt)}</figcaption></figure>")
            sections_md += [f"### {prompt}", "", f"![{prompt}]({name})", ""]
        sections_html.append("<h2>Samples per prompt</h2><div class=grid>" + "".join(figs) + "</div>")

    if inputs.cluster_sizes or inputs.cluster_examples:
        parts = ["<h2>Clusters</h2>"]
        sections_md += ["## Clusters", ""]
        if inputs.cluster_sizes:
            _plot_cluster_sizes(inputs.cluster_sizes, out / "cluster-sizes.png")
            parts.append('<img src="cluster-sizes.png" alt="cluster sizes">')
            sections_md += [f"Sizes: {inputs.cluster_sizes}", "", "![cluster sizes](cluster-sizes.png)", ""]
        if inputs.cluster_examples:
            (out / "cluster-examples.png").write_bytes(inputs.cluster_examples)
            parts.append(f"<figure>{_img('cluster-examples.png', inputs.cluster_examples, 'examples per cluster', 768)}"
                         "<figcaption>example images per cluster (one row each)</figcaption></figure>")
            sections_md += ["![examples per cluster](cluster-examples.png)", ""]
        sections_html.append("".join(parts))

    if inputs.expert_grids:
        figs = []
        sections_md += ["## Each expert alone (and the distilled student)", ""]
        for stage, png in sorted(inputs.expert_grids.items()):
            name = f"{stage.split()[0]}-samples.png"
            (out / name).write_bytes(png)
            figs.append(f"<figure>{_img(name, png, stage, 256)}<figcaption>{stage}</figcaption></figure>")
            sections_md += [f"![{stage}]({name})", ""]
        sections_html.append("<h2>Each expert alone (and the distilled student)</h2><div class=grid>" + "".join(figs) + "</div>")

    if inputs.loss_curves:
        _plot_losses(inputs.loss_curves, out / "losses.png")
        sections_html.append('<h2>Training loss</h2><img src="losses.png" alt="loss curves">')
        sections_md += ["## Training loss", "", "![loss curves](losses.png)", ""]

    if inputs.router_accuracy_png or inputs.router_accuracy:
        if inputs.router_accuracy_png:
            (out / "router-accuracy.png").write_bytes(inputs.router_accuracy_png)
        else:
            _plot_router_accuracy(inputs.router_accuracy, out / "router-accuracy.png")
        sections_html.append('<h2>Router</h2><img src="router-accuracy.png" alt="router accuracy vs t">')
        sections_md += ["## Router", "", "![router accuracy vs t](router-accuracy.png)", ""]

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             ".grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}"
             "img{image-rendering:pixelated;max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Run store: <code>{html.escape(store.uri)}</code></p>" + "".join(sections_html) + "</body></html>")
    (out / "index.html").write_text(page)
    (out / "index.md").write_text("\n".join(sections_md) + "\n")
    return out / "index.html"
