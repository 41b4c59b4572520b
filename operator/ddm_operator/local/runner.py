"""``ddm run``: the whole pipeline on this machine, as subprocesses, driven by the same planner as the operator.

Loop: observe (committed manifests in the run store + the children this process runs) -> ``planner.plan`` ->
launch what it asks for, up to ``parallel`` children at once -> repeat until the plan is terminal.
Resuming is free: finished stages have manifests and are never relaunched; an interrupted stage is relaunched
with the same run URI and the trainer continues from its last checkpoint.

Children run in their own session so a terminal's Ctrl-C reaches only this process; it forwards SIGTERM
(the trainer checkpoints and exits 143), waits, and exits 130.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import yaml

from ddm_trainer import layout
from ddm_trainer.errors import is_retryable
from ddm_trainer.progress import parse_line
from ddm_trainer.store import Store, open_store

from .. import planner
from ..comparison import STUDENT
from ..api.models import DecentralizedDiffusionSpec
from ..planner import Observed, Plan, StageKey, StageObservation, State
from ..stages import all_keys, grace_period_seconds, partial_prefix, stage_command, stage_config

POLL_S = 0.5
# A child saving a checkpoint on SIGTERM gets its stage's grace period (the pods' terminationGracePeriodSeconds)
# before SIGKILL; Ctrl-C twice kills at once.
INTERRUPTED = 130
TAIL_LINES = 15


def done_prefix(key: StageKey) -> str:
    """The store prefix whose MANIFEST.json marks ``key`` as finished."""
    if key.stage == "cluster":
        return layout.CLUSTERING
    if key.stage == "expert":
        assert key.index is not None  # StageKey invariant, not user input
        return layout.final(layout.expert(key.index))
    if key.stage == "router":
        return layout.final(layout.ROUTER)
    if key.stage in ("evaluate", "evaluate-student"):  # the student's row joins the evaluation's table: is_done
        return layout.EVALUATION
    if key.stage == "baseline":
        return layout.final(layout.MONOLITH)
    if key.stage == "probe":
        return partial_prefix(key.index or 0)
    return layout.final(layout.DISTILLATION)


def is_done(store: Store, key: StageKey) -> dict[str, Any] | None:
    """The manifest that marks ``key`` finished, or None. The student's evaluation commits the evaluation's table
    again, with its row: it is done when the committed table has that row."""
    manifest = store.read_manifest(done_prefix(key))
    if manifest is not None and key.stage == "evaluate-student" \
            and not any(r.get("strategy") == STUDENT for r in manifest.get("table") or []):
        return None
    return manifest


def observed_keys(spec: DecentralizedDiffusionSpec) -> list[StageKey]:
    """Every stage of the run, and the partial ensemble's lightweight evaluations it may launch (one per count of
    committed experts)."""
    keys = all_keys(spec)
    if spec.evaluation.partial is not None:
        keys += [planner.probe_key(n) for n in range(1, spec.num_experts + 1)]
    return keys


def with_local_parent(spec: DecentralizedDiffusionSpec, base_dir: Path) -> DecentralizedDiffusionSpec:
    """spec.growth.parentUri with a relative local path made absolute, as the run's own URI is."""
    g = spec.growth
    if g is None or urlparse(g.parent_uri).scheme != "":
        return spec
    growth = g.model_copy(update={"parent_uri": str((base_dir / g.parent_uri).resolve())})
    return spec.model_copy(update={"growth": growth})


def local_run_uri(spec: DecentralizedDiffusionSpec, base_dir: Path) -> str:
    """spec.storage.uri with a relative local path made absolute (children may run elsewhere)."""
    uri = spec.storage.uri
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return str((base_dir / uri).resolve())
    return uri


def default_run_dir(spec: DecentralizedDiffusionSpec, name: str, base_dir: Path) -> Path:
    """The local store's own directory, or ``runs/<name>`` for an s3:// store (logs and report live there)."""
    uri = local_run_uri(spec, base_dir)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else uri)
    return base_dir / "runs" / name


@dataclass
class Child:
    """One running stage attempt."""

    key: StageKey
    attempt: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    reader: threading.Thread
    bar: Any = None
    step: int = 0
    total: int | None = None


@dataclass
class Finished:
    """How the last attempt of a stage ended, as this runner saw it."""

    attempts: int
    exit_code: int
    at: float
    message: str


