"""``ddm run | status | sample | report``: the local runner's subcommands, registered into ``ddm``'s parser.

``add_subcommands(subparsers)`` is the hook ``ddm_operator.cli`` calls; every handler takes the parsed
namespace and returns an exit code. Library code (runner, report) takes typed values only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ddm_trainer import layout
from ddm_trainer.errors import ConfigError, DDMError
from ddm_trainer.store import Store, open_store

from ..api.models import DecentralizedDiffusion
from ..comparison import compare, compare_student
from ..planner import parent_from_manifest
from ..stages import all_keys
from .runner import LocalRunner, default_run_dir, is_done, local_run_uri, resolve_executable

SPEC_COPY = "spec.yaml"  # the runner keeps a copy of the spec in the run dir, so `ddm status RUN_DIR` works


def load_spec(path: Path) -> DecentralizedDiffusion:
    """A DecentralizedDiffusion manifest from a YAML file; ConfigError names the file and the fields."""
    from pydantic import ValidationError

    from ..cli import format_errors, load_yaml

    try:
        doc = load_yaml(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read spec {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return DecentralizedDiffusion.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"spec {path}: " + "; ".join(format_errors(e))) from None


def resolve_run(ref: str) -> tuple[DecentralizedDiffusion, Path, Path, str]:
    """A spec file or a run directory -> (object, spec path, run dir, run URI)."""
    path = Path(ref)
    if path.is_dir():
        spec_path = path / SPEC_COPY
        if not spec_path.is_file():
            raise ConfigError(f"{path} is not a run directory of `ddm run` (no {SPEC_COPY} in it)")
        obj = load_spec(spec_path)
        # The run dir is authoritative for a local store even when the spec's relative path meant something else.
        uri = local_run_uri(obj.spec, Path.cwd())
        if not uri.startswith("s3://"):
            uri = str(path.resolve())
        return obj, spec_path, path.resolve(), uri
    if not path.is_file():
        raise ConfigError(f"{ref} is neither a spec file nor a run directory")
    obj = load_spec(path)
    return obj, path, default_run_dir(obj.spec, obj.metadata.name, Path.cwd()), local_run_uri(obj.spec, Path.cwd())


def _guard(fn: Any) -> Any:
    """DDMError -> one line on stderr and its exit code, as ddm-train does."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except DDMError as e:
            print(f"ddm {args.command}: error: {e}", file=sys.stderr)
            return int(e.exit_code)

    return wrapped


# -- run -----------------------------------------------------------------------------------------------------------
def default_parallel(spec: Any) -> int:
    """Children at once when ``--parallel`` is not given: the spec's expert parallelism plus the router, else 2."""
    return spec.parallelism + 1 if spec.parallelism else 2


def cmd_run(args: argparse.Namespace) -> int:
    spec_path = Path(args.spec)
    obj = load_spec(spec_path)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir(obj.spec, obj.metadata.name, Path.cwd())
    uri = local_run_uri(obj.spec, Path.cwd())
    if args.run_dir and not uri.startswith("s3://"):
        uri = str(run_dir)  # --run-dir moves a local store with it
    parallel = args.parallel or default_parallel(obj.spec)
    runner = LocalRunner(obj.spec, spec_path, run_dir, uri, parallel, obj.metadata.name)
    return runner.run()


