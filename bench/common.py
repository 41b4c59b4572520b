"""Benchmark records: ``record(...)`` appends one result to ``bench/results/<benchmark>.json``.

Each file holds a JSON list of {"metric","value","unit","reference","ratio","command","machine","date"}. A new
record replaces an older one with the same metric and machine, so re-running a benchmark updates its numbers.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    """'<host>: N CPU cores[, GPU name x count]' - enough to tell this machine's numbers from the GPU box's."""
    name = f"{platform.node()}: {os.cpu_count()} CPU cores"
    try:
        import torch

        if torch.cuda.is_available():
            name += f", {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    except ImportError:
        pass
    return name


def this_command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def record(benchmark: str, metric: str, value: float, unit: str, reference: float | None = None,
           ratio: float | None = None, command: str | None = None, machine: str | None = None,
           results_dir: str | Path = RESULTS) -> dict[str, Any]:
    """Append one record to ``<results_dir>/<benchmark>.json``; ``ratio`` defaults to value / reference."""
    if ratio is None and reference:
        ratio = value / reference
    entry = {"metric": metric, "value": value, "unit": unit, "reference": reference, "ratio": ratio,
             "command": command or this_command(), "machine": machine or machine_name(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(results_dir) / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in old if (r.get("metric"), r.get("machine")) != (metric, entry["machine"])]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(kept + [entry], indent=2) + "\n")
    os.replace(tmp, path)
    print(f"{benchmark}: {metric} = {value} {unit}" + (f" (reference {reference}, ratio {ratio:.3g})"
                                                       if reference else ""))
    return entry


def add_openblas_arg(parser: Any) -> None:
    parser.add_argument("--openblas", default="auto",
                        help="faiss-cpu's OpenBLAS kernels: auto (ddm_trainer.clustering.import_faiss picks them from "
                             "the CPU flags, as the trainer does), library (OpenBLAS's own CPU detection), or a "
                             "kernel family name such as SkylakeX or Haswell")


def import_faiss_for(choice: str) -> tuple[Any, str]:
    """faiss loaded with the OpenBLAS kernels ``choice`` names, and a tag saying which ran (for metric names)."""
    if choice == "library":
        os.environ.pop("OPENBLAS_CORETYPE", None)
        import faiss

        return faiss, "openblas=library"
    if choice != "auto":
        os.environ["OPENBLAS_CORETYPE"] = choice
    from ddm_trainer.clustering import import_faiss

    faiss = import_faiss()
    return faiss, f"openblas={os.environ.get('OPENBLAS_CORETYPE', 'library')}"
