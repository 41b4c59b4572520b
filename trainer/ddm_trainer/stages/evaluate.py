"""Stage ``evaluate``: FID and KID of every combination strategy (and the monolith baseline) in one table.

The ``student`` row (the distilled dense student) is added by a second run of this stage once distillation has
committed: it lists the same rows plus ``student``; the others are committed already with the same key, so they
are read back, and only the student is sampled before the table is committed again.

Everything is checked before any sampling: each strategy's ensemble (router, experts' committed final weights,
K vs the strategy), the monolith's weights when ``monolith`` is a row, that the models make images of the
reference data's size, and that the reference data holds ``reference_n`` images.

Reference Inception features of the training data are cached in the run store under
``evaluation/reference/<key>/`` (key = data URI, image size, channels, limit, N, extractor), committed with a
manifest, and reused by later runs. Results: ``evaluation/`` results.json, results.md, grids/<strategy>.png; the
manifest's ``table`` holds the rows.

Speed and restarts: networks run under bf16 autocast (the ODE state stays fp32), compiled per block on CUDA, in
GPU-sized batches; under torchrun each rank draws a disjoint share of every strategy's images (noise and labels
are per sample index, so the images do not depend on the number of ranks) and only Inception features travel to
rank 0; samples go into Inception batch by batch and are never all held. Each strategy's row is committed under
``evaluation/strategies/<name>/`` as soon as it is done, so a restarted evaluation goes on with the next one.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import fid, layout
from ..configs.common import DataConfig
from ..configs.evaluate import MONOLITH_ROW, PARENT_ROW, STUDENT_ROW, EvaluateConfig
from ..errors import ConfigError, DataError, MissingArtifactError
from ..store import Store

REFERENCE = f"{layout.EVALUATION}/reference"
# <output>/strategies/<name>/ (strategy_prefix): one committed row (manifest meta) and its grid
EXTRACTOR_ID = "tf-inception-2015-12-05-pool3"


@dataclass
class Row:
    strategy: str
    fid: float
    kid_mean: float
    kid_std: float
    nfe: float
    gflops_per_sample: float
    n: int
    seconds: float
    # where the seconds went on rank 0: setup (models, compile of a first shape), sampling (first batch apart: it
    # holds any recompile for a new batch shape), inception, metrics (FID and KID)
    phases: dict[str, float] = field(default_factory=dict)


def reference_key(data: DataConfig, n: int, parts: list[dict[str, Any]] | None = None) -> str:
    """Cache key of the reference features: what decides which pixels go into Inception (``parts``: a grown run's
    generations, whose union is its reference data)."""
    fields: dict[str, Any] = {"uri": data.uri, "image_size": data.image_size, "channels": data.channels,
                              "limit": data.limit, "n": n, "extractor": EXTRACTOR_ID}
    if parts:
        fields["parts"] = parts
    ident = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def reference_features(store: Store, data: DataConfig, n: int, extractor: torch.nn.Module, batch_size: int,
                       source: Any = None, parts: list[dict[str, Any]] | None = None) -> torch.Tensor:
    """(n, 2048) Inception features of n training images (a fixed random subset), cached in the store."""
    prefix = f"{REFERENCE}/{reference_key(data, n, parts)}"
    if store.read_manifest(prefix) is not None:
        return torch.load(io.BytesIO(store.read_committed(prefix, "features.pt")), weights_only=True)
    if source is None:
        from ..data import open_source

        source = open_source(data, store)
    keys = source.keys()
    pick = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
    feats = []
    for i in range(0, len(pick), batch_size):
        images = source.load([keys[j] for j in pick[i : i + batch_size]]).images  # (b, C, H, W) in [-1, 1]
        feats.append(fid.extract_features(extractor, images, batch_size))  # (b, 2048)
    features = torch.cat(feats).float()  # (n, 2048)
    buf = io.BytesIO()
    torch.save(features, buf)
    store.commit(prefix, {"features.pt": buf.getvalue()},
                 meta={"data_uri": data.uri, "image_size": data.image_size, "channels": data.channels,
                       "limit": data.limit, "n": n, "extractor": EXTRACTOR_ID})
    return features


# Rows of one model sampled as a K=1 ensemble (oracle-0 over that model alone): the compute-matched monolith and the
# distilled student, with the ensembles' noise, labels, ODE and cost accounting.
SINGLE_MODEL_ROWS = {MONOLITH_ROW: layout.MONOLITH, STUDENT_ROW: layout.DISTILLATION}


def _model_shape(spec: Any) -> tuple[int, int]:
    """(channels, side) of the images the models make: decoded pixels for latent-space models."""
    channels, size = spec.output_shape
    return int(channels), int(size)


def row_store(store: Store, name: str) -> tuple[Store, str]:
    """(the run whose ensemble a row samples, its strategy): ``parent:<strategy>`` rows sample the parent's."""
    if not name.startswith(PARENT_ROW):
        return store, name
    from ..lineage import parent_of
    from ..store import open_store

    parent = parent_of(store)
    if parent is None:
        raise ConfigError(f"strategy {name!r} needs a grown run, but {store.url(layout.CLUSTERING)} names no parent")
    return open_store(parent["uri"]), name[len(PARENT_ROW):]


