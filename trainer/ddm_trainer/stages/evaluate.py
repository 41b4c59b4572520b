"""Stage ``evaluate``: FID and KID of every combination strategy (and the monolith baseline) in one table.

Everything is checked before any sampling: each strategy's ensemble (router, experts' committed final weights,
K vs the strategy), the monolith's weights when ``monolith`` is a row, that the models make images of the
reference data's size, and that the reference data holds ``reference_n`` images.

Reference Inception features of the training data are cached in the run store under
``evaluation/reference/<key>/`` (key = data URI, image size, channels, limit, N, extractor), committed with a
manifest, and reused by later runs. Results: ``evaluation/`` results.json, results.md, grids/<strategy>.png; the
manifest's ``table`` holds the rows.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import fid, layout
from ..configs.common import DataConfig
from ..configs.evaluate import MONOLITH_ROW, EvaluateConfig
from ..errors import ConfigError, DataError, MissingArtifactError
from ..store import Store

REFERENCE = f"{layout.EVALUATION}/reference"
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


def reference_key(data: DataConfig, n: int) -> str:
    """Cache key of the reference features: what decides which pixels go into Inception."""
    ident = json.dumps({"uri": data.uri, "image_size": data.image_size, "channels": data.channels,
                        "limit": data.limit, "n": n, "extractor": EXTRACTOR_ID}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def reference_features(store: Store, data: DataConfig, n: int, extractor: torch.nn.Module, batch_size: int,
                       source: Any = None) -> torch.Tensor:
    """(n, 2048) Inception features of n training images (a fixed random subset), cached in the store."""
    prefix = f"{REFERENCE}/{reference_key(data, n)}"
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


def _model_shape(spec: Any) -> tuple[int, int]:
    return int(spec.channels), int(spec.image_size)


def validate(cfg: EvaluateConfig, store: Store) -> Any:
    """Every check that can fail before sampling; returns the opened reference data source."""
    from ..checkpoint import has_final
    from ..data import open_source
    from .expert import MONOLITH
    from .sample import expert_spec, validate_ensemble

    want = (cfg.data.channels, cfg.data.image_size)
    for name in cfg.strategies:
        if name == MONOLITH_ROW:
            if not has_final(store, MONOLITH):
                raise MissingArtifactError(f"strategy 'monolith' needs committed final weights at "
                                           f"{store.url(layout.final(MONOLITH))}")
            config = json.loads(store.read_committed(layout.final(MONOLITH), "config.json"))
            specs = [expert_spec(config, store.url(layout.final(MONOLITH)))]
        else:
            specs = validate_ensemble(store, name).experts
        got = _model_shape(specs[0])
        if got != want:
            raise ConfigError(f"strategy {name!r}: the models make {got[0]}x{got[1]}px images but data "
                              f"{cfg.data.uri} is {want[0]}x{want[1]}px (set data.channels / data.image_size)")
    source = open_source(cfg.data, store)
    if len(source) < cfg.reference_n:
        raise DataError(f"reference_n={cfg.reference_n} but data.uri {cfg.data.uri} holds {len(source)} images")
    return source


def generate_monolith(store: Store, n: int, batch_size: int, steps: int, method: str, seed: int,
                      device: torch.device, cfg_scale: float, use_ema: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The K=1 baseline sampled exactly as an ensemble: the same noise, labels, ODE and cost accounting."""
    from ..sampler import CombinedSampler, draw_noise
    from .expert import MONOLITH, load_expert

    model = load_expert(store, MONOLITH, "cpu", ema=use_ema)
    num_classes = getattr(model, "num_classes", None)
    sampler = CombinedSampler([model], None, "oracle-0", steps=steps, method=method,  # type: ignore[arg-type]
                              cfg_scale=cfg_scale, device=device, null_label=num_classes)
    x1 = draw_noise(n, (model.channels, model.image_size, model.image_size), seed)  # (N, C, H, W)
    y_all = None
    if num_classes:  # uniform labels, drawn as generate() draws them
        y_all = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for start in range(0, n, batch_size):
        y = y_all[start : start + batch_size] if y_all is not None else None
        out.append(sampler.sample(x1[start : start + batch_size], y, seed=seed * 1_000_003 + start).clamp(-1, 1)
                   .float().cpu())
    return torch.cat(out), sampler.stats(n).as_dict()


def format_table(rows: list[Row]) -> str:
    lines = ["| strategy | FID | KID (mean ± std) | NFE | GFLOPs/sample | N |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.strategy} | {r.fid:.2f} | {r.kid_mean:.4f} ± {r.kid_std:.4f} | {r.nfe:.1f} | "
                     f"{r.gflops_per_sample:.3g} | {r.n} |")
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    from ..images import save_grid
    from ..progress import Reporter
    from ..runtime import resolve_device
    from ..store import open_store
    from .sample import generate

    store = open_store(cfg.run_uri)
    device = resolve_device(cfg.device)
    source = validate(cfg, store)
    reporter = Reporter("evaluate", None, len(cfg.strategies), store)
    reporter.event("reference", n=cfg.reference_n)
    extractor = fid.build_extractor(device)
    real = reference_features(store, cfg.data, cfg.reference_n, extractor, cfg.batch_size, source)
    rows: list[Row] = []
    files: dict[str, bytes] = {}
    for i, name in enumerate(cfg.strategies):
        start = time.monotonic()
        if name == MONOLITH_ROW:
            images, stats = generate_monolith(store, cfg.n_samples, cfg.batch_size, cfg.steps, cfg.method,
                                              cfg.seed, device, cfg.cfg_scale, cfg.use_ema)
        else:
            images, stats = generate(store, name, cfg.n_samples, cfg.batch_size, cfg.steps, cfg.method, cfg.seed,
                                     device, cfg.cfg_scale, use_ema=cfg.use_ema)
        fake = fid.extract_features(extractor, images, cfg.batch_size)  # (N, 2048)
        fid_value = fid.fid_from_features(real, fake, device)
        kid_mean, kid_std = fid.kid_from_features(real, fake, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed)
        if not math.isfinite(fid_value):
            raise DataError(f"strategy {name!r}: FID is {fid_value} (non-finite samples?)")
        row = Row(name, fid_value, kid_mean, kid_std, float(stats["nfe"]), float(stats["gflops_per_sample"]),
                  cfg.n_samples, time.monotonic() - start)
        rows.append(row)
        if cfg.grid_count > 0:
            files[f"grids/{name}.png"] = save_grid(images[: cfg.grid_count], nrow=cfg.grid_nrow)
        reporter.update(i + 1, strategy=name, fid=fid_value, kid=kid_mean)
    table = [asdict(r) for r in rows]
    result = {"table": table, "reference_n": cfg.reference_n, "data_uri": cfg.data.uri, "steps": cfg.steps,
              "method": cfg.method, "cfg_scale": cfg.cfg_scale, "seed": cfg.seed, "extractor": EXTRACTOR_ID}
    files["results.json"] = json.dumps(result, indent=2).encode()
    files["results.md"] = (f"FID-{cfg.n_samples} vs {cfg.reference_n} training images ({cfg.data.uri}), "
                           f"{cfg.steps} {cfg.method} steps\n\n" + format_table(rows)).encode()
    store.commit(layout.EVALUATION, files, meta={"table": table})
    reporter.close(step=len(rows), results=store.url(f"{layout.EVALUATION}/results.json"))
    print(format_table(rows), flush=True)
    return result