@dataclass
class ObservedState:
    """What ``observe`` needs besides the store: this process's children and past exits."""

    running: dict[StageKey, Child] = field(default_factory=dict)
    finished: dict[StageKey, Finished] = field(default_factory=dict)
    attempts: dict[StageKey, int] = field(default_factory=dict)


def observe(spec: DecentralizedDiffusionSpec, store: Store, state: ObservedState, now: float) -> Observed:
    """Level-triggered: a manifest in the store beats anything this process remembers."""
    stages: dict[StageKey, StageObservation] = {}
    for key in observed_keys(spec):
        attempts = state.attempts.get(key, 0)
        if (manifest := is_done(store, key)) is not None:  # a training stage's manifest has its final step
            step = manifest.get("step") if key.stage == "expert" else None
            stages[key] = StageObservation(State.SUCCEEDED, attempts=attempts,
                                           total=step if isinstance(step, int) else 0)
        elif key in state.running:
            child = state.running[key]
            stages[key] = StageObservation(State.RUNNING, attempts=attempts, step=child.step, total=child.total or 0)
        elif key in state.finished:
            f = state.finished[key]
            if f.exit_code == 0:  # exited cleanly but committed nothing: the same input would do the same again
                stages[key] = StageObservation(State.FAILED, attempts=attempts, retryable=False, failed_at=f.at,
                                               message="exited 0 without committing its manifest")
            else:
                stages[key] = StageObservation(State.FAILED, attempts=attempts, retryable=is_retryable(f.exit_code),
                                               failed_at=f.at, message=f.message)
        else:
            stages[key] = StageObservation(State.ABSENT, attempts=attempts)
    parent = None
    if spec.growth is not None:  # a grown run: the parent its clustering recorded (which experts it inherits)
        parent = planner.parent_from_manifest(store.read_manifest(layout.CLUSTERING))
    return Observed(now=now, stages=stages, parent=parent)


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _pump_stdout(key: StageKey, stream: IO[bytes], log_path: Path, progress_path: Path,
                 events: "queue.Queue[tuple[StageKey, dict[str, Any]]]") -> None:
    """Progress lines -> the event queue and ``<id>.progress.jsonl`` (loss curves); other lines -> the log."""
    with open(log_path, "ab") as log, open(progress_path, "a") as prog:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            ev = parse_line(line)
            if ev is None:
                log.write(raw)
                log.flush()
                continue
            prog.write(json.dumps(ev) + "\n")
            prog.flush()
            events.put((key, ev))


def resolve_executable(cmd: list[str]) -> list[str]:
    """``ddm-train``/``ddm-launch`` from PATH, else from beside this Python (a venv used without activating it)."""
    if shutil.which(cmd[0]) is None:
        sibling = Path(sys.executable).parent / cmd[0]
        if sibling.exists():
            return [str(sibling), *cmd[1:]]
    return cmd


