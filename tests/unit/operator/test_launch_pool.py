"""How a pass launches its stages (operator/ddm_operator/k8s/handlers.py ``_launch_all``): all at once in the shared
pool, and it returns only when every launch is done, failed ones included. tests/integration/test_operator.py creates
the children for real (crash, SIGKILL, full sequence)."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ddm_operator import planner as pl
from ddm_operator.k8s import handlers


def launches(n: int) -> list[pl.Launch]:
    return [pl.Launch(key=pl.StageKey("expert", k), attempt=1) for k in range(n)]


def test_a_pass_sends_all_its_launches_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """K experts + router: 9 launches in flight together (the pass costs one launch, not ceil(9 / threads))."""
    actions = launches(9)
    together = threading.Barrier(len(actions), timeout=10)  # breaks unless all 9 are in flight at the same time
    monkeypatch.setattr(handlers, "_launch_in", lambda spec, owner, action: together.wait())
    handlers._launch_all(None, None, actions)  # type: ignore[arg-type]


def test_the_first_failure_is_raised_after_every_launch_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass ends with none of its creates in flight (the next pass never races one of them), and reports the
    first failure in plan order."""
    done: list[int] = []

    def launch(spec: Any, owner: Any, action: pl.Launch) -> None:
        index = action.key.index
        if index in (2, 5):
            raise handlers.ClusterUnreachable(f"c{index}", OSError("refused"))
        time.sleep(0.2)
        done.append(index)

    monkeypatch.setattr(handlers, "_launch_in", launch)
    with pytest.raises(handlers.ClusterUnreachable, match="c2"):
        handlers._launch_all(None, None, launches(6))  # type: ignore[arg-type]
    assert sorted(done) == [0, 1, 3, 4]
