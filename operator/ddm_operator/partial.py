"""The partial ensemble's latest lightweight evaluation (spec.evaluation.partial), read from the run store for
``status.partial`` (the operator) and ``ddm status`` (the local runner) alike. Torch-free."""
from __future__ import annotations

from typing import Any

from ddm_trainer.layout import PARTIAL

from .api.models import PartialEnsembleStatus


def latest_partial(store: Any) -> PartialEnsembleStatus | None:
    """The committed probe that held the most experts, or None before any committed."""
    prefixes = [p for p in store.committed_prefixes(PARTIAL) if p.rsplit("/", 1)[-1].isdigit()]
    for prefix in sorted(prefixes, key=lambda p: int(p.rsplit("/", 1)[-1]), reverse=True):
        manifest = store.read_manifest(prefix)
        row = _first_row(manifest)
        if row is None:
            continue
        return PartialEnsembleStatus(experts=list(manifest.get("experts") or []),  # type: ignore[union-attr]
                                     missing_experts=list(manifest.get("missing_experts") or []),  # type: ignore[union-attr]
                                     strategy=str(row["strategy"]), fid=float(row["fid"]), num_samples=int(row["n"]),
                                     uri=store.url(f"{prefix}/results.json"))
    return None


def _first_row(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    table = (manifest or {}).get("table") or []
    return table[0] if table else None


def describe(p: PartialEnsembleStatus) -> str:
    """One line for ``ddm status``."""
    missing = f" (missing {p.missing_experts})" if p.missing_experts else ""
    return f"partial ensemble of experts {p.experts}{missing}: {p.strategy} FID-{p.num_samples} {p.fid:.2f}"