class LocalRunner:
    """Runs one spec to the end. ``run()`` returns the process exit code."""

    def __init__(self, spec: DecentralizedDiffusionSpec, spec_path: Path, run_dir: Path, run_uri: str,
                 parallel: int, name: str, out: IO[str] = sys.stderr):
        self.spec, self.spec_path, self.run_dir, self.run_uri = with_local_parent(spec, Path.cwd()), spec_path, \
            run_dir, run_uri
        self.parallel = max(parallel, 1)
        self.name = name
        self.out = out
        self.store = open_store(run_uri)
        self.state = ObservedState()
        self.events: queue.Queue[tuple[StageKey, dict[str, Any]]] = queue.Queue()
        self.interrupted = False
        self.launched: list[StageKey] = []  # what this invocation started (tests read it from the log)
        self.tty = out.isatty()
        self.logs = run_dir / "logs"
        self.configs = run_dir / "configs"

    # -- output ----------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.tty:
            from tqdm import tqdm

            tqdm.write(msg, file=self.out)
        else:
            print(msg, file=self.out, flush=True)

    def _free_position(self) -> int:
        used = {c.bar.pos for c in self.state.running.values() if c.bar is not None}
        pos = 0
        while pos in used or -pos in used:
            pos += 1
        return pos

    # -- launching -------------------------------------------------------------------------------------------
    def launch(self, key: StageKey, attempt: int) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.configs.mkdir(parents=True, exist_ok=True)
        config_path = self.configs / f"{key.id}.yaml"
        config_path.write_text(yaml.safe_dump(stage_config(self.spec, key, self.run_uri), sort_keys=False))
        cmd = resolve_executable(stage_command(self.spec, key, str(config_path)))
        log_path = self.logs / f"{key.id}.log"
        env = dict(os.environ)
        # Share the cores: each child gets its slice unless the user chose otherwise.
        env.setdefault("OMP_NUM_THREADS", str(stage_threads(os.cpu_count() or 1, self.parallel)))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("DDM_PROGRESS_BAR", None)  # the child's own bar would fight ours
        with open(log_path, "ab") as log:
            log.write(f"\n=== attempt {attempt}: {' '.join(cmd)} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        assert proc.stdout is not None  # stdout=PIPE
        reader = threading.Thread(target=_pump_stdout, daemon=True,
                                  args=(key, proc.stdout, log_path, self.logs / f"{key.id}.progress.jsonl",
                                        self.events))
        reader.start()
        child = Child(key, attempt, proc, log_path, time.monotonic(), reader)
        if self.tty:
            from tqdm import tqdm

            child.bar = tqdm(total=None, desc=f"{key.id:<11}", unit="step", position=self._free_position(),
                             leave=False, file=self.out, dynamic_ncols=True)
        self.state.running[key] = child
        self.state.attempts[key] = attempt
        self.state.finished.pop(key, None)
        self.launched.append(key)
        self.say(f"[ddm] launched {key.id} (attempt {attempt}), log: {log_path}")

    def _drain_events(self) -> None:
        while True:
            try:
                key, ev = self.events.get_nowait()
            except queue.Empty:
                return
            child = self.state.running.get(key)
            if child is None:
                continue
            if isinstance(ev.get("step"), int):
                child.step = ev["step"]
            if isinstance(ev.get("total"), int):
                child.total = ev["total"]
            if child.bar is not None:
                if child.total is not None and child.bar.total != child.total:
                    child.bar.total = child.total  # not reset(): the rate stays steps per second since launch
                child.bar.n = child.step
                if isinstance(ev.get("loss"), (int, float)):
                    child.bar.set_postfix(loss=f"{ev['loss']:.4g}", refresh=False)
                child.bar.refresh()

    def _reap(self) -> bool:
        """Collect exited children; True when any exited."""
        changed = False
        for key, child in list(self.state.running.items()):
            code = child.proc.poll()
            if code is None:
                continue
            child.reader.join(timeout=5)
            self._drain_events()
            if child.bar is not None:
                child.bar.close()
            del self.state.running[key]
            changed = True
            took = time.monotonic() - child.started
            if code < 0:  # killed by a signal: report it the shell's way (128 + n), which counts as retryable
                code = 128 - code
            tail = _tail(child.log_path)
            message = next((ln for ln in reversed(tail) if "error" in ln.lower()), tail[-1] if tail else "")
            self.state.finished[key] = Finished(child.attempt, code, time.time(), message.strip()[:300])
            if code == 0:
                self.say(f"[ddm] {key.id} finished in {took:.0f}s")
            elif not self.interrupted:
                kind = "retryable" if is_retryable(code) else "permanent"
                self.say(f"[ddm] {key.id} failed with exit code {code} ({kind}) after {took:.0f}s; "
                         f"last lines of {child.log_path}:")
                for ln in tail:
                    self.say("    " + ln)
        return changed

    # -- stopping --------------------------------------------------------------------------------------------
    def _signal_children(self, sig: int) -> None:
        for child in self.state.running.values():
            try:
                os.killpg(child.proc.pid, sig)  # the child's whole session (torchrun and its workers)
            except ProcessLookupError:
                pass

    def _stop_children(self, keys: list[StageKey] | None = None) -> None:
        targets = [c for k, c in self.state.running.items() if keys is None or k in keys]
        for child in targets:
            try:
                os.killpg(child.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # second Ctrl-C: stop waiting
            self._signal_children(signal.SIGKILL)
            return
        self.interrupted = True
        self.say("[ddm] interrupted: asking running stages to checkpoint and stop (Ctrl-C again to kill)")
        self._signal_children(signal.SIGTERM)

    def _wait_children(self) -> None:
        grace = max((grace_period_seconds(self.spec, key) for key in self.state.running), default=0)
        deadline = time.monotonic() + grace
        while self.state.running and time.monotonic() < deadline:
            self._drain_events()
            self._reap()
            time.sleep(POLL_S)
        if self.state.running:
            self._signal_children(signal.SIGKILL)
            while self.state.running:
                self._reap()
                time.sleep(POLL_S)

    # -- the loop --------------------------------------------------------------------------------------------
    def step(self) -> Plan:
        """One observe -> plan -> act round."""
        now = time.time()
        plan = planner.plan(self.spec, observe(self.spec, self.store, self.state, now))
        for action in plan.actions:
            if isinstance(action, (planner.Launch, planner.Retry)):
                if len(self.state.running) >= self.parallel:
                    continue  # planned again next round, when a slot frees
                if action.key not in self.state.running:
                    self.launch(action.key, action.attempt)
            elif isinstance(action, (planner.Cancel, planner.Suspend)):
                self._stop_children([action.key])
            # Unsuspend: local children are never suspended in place; a stopped one is relaunched as ABSENT.
        return plan

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "spec.yaml").write_text(self.spec_path.read_text())
        self.say(f"[ddm] run {self.name}: store {self.run_uri}, logs {self.logs}, up to {self.parallel} at once")
        warning = oversubscription(os.environ.get("OMP_NUM_THREADS"), self.parallel, os.cpu_count() or 1)
        if warning:
            self.say(f"[ddm] warning: {warning}")
        # Ctrl-C, and a plain `kill`: children live in their own sessions, so only we can stop them.
        previous = {sig: signal.signal(sig, self._on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
        started = time.monotonic()
        try:
            plan = self.step()
            last_phase = plan.phase
            self.say(f"[ddm] phase {plan.phase}: {plan.message}")
            while not self.interrupted:
                if not self.state.running and plan.terminal:
                    break
                if not self.state.running and plan.phase == "Suspended":
                    break
                if not self.state.running and not plan.launches and not plan.waiting:
                    break  # nothing runs, nothing to start: the planner has nothing more to give
                time.sleep(POLL_S if plan.requeue_after is None else min(POLL_S, max(plan.requeue_after, 0.05)))
                self._drain_events()
                changed = self._reap()
                if changed or not self.state.running or plan.waiting:
                    plan = self.step()
                    if plan.phase != last_phase:
                        self.say(f"[ddm] phase {plan.phase}: {plan.message}")
                        last_phase = plan.phase
            if self.interrupted:
                self._wait_children()
                self.say(f"[ddm] stopped; nothing finished is lost. Resume with: ddm run {self.spec_path}"
                         + (f" --run-dir {self.run_dir}" if self.run_dir != self._default_dir() else ""))
                return INTERRUPTED
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.state.running:  # an unexpected exception: never leave orphans behind
                self._signal_children(signal.SIGTERM)
                self._wait_children()
        took = time.monotonic() - started
        self.say(f"[ddm] {plan.phase} after {took:.0f}s: {plan.message}")
        self._write_report()
        if plan.phase in ("Succeeded", "Degraded"):
            return 0
        return 1

    def _default_dir(self) -> Path:
        return default_run_dir(self.spec, self.name, Path.cwd())

    def _write_report(self) -> None:
        from .report import write_report

        try:
            path = write_report(self.store, self.run_dir, title=f"DDM run {self.name}")
            self.say(f"[ddm] report: {path}")
        except Exception as e:  # a report problem must not turn a finished run into a failure
            self.say(f"[ddm] could not write the report: {type(e).__name__}: {e}")


def oversubscription(omp_threads: str | None, parallel: int, cpus: int) -> str | None:
    """A warning when the user's OMP_NUM_THREADS, given to every stage, asks for more threads than the machine
    has cores while up to ``parallel`` stages run at once (unset, each stage gets ``cpus // parallel``). OpenMP
    threads spin at their barriers: oversubscribed, CPU training ran ~50x slower (8 against 433 images/s, DiT-T/4,
    2 stages of 2 threads on 2 cores)."""
    try:
        threads = int(omp_threads or 0)
    except ValueError:
        return None
    if parallel < 2 or threads < 1 or threads * parallel <= cpus:
        return None
    return (f"OMP_NUM_THREADS={threads} for each of up to {parallel} stages at once asks for {threads * parallel} "
            f"threads on {cpus} cores; CPU stages can run many times slower. Unset it (each stage then gets "
            f"{stage_threads(cpus, parallel)}) or lower --parallel")


def stage_threads(cpus: int, parallel: int) -> int:
    """Each stage's share of the cores when up to ``parallel`` run at once (its OMP_NUM_THREADS, unless set)."""
    return max(cpus // parallel, 1)
