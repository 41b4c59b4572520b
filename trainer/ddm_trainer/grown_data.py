"""All the data of a grown run as one ``Source``: every generation's data island, keys ``<generation>:<key>``.

The router of a grown run learns p(k | x_t, t) over every cluster, old and new, so it trains on the union; the
evaluation takes its reference images from the same union. A run that was not grown reads its own data as before.
"""
from __future__ import annotations

import numpy as np

from .configs.common import DataConfig
from .data import Source, open_source
from .lineage import Part, data_parts, parent_of, union_keys
from .store import Store

GROUP_STRIDE = 1 << 32  # group ids of generation g start at g * GROUP_STRIDE (shard-grouped shuffling)


class UnionSource(Source):
    """The samples of several sources, in order; sample i of the union is sample i - offset of its source."""

    def __init__(self, cfg: DataConfig, sources: list[Source], keys: list[str]):
        super().__init__(cfg)
        self._sources = sources
        sizes = [len(s) for s in sources]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (G + 1,)
        self._keys = keys
        labels = [s._label_ids for s in sources]
        if all(x is not None for x in labels):
            self._label_ids = np.concatenate(labels)  # type: ignore[arg-type]
            self._num_classes = max(s.num_classes or 0 for s in sources) or None
        self._index = {k: i for i, k in enumerate(self._keys)}

    def _where(self, i: int) -> tuple[int, int]:
        g = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return g, i - int(self._offsets[g])

    def _decode_one(self, i: int) -> np.ndarray:
        g, j = self._where(i)
        return self._sources[g]._decode_one(j)

    def _encoded_one(self, i: int) -> tuple[str, bytes]:
        g, j = self._where(i)
        return self._sources[g]._encoded_one(j)

    def _grouped(self) -> bool:
        return any(s._grouped() for s in self._sources)

    def _group_of(self, i: int) -> int:
        g, j = self._where(i)
        return g * GROUP_STRIDE + self._sources[g]._group_of(j)


def open_run_data(store: Store, data: DataConfig) -> tuple[Source, dict[str, int], list[Part]]:
    """(the run's data, sample key -> cluster id, the generations): ``data`` alone for a run that was not grown,
    else the union of every generation's data with prefixed keys."""
    parts = data_parts(store, data)
    if parent_of(store) is None:
        part = parts[-1]
        return open_source(data, store), dict(zip(part.keys, part.cluster.tolist())), parts
    keys = union_keys(parts)
    cluster_of = dict(zip(keys, np.concatenate([p.cluster for p in parts]).tolist()))
    sources = [open_source(p.data, p.store) for p in parts]
    for p, s in zip(parts, sources):
        if s.keys() != p.keys:
            from .errors import DataError

            raise DataError(f"data.uri {p.data.uri} now holds other samples than when {p.store.url()} clustered it")
    return UnionSource(data, sources, keys), cluster_of, parts


def open_reference_data(store: Store, data: DataConfig) -> tuple[Source, list[dict[str, object]]]:
    """The evaluation's reference images: this run's data, or the union of a grown run's generations; and what
    identifies them beyond ``data`` (empty when not grown) for the reference features' cache key."""
    if parent_of(store) is None:
        return open_source(data, store), []
    source, _, parts = open_run_data(store, data)
    return source, [{"store": p.store.url(), "uri": p.data.uri, "limit": p.data.limit} for p in parts]


class RoutedStore:
    """The reads ``ClusterShards`` makes (``get_bytes``, ``url``), routed by a ``g<generation>/`` key prefix to
    that generation's store: one cluster's shards of several generations, each read where it was committed."""

    def __init__(self, stores: list[Store]):
        self.stores = stores

    def _split(self, key: str) -> tuple[Store, str]:
        head, _, rest = key.partition("/")
        if head.startswith("g") and head[1:].isdigit() and rest:
            return self.stores[int(head[1:])], rest
        return self.stores[-1], key

    def get_bytes(self, key: str) -> bytes:
        store, rest = self._split(key)
        return store.get_bytes(rest)

    def url(self, key: str = "") -> str:
        store, rest = self._split(key)
        return store.url(rest)


def grown_cluster_shards(store: Store, cluster: int, data: DataConfig, own: Any,
                         text_dim: int | None = None) -> Any:
    """Cluster ``cluster``'s shards of every generation that has samples of it (an expert of a grown run retrained
    on its cluster's old and new data, spec.growth.retrain grown); ``own`` (this run's shards) unchanged when the
    run was not grown or only this run holds the cluster."""
    from dataclasses import replace

    from .cluster_shards import ClusterShards, open_cluster_shards

    if parent_of(store) is None:
        return own
    parts = [p for p in data_parts(store, data) if (p.cluster == cluster).any()]
    if len(parts) < 2 and (not parts or parts[0].store.url() == store.url()):
        return own
    opened = [open_cluster_shards(p.store, cluster, p.data, text_dim) for p in parts]
    if any(o is None for o in opened):
        from .errors import DataError

        raise DataError(f"cluster {cluster} has samples in a generation without cluster shards "
                        f"({[p.store.url() for p, o in zip(parts, opened) if o is None]})")
    infos = [replace(info, key=f"g{g}/{info.key}") for g, o in enumerate(opened) for info in o.shards]
    first = opened[-1]
    return ClusterShards(RoutedStore([o.store for o in opened]), infos, data,  # type: ignore[arg-type]
                         first.label_field, max((o.num_classes or 0) for o in opened) or None, first.text)