# -- status --------------------------------------------------------------------------------------------------------
def stage_rows(obj: DecentralizedDiffusion, store: Store) -> list[tuple[str, str, str, str]]:
    """(stage, state, progress, detail) per stage, from the store alone."""
    rows = []
    growth = obj.spec.growth
    parent = parent_from_manifest(store.read_manifest(layout.CLUSTERING)) if growth is not None else None
    for key in all_keys(obj.spec):
        manifest = is_done(store, key)
        if parent is not None and key.stage == "expert" and manifest is None and key.index in parent.experts \
                and not (growth.retrain == "grown" and key.index in parent.grown):  # type: ignore[union-attr]
            rows.append((key.id, "parent's", "", f"by reference: {parent.uri}"))  # never trained here
            continue
        progress_key = f"{layout.PROGRESS}/{key.id}.json"
        ev = store.get_json(progress_key) if store.exists(progress_key) else None
        if manifest is not None:
            state = "done"
        elif ev is not None:
            state = "stopped" if ev.get("event") == "done" else "started"
        else:
            state = "pending"
        total = ev.get("total") if ev else None
        step = f"{ev.get('step', '?')}/{total or '?'}" if ev else ""
        if manifest is not None and total:
            step = f"{total}/{total}"
        detail = f"loss {ev['loss']:.4g}" if ev and isinstance(ev.get("loss"), (int, float)) else ""
        if manifest is not None and "committed_at" in manifest:
            detail = (detail + "  " if detail else "") + time.strftime(
                "committed %Y-%m-%d %H:%M:%S", time.localtime(manifest["committed_at"]))
        rows.append((key.id, state, step, detail))
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    obj, _, run_dir, uri = resolve_run(args.run)
    store = open_store(uri)
    rows = stage_rows(obj, store)
    print(f"run {obj.metadata.name}: store {uri}")
    header = ("STAGE", "STATE", "STEP", "DETAIL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    from ..partial import describe, latest_partial

    partial = latest_partial(store)  # spec.evaluation.partial: quality growing as experts land
    if partial is not None:
        print(f"\n{describe(partial)}")
    results = f"{layout.EVALUATION}/results.json"
    if store.read_manifest(layout.EVALUATION) is not None and store.exists(results):
        from .report import fid_rows

        print("\nFID per strategy:")
        rows = fid_rows(store.get_json(results))
        for row in rows:
            fid = f"{row['fid']:.2f}" if isinstance(row["fid"], (int, float)) else "-"
            print(f"  {row['strategy']:<14} FID {fid:>8}  NFE {row['nfe']}  N {row['n']}")
        vs = compare((r["strategy"], r["fid"] if isinstance(r["fid"], (int, float)) else None) for r in rows)
        if vs is not None:
            print(f"\n{vs.sentence()}")
        student = compare_student((r["strategy"], r["fid"] if isinstance(r["fid"], (int, float)) else None)
                                  for r in rows)
        if student is not None:
            print(student.sentence())
    report = run_dir / "report" / "index.html"
    if report.exists():
        print(f"\nreport: {report}")
    return 0


# -- sample --------------------------------------------------------------------------------------------------------
def sample_config(run_uri: str, strategy: str, count: int, name: str, steps: int | None, seed: int,
                  prompts: list[str] | None = None, cfg_scale: float | None = None) -> dict[str, Any]:
    """The trainer's sample-stage config: it writes ``samples/<name>/grid.png`` (and ``grid-NN.png`` per prompt)
    into the run store."""
    cfg: dict[str, Any] = {"run_uri": run_uri, "strategy": strategy, "n": count,
                           "grid_max": count * max(len(prompts or []), 1), "name": name, "seed": seed}
    if steps is not None:
        cfg["steps"] = steps
    if prompts:
        cfg["prompts"] = prompts
    if cfg_scale is not None:
        cfg["cfg_scale"] = cfg_scale
    return cfg


def cmd_sample(args: argparse.Namespace) -> int:
    import hashlib

    _, _, _, uri = resolve_run(args.run)
    out = Path(args.output)
    prompts = args.prompt or None
    name = f"cli-{args.strategy}-n{args.n}-s{args.seed}"
    if prompts or args.cfg_scale is not None:  # another draw: its own directory in the run store
        tag = hashlib.sha256(json.dumps([prompts, args.cfg_scale]).encode()).hexdigest()[:8]
        name += f"-{tag}"
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "sample.yaml"
        config_path.write_text(yaml.safe_dump(sample_config(uri, args.strategy, args.n, name, args.steps, args.seed,
                                                            prompts, args.cfg_scale)))
        code = subprocess.call(resolve_executable(["ddm-train", "sample", "--config", str(config_path)]))
    if code != 0:
        return code
    store = open_store(uri)
    store.get_file(f"samples/{name}/grid.png", out)
    print(f"wrote {out}")
    for p, prompt in enumerate(prompts or []):  # one grid per prompt beside it
        path = out.with_name(f"{out.stem}-{p:02d}{out.suffix}")
        store.get_file(f"samples/{name}/grid-{p:02d}.png", path)
        print(f"wrote {path} ({prompt!r})")
    return 0


# -- report --------------------------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    obj, _, run_dir, uri = resolve_run(args.run)
    print(write_report(open_store(uri), run_dir, title=f"DDM run {obj.metadata.name}"))
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Registers run/status/sample/report into ``ddm``'s subparsers."""
    p = subparsers.add_parser("run", help="run the whole pipeline locally (resumes when re-run)")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--run-dir", default=None, help="logs, configs and report (default: the spec's local storage dir)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="stages running at once (default: spec.parallelism + 1 for the router, else 2)")
    p.set_defaults(func=_guard(cmd_run))

    p = subparsers.add_parser("status", help="the stage table of a local run")
    p.add_argument("run", metavar="RUN_DIR_OR_SPEC")
    p.set_defaults(func=_guard(cmd_status))

    p = subparsers.add_parser("sample", help="sample a grid of images from a finished run")
    p.add_argument("run", metavar="RUN_DIR_OR_SPEC")
    p.add_argument("--strategy", default="top1", help="full | top1 | top-K | sample-K | nucleus-P (default top1)")
    p.add_argument("-n", type=int, default=64, help="images (default 64)")
    p.add_argument("-o", "--output", default="samples.png", help="PNG to write (default samples.png)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the trainer's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="caption for text-conditioned experts (repeat for several: -n images and a grid each)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the trainer's 1.0, no guidance)")
    p.set_defaults(func=_guard(cmd_sample))

    p = subparsers.add_parser("report", help="(re)write a run's report/index.html")
    p.add_argument("run", metavar="RUN_DIR_OR_SPEC")
    p.set_defaults(func=_guard(cmd_report))

