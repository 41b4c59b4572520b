"""A grown run and its parent: which experts it inherits, and all the data its router and evaluation see.

A grown run (spec.growth) clusters only its new data; its clustering manifest names the parent run
(``meta["parent"] = {"uri", "num_clusters", "experts"}``, the parent's committed experts when it was grown). Its
ensemble is the parent's experts, read from the parent's store where they were committed (never copied), plus the
experts it trains itself; an expert of its own under the same index wins. Parents may be grown runs themselves:
every function here walks the chain.

Torch-free: the operator reads ``parent_of`` too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import layout
from .configs.common import DataConfig
from .store import MANIFEST, Store, open_store


def parent_of(store: Store) -> dict[str, Any] | None:
    """``{"uri", "num_clusters", "experts"}`` of the run this one was grown from, or None (not a grown run, or not
    clustered yet)."""
    manifest = store.read_manifest(layout.CLUSTERING)
    return None if manifest is None else manifest.get("parent")


def own_experts(store: Store) -> list[int]:
    """Indices of experts whose final weights are committed in this store itself, ascending."""
    found = set()
    for key in store.list(layout.EXPERTS):
        parts = key.split("/")
        if len(parts) == 4 and parts[1].isdigit() and parts[2:] == ["final", MANIFEST]:
            found.add(int(parts[1]))
    return sorted(found)


def committed_experts(store: Store) -> list[int]:
    """The run's ensemble: its own committed experts and those it inherited from its parent, ascending."""
    parent = parent_of(store)
    inherited = set(parent["experts"]) if parent else set()
    return sorted(set(own_experts(store)) | inherited)


def expert_home(store: Store, k: int) -> Store:
    """The store whose ``experts/<k>/final`` is expert k of this run's ensemble: this one when it trained k, else
    the ancestor that did (by reference: the grown run never copies it). This store when nobody has it."""
    current = store
    while current.read_manifest(layout.final(layout.expert(k))) is None:
        parent = parent_of(current)
        if parent is None or k not in parent["experts"]:
            return store
        current = open_store(parent["uri"])
    return current


@dataclass
class Part:
    """One generation's data: the store holding its clustering, the data it clustered, and its assignments."""

    store: Store
    data: DataConfig
    keys: list[str]
    cluster: np.ndarray  # (N,) int64, in the grown run's cluster ids


def data_parts(store: Store, data: DataConfig) -> list[Part]:
    """Every generation's clustered data, the oldest ancestor first and this run (``data``) last."""
    from .clustering import load_assignments

    parts = []
    current, current_data = store, data
    while True:
        a = load_assignments(current)
        parts.append(Part(current, current_data, a.keys, a.cluster))
        parent = parent_of(current)
        if parent is None:
            return parts[::-1]
        current = open_store(parent["uri"])
        manifest = current.read_manifest(layout.CLUSTERING) or {}
        fields = dict((manifest.get("config") or {}).get("data") or {})
        # the parent's own data as it clustered it, read at this run's size (the checks in grow() made them equal)
        current_data = DataConfig(**{**fields, "workers": data.workers})


def union_keys(parts: list[Part]) -> list[str]:
    """Sample keys of a grown run's union source: ``<generation>:<key>`` (two islands may reuse a key)."""
    return [f"{g}:{k}" for g, p in enumerate(parts) for k in p.keys]
