"""Progress reporting: one machine-readable line per event for the operator/local runner, a bar for a person.

Machine lines go to stdout as ``DDM_PROGRESS {json}``; the latest one of each stage is also written to
``<run>/progress/<stage-id>.json`` (throttled) so a controller can show "step of total" without reading logs.
Bars (tqdm) go to stderr only when it is a terminal, or when DDM_PROGRESS_BAR=1.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

PREFIX = "DDM_PROGRESS "
_preempted = False


def parse_line(line: str) -> dict[str, Any] | None:
    """The event on a progress line, or None for any other output line."""
    if not line.startswith(PREFIX):
        return None
    try:
        return json.loads(line[len(PREFIX) :])
    except json.JSONDecodeError:
        return None


def install_preemption_handler() -> None:
    """SIGTERM (node drain, preemption, Ctrl-C in the local runner) sets a flag; loops checkpoint and exit 143."""

    def _handler(signum: int, frame: Any) -> None:
        global _preempted
        _preempted = True

    signal.signal(signal.SIGTERM, _handler)


def preempt_requested() -> bool:
    return _preempted


class Reporter:
    """``Reporter(stage, index, total, store)``; call ``update(step, **metrics)``; ``close()`` at the end."""

    def __init__(self, stage: str, index: int | None = None, total: int | None = None, store: Any = None,
                 every_s: float = 5.0, desc: str | None = None):
        from .layout import PROGRESS, stage_id

        self.stage, self.index, self.total, self.store = stage, index, total, store
        self.key = f"{PROGRESS}/{stage_id(stage, index)}.json"
        self.every_s = every_s
        self._last_write = 0.0
        self._sticky: dict[str, Any] = {}  # kept in every stored report: the last committed checkpoint
        self._bar = None
        if sys.stderr.isatty() or os.environ.get("DDM_PROGRESS_BAR") == "1":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc or stage_id(stage, index), file=sys.stderr, dynamic_ncols=True)

    def event(self, kind: str, force_store: bool = False, **fields: Any) -> dict[str, Any]:
        ev = {"stage": self.stage, "index": self.index, "event": kind, "total": self.total, "time": time.time(), **fields}
        sys.stdout.write(PREFIX + json.dumps(ev, default=float) + "\n")
        sys.stdout.flush()
        if kind == "checkpoint" and fields.get("checkpoint"):
            self._sticky["last_checkpoint"] = fields["checkpoint"]
        now = time.monotonic()
        if self.store is not None and (force_store or now - self._last_write >= self.every_s):
            try:
                self.store.put_json(self.key, {**self._sticky, **ev})
                self._last_write = now
            except Exception:  # progress is advisory; never fail training over it
                pass
        return ev

    def update(self, step: int, **metrics: Any) -> None:
        self.event("progress", step=step, **metrics)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()},
                                  refresh=False)
            self._bar.refresh()

    def checkpoint(self, step: int, uri: str, **fields: Any) -> None:
        self.event("checkpoint", force_store=True, step=step, checkpoint=uri, **fields)

    def close(self, **fields: Any) -> None:
        self.event("done", force_store=True, **fields)
        if self._bar is not None:
            self._bar.close()