def validate(cfg: EvaluateConfig, store: Store) -> tuple[Any, list[dict[str, Any]]]:
    """Every check that can fail before sampling; returns the opened reference data source (a grown run's: every
    generation's data) and what identifies it beyond ``cfg.data``."""
    from ..checkpoint import has_final
    from ..grown_data import open_reference_data
    from .sample import expert_spec, validate_ensemble

    want = (cfg.data.channels, cfg.data.image_size)
    for name in cfg.strategies:
        if name in SINGLE_MODEL_ROWS:
            stage_dir = SINGLE_MODEL_ROWS[name]
            if not has_final(store, stage_dir):
                raise MissingArtifactError(f"strategy {name!r} needs committed final weights at "
                                           f"{store.url(layout.final(stage_dir))}")
            config = json.loads(store.read_committed(layout.final(stage_dir), "config.json"))
            specs = [expert_spec(config, store.url(layout.final(stage_dir)))]
        else:
            specs = [s for s in validate_ensemble(*row_store(store, name)).experts if s is not None]
        got = _model_shape(specs[0])
        if got != want:
            raise ConfigError(f"strategy {name!r}: the models make {got[0]}x{got[1]}px images but data "
                              f"{cfg.data.uri} is {want[0]}x{want[1]}px (set data.channels / data.image_size)")
    source, parts = open_reference_data(store, cfg.data)
    if len(source) < cfg.reference_n:
        raise DataError(f"reference_n={cfg.reference_n} but data.uri {cfg.data.uri} holds {len(source)} images")
    return source, parts


def format_table(rows: list[Row]) -> str:
    lines = ["| strategy | FID | KID (mean ± std) | NFE | GFLOPs/sample | images/s | N |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.strategy} | {r.fid:.2f} | {r.kid_mean:.4f} ± {r.kid_std:.4f} | {r.nfe:.1f} | "
                     f"{r.gflops_per_sample:.3g} | {r.n / max(r.seconds, 1e-9):.0f} | {r.n} |")
    return "\n".join(lines) + "\n"


def row_key(cfg: EvaluateConfig, name: str, experts: list[int] | None = None,
            parts: list[dict[str, Any]] | None = None) -> str:
    """What decides a strategy's row: a committed row with another key is sampled again, not reused (a partial
    ensemble's row is redone once more experts have committed)."""
    ident = json.dumps({"strategy": name, "experts": experts, "n": cfg.n_samples, "steps": cfg.steps,
                        "method": cfg.method,
                        "cfg_scale": cfg.cfg_scale, "seed": cfg.seed, "use_ema": cfg.use_ema,
                        "precision": cfg.precision, "reference": reference_key(cfg.data, cfg.reference_n, parts),
                        "kid": [cfg.kid_subset_size, cfg.kid_subsets]}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def strategy_prefix(name: str, output: str = layout.EVALUATION) -> str:
    return f"{output}/strategies/{file_name(name)}"


def file_name(name: str) -> str:
    """A row's name in paths: ``parent:full`` -> ``parent-full``."""
    return name.replace(":", "-")


def committed_row(store: Store, name: str, key: str, output: str = layout.EVALUATION
                  ) -> tuple[Row, bytes | None] | None:
    """The row (and grid) a previous attempt committed for this strategy with the same settings, if any."""
    manifest = store.read_manifest(strategy_prefix(name, output))
    if manifest is None or manifest.get("key") != key:
        return None
    grid = store.read_committed(strategy_prefix(name, output), "grid.png") if "grid.png" in manifest["files"] \
        else None
    return Row(**manifest["row"]), grid


def _gather(rt: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (rank order), ``[obj]`` without torchrun; other ranks get []."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size if rt.is_main else []
    torch.distributed.gather_object(obj, out if rt.is_main else None, dst=0)
    return out


FID_CAPTIONS = 1024  # distinct training captions the FID draws cycle through (text-conditioned experts)
_captions_cache: dict[tuple[str, int, int], Any] = {}


def fid_captions(store: Store, data: DataConfig, spec: Any, seed: int) -> Any:
    """The conditions of a text-conditioned ensemble's FID draws: the caption embeddings the cluster stage stored
    for a seeded sample of FID_CAPTIONS training images (sample i gets caption i mod FID_CAPTIONS), so the
    generated images follow the training captions' distribution, as the reference images do. Each caption keeps
    its image's cluster: the expert the ``oracle`` strategy asks for it."""
    from ..cluster_shards import open_all_shards
    from ..clustering import load_assignments
    from .sample import Prompts

    key = (store.url(), int(spec.text_dim), seed)
    if key not in _captions_cache:
        shards = open_all_shards(store, data, spec.text_dim)
        batch = next(iter(shards.stream(min(FID_CAPTIONS, len(shards)), seed, workers=0)))
        assignments = load_assignments(store)
        cluster_of = dict(zip(assignments.keys, assignments.cluster.tolist()))
        _captions_cache[key] = Prompts(batch.keys, batch.text, batch.text_mask, batch.text_pooled,
                                       [cluster_of[k] for k in batch.keys])
    return _captions_cache[key]


def prompt_grids(cfg: EvaluateConfig, store: Store, device: torch.device) -> dict[str, bytes]:
    """``prompts/<slug>.png``: grid_nrow images per evaluation prompt, drawn with the first ensemble strategy."""
    from .sample import generate, grid_png

    if not cfg.prompts:
        return {}
    strategy = next((s for s in cfg.strategies if s not in SINGLE_MODEL_ROWS and not s.startswith(PARENT_ROW)),
                    "full")
    n = cfg.grid_nrow * len(cfg.prompts)
    images, _ = generate(store, strategy, n, min(n, 256), cfg.steps, cfg.method, cfg.seed, device, cfg.cfg_scale,
                         use_ema=cfg.use_ema, precision=cfg.precision, prompts=cfg.prompts)
    out = {}
    for p, prompt in enumerate(cfg.prompts):  # image i has prompt i mod P
        slug = "-".join("".join(c if c.isalnum() else " " for c in prompt.lower()).split())[:80] or f"{p:02d}"
        out[f"prompts/{slug}.png"] = grid_png(images[p :: len(cfg.prompts)], cfg.grid_nrow)
    return out


MAX_ROUTED_FACTOR = 4  # a routed strategy's batch grows at most this much over the base (memory of router/ODE)


def strategy_batch(base: int, strategy: Any, num_experts: int, n: int, world_size: int = 1) -> int:
    """The sampling batch of one strategy: each expert should see about ``base`` samples per call, so a strategy
    that sends each sample to k of K experts draws base * K / k at once (top-1 of 4: 4x; full: 1x), at most
    ``MAX_ROUTED_FACTOR`` x base; then evened out so no last batch is a small remainder (5,000 at 4,096 -> 2 x 2,500).
    Expert batches of base/K ran top-1 at 31% of the ideal on the H100, full at 52%."""
    # oracle-C: no split; oracle: one expert per sample, as top-1
    kept = {"top": strategy.k, "sample": strategy.k, "mixture": 1}.get(strategy.kind, num_experts)
    target = base * min(max(num_experts // max(kept, 1), 1), MAX_ROUTED_FACTOR)
    per_rank = -(-n // world_size)
    batches = max(-(-per_rank // target), 1)
    return max(-(-per_rank // batches), 1)


def _sync(images: torch.Tensor) -> None:
    """Wait for the GPU's work on ``images``, so the phase it belongs to is timed, not the next one."""
    if images.is_cuda:
        torch.cuda.synchronize(images.device)


def evaluate_strategy(cfg: EvaluateConfig, store: Store, name: str, rt: Any, extractor: torch.nn.Module,
                      batch_size: int, compile: bool, real: torch.Tensor | None, reporter: Any,
                      index: int, auto_batch: bool = False,
                      models: dict[tuple[Any, ...], torch.nn.Module] | None = None
                      ) -> tuple[Row, bytes | None] | None:
    """Sample this rank's share of the strategy's images, streaming each batch into Inception features; rank 0
    gathers the features and sampling costs and returns the row and grid (other ranks return None).
    ``auto_batch``: size the batch for the strategy (``strategy_batch``); ``models``: loaded models to reuse."""
    from ..images import save_grid
    from .sample import Draw, sample_batches, sampler_for

    start_time = time.monotonic()
    # The monolith and the student are K=1 ensembles sampled exactly as the others: same noise, labels, ODE and
    # cost accounting (their GFLOPs are their own model's).
    strategy, dirs = ("oracle-0", [SINGLE_MODEL_ROWS[name]]) if name in SINGLE_MODEL_ROWS else (name, None)
    sample_store, strategy = row_store(store, strategy)  # parent:<strategy>: the parent's ensemble
    sampler, spec = sampler_for(sample_store, strategy, cfg.steps, cfg.method, rt.device, cfg.cfg_scale,
                                use_ema=cfg.use_ema, precision=cfg.precision, compile=compile, stage_dirs=dirs,
                                models=models, data=cfg.data)
    if auto_batch:
        batch_size = strategy_batch(batch_size, sampler.strategy, sampler.num_experts, cfg.n_samples,
                                    rt.world_size)
    feats: list[tuple[int, torch.Tensor]] = []  # (first sample index, (b, 2048) float32)
    grid: list[torch.Tensor] = []
    done, last_report = 0, 0.0
    captions = fid_captions(sample_store, cfg.data, spec, cfg.seed) if spec.text_dim is not None else None
    draw = Draw(cfg.n_samples, batch_size, cfg.seed, prompts=captions)
    feature_batch = min(batch_size, 500)
    phases = {"setup_s": time.monotonic() - start_time, "first_batch_s": 0.0, "sampling_s": 0.0, "inception_s": 0.0}
    mark = time.monotonic()
    for start, images, _ in sample_batches(sampler, spec, draw, rt.rank, rt.world_size):
        _sync(images)
        now = time.monotonic()
        phases["sampling_s" if phases["first_batch_s"] else "first_batch_s"] += now - mark
        feats.append((start, fid.extract_features(extractor, images, feature_batch).float()))
        mark = time.monotonic()
        phases["inception_s"] += mark - now
        if start < cfg.grid_count:
            grid.append(images[: cfg.grid_count - start].float().cpu())
        done += images.shape[0]
        now = time.monotonic()
        if reporter and now - last_report >= 5.0:  # an estimate from rank 0's share
            reporter.update(index, strategy=name, images=min(done * rt.world_size, cfg.n_samples),
                            of=cfg.n_samples, images_per_s=done * rt.world_size / max(now - start_time, 1e-9))
            last_report = now
    totals = sampler.stats(1)
    parts = _gather(rt, (feats, totals.nfe, totals.gflops_per_sample, grid))
    if not rt.is_main:
        return None
    ordered = sorted((item for p in parts for item in p[0]), key=lambda f: f[0])
    fake = torch.cat([f for _, f in ordered]).double()  # (N, 2048) in sample order
    nfe = sum(p[1] for p in parts) / cfg.n_samples
    gflops = sum(p[2] for p in parts) / cfg.n_samples
    grid_images = torch.cat([g for p in parts for g in p[3]]) if cfg.grid_count > 0 else None
    assert real is not None  # rank 0 holds the reference features
    metrics_start = time.monotonic()
    fid_value = fid.fid_from_features(real, fake, rt.device)
    kid_mean, kid_std = fid.kid_from_features(real, fake, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed,
                                              rt.device)
    if not math.isfinite(fid_value):
        raise DataError(f"strategy {name!r}: FID is {fid_value} (non-finite samples?)")
    phases["metrics_s"] = time.monotonic() - metrics_start
    row = Row(name, fid_value, kid_mean, kid_std, float(nfe), float(gflops), cfg.n_samples,
              time.monotonic() - start_time, {k: round(v, 3) for k, v in phases.items()})
    png = save_grid(grid_images[: cfg.grid_count], nrow=cfg.grid_nrow) if grid_images is not None \
        and len(grid_images) else None
    return row, png


def runnable_rows(cfg: EvaluateConfig, store: Store) -> EvaluateConfig:
    """``cfg`` without the parent:<strategy> rows the parent's ensemble cannot draw (top-K or oracle-C beyond the
    parent's K: the grown run asks for its own K)."""
    from ..combine import parse_strategy
    from ..lineage import parent_of

    parent = parent_of(store)
    keep = []
    for name in cfg.strategies:
        if name.startswith(PARENT_ROW) and parent is not None:
            try:
                parse_strategy(name[len(PARENT_ROW):]).check(int(parent["num_clusters"]))
            except ConfigError as e:
                print(f"evaluate: no row {name}: {e}", flush=True)
                continue
        keep.append(name)
    return cfg if keep == cfg.strategies else cfg.model_copy(update={"strategies": keep})


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Every strategy's row, each committed when it is done (a restarted evaluation goes on with the next one),
    then the table. Under torchrun every rank samples a disjoint share of each strategy's images."""
    from ..progress import Reporter
    from ..runtime import barrier, setup_runtime, shutdown
    from ..store import open_store

    rt = setup_runtime(cfg.device)
    store = open_store(cfg.run_uri)
    cfg = runnable_rows(cfg, store)
    source, parts = validate(cfg, store)
    cuda = rt.device.type == "cuda"
    batch_size = cfg.batch_size or (1024 if cuda else 256)  # a routed strategy draws more at once: strategy_batch
    models: dict[tuple[Any, ...], torch.nn.Module] = {}  # experts and router read and compiled once for all rows
    compile = cfg.compile if cfg.compile is not None else cuda
    # progress/evaluate.json, or probe-NNN.json for a partial ensemble's evaluation (output partial/NNN)
    probe = cfg.output.startswith(f"{layout.PARTIAL}/") and cfg.output.split("/")[-1].isdigit()
    reporter = (Reporter(cfg.progress, None, len(cfg.strategies), store) if cfg.progress
                else Reporter("probe", int(cfg.output.split("/")[-1]), len(cfg.strategies), store) if probe
                else Reporter("evaluate", None, len(cfg.strategies), store)) if rt.is_main else None
    extractor = fid.build_extractor(rt.device)
    real = None
    if rt.is_main:
        reporter.event("reference", n=cfg.reference_n)  # type: ignore[union-attr]
        real = reference_features(store, cfg.data, cfg.reference_n, extractor, min(batch_size, 500), source, parts)
    from ..lineage import parent_of
    from .sample import committed_experts, ensemble_size

    rows: list[Row] = []
    files: dict[str, bytes] = {}
    experts = committed_experts(store)  # a partial ensemble (some experts failed for good) samples with these
    num_experts = ensemble_size(store, experts)
    missing = [k for k in range(num_experts) if k not in experts]
    for i, name in enumerate(cfg.strategies):
        row_experts = None if name in SINGLE_MODEL_ROWS else committed_experts(row_store(store, name)[0])
        key = row_key(cfg, name, row_experts, parts)
        found = committed_row(store, name, key, cfg.output)
        if found is None:
            result = evaluate_strategy(cfg, store, name, rt, extractor, batch_size, compile, real, reporter, i,
                                       auto_batch=cfg.batch_size is None, models=models)
            if rt.is_main:
                assert result is not None
                row, png = result
                store.commit(strategy_prefix(name, cfg.output), {"grid.png": png} if png else {},
                             meta={"key": key, "row": asdict(row)})
                found = result
            barrier(rt)
        elif reporter:
            reporter.event("reused", strategy=name, uri=store.url(strategy_prefix(name, cfg.output)))
        if rt.is_main:
            row, png = found  # type: ignore[misc]
            rows.append(row)
            if png:
                files[f"grids/{file_name(name)}.png"] = png
            reporter.update(i + 1, strategy=name, fid=row.fid, kid=row.kid_mean, seconds=row.seconds,  # type: ignore[union-attr]
                            images_per_s=row.n / max(row.seconds, 1e-9))
    result: dict[str, Any] = {}
    if rt.is_main:
        table = [asdict(r) for r in rows]
        result = {"table": table, "reference_n": cfg.reference_n, "data_uri": cfg.data.uri, "steps": cfg.steps,
                  "method": cfg.method, "cfg_scale": cfg.cfg_scale, "seed": cfg.seed, "extractor": EXTRACTOR_ID,
                  "precision": cfg.precision, "world_size": rt.world_size, "batch_size": batch_size,
                  "experts": experts, "missing_experts": missing}
        parent = parent_of(store)
        if parent is not None:  # a grown run: its parent's ensemble, whose rows are parent:<strategy>
            result["parent"] = {"uri": parent["uri"], "experts": parent["experts"],
                                "num_clusters": parent["num_clusters"]}
        grids = prompt_grids(cfg, store, rt.device)
        files.update(grids)
        if grids:
            result["prompts"] = dict(zip(grids, cfg.prompts or []))
        files["results.json"] = json.dumps(result, indent=2).encode()
        partial = (f"; a partial ensemble of experts {experts} of {num_experts} (missing: {missing})"
                   if missing else "")
        files["results.md"] = (f"FID-{cfg.n_samples} vs {cfg.reference_n} training images ({cfg.data.uri}), "
                               f"{cfg.steps} {cfg.method} steps{partial}\n\n" + format_table(rows)).encode()
        store.commit(cfg.output, files, meta={"table": table, "experts": experts, "missing_experts": missing,
                                              "parent": result.get("parent"), "n_samples": cfg.n_samples})
        reporter.close(step=len(rows), results=store.url(f"{cfg.output}/results.json"))  # type: ignore[union-attr]
        print(format_table(rows), flush=True)
    barrier(rt)
    shutdown(rt)
    return result

