"""What the operator benchmarks share: the DDM operator as a process on the test environment's control planes
(tests/fixtures/k8s.py), its own API requests from the audit log, a watch that timestamps PyTorchJobs, the shared
volume a file:// run store needs, percentiles. Used by operator_latency.py and fleet.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GROUP, VERSION, PLURAL = "ddm.io", "v1alpha1", "decentralizeddiffusions"
JOBS = ("kubeflow.org", "v1")
OPERATOR_USER = "ddm-bench-operator"  # the operator's client certificate: the audit log counts its requests alone
CLAIM = "bench-runs"  # a ReadWriteMany claim bound to a hostPath volume: the run store the stages would share


def shared_volume(core: Any, namespace: str) -> None:
    """The PersistentVolume and the claim bound to it that spec.storage.volumeClaim names (kwok pods mount nothing,
    but the scheduler binds a pod only once its claim is Bound)."""
    access = ["ReadWriteMany"]
    core.create_persistent_volume({"metadata": {"name": f"{namespace}-{CLAIM}"}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": access, "hostPath": {"path": "/tmp/ddm-bench-runs"},
        "storageClassName": "", "claimRef": {"namespace": namespace, "name": CLAIM}}})
    core.create_namespaced_persistent_volume_claim(namespace, {"metadata": {"name": CLAIM}, "spec": {
        "accessModes": access, "storageClassName": "", "volumeName": f"{namespace}-{CLAIM}",
        "resources": {"requests": {"storage": "1Gi"}}}})
    deadline = time.monotonic() + 60
    while core.read_namespaced_persistent_volume_claim(CLAIM, namespace).status.phase != "Bound":
        if time.monotonic() > deadline:
            raise TimeoutError(f"claim {CLAIM} not Bound after 60 s")
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def audit_policy_with_operator(plane: Any) -> Path:
    """The fixture's audit policy (writes to PyTorchJobs) plus every request of OPERATOR_USER at Metadata level."""
    path = plane.workdir / "audit-policy.json"
    path.write_text(json.dumps({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": [OPERATOR_USER]},
                  {"level": "Request", "verbs": ["create", "update", "patch"],
                   "resources": [{"group": "kubeflow.org", "resources": ["pytorchjobs"]}]},
                  {"level": "None"}],
    }))
    return path


def start_planes(names: list[str], work: Path) -> list[Any]:
    """Control planes (tests/fixtures/k8s.py) whose audit logs also record every request of OPERATOR_USER."""
    from fixtures import k8s as fixtures

    fixtures.ControlPlane._write_audit_policy = audit_policy_with_operator  # type: ignore[method-assign]
    planes: list[Any] = []
    try:
        for name in names:
            planes.append(fixtures.start_control_plane(name, work / name))
    except BaseException:
        for plane in planes:
            plane.stop()
        raise
    return planes


def operator_requests(plane: Any) -> dict[str, int]:
    """The operator's API requests so far by verb (one per audit ID: a watch logs ResponseStarted and Complete)."""
    verbs: dict[str, str] = {}
    for event in plane.audit_events():
        if event.get("user", {}).get("username") == OPERATOR_USER:
            verbs[event["auditID"]] = event["verb"]
    out: dict[str, int] = {}
    for verb in verbs.values():
        out[verb] = out.get(verb, 0) + 1
    return out


def operator_requests_by_resource(plane: Any) -> dict[str, int]:
    """The operator's API requests so far by "verb resource[/subresource]" (e.g. "patch decentralizeddiffusions/status")."""
    seen: dict[str, str] = {}
    for event in plane.audit_events():
        if event.get("user", {}).get("username") == OPERATOR_USER:
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            seen[event["auditID"]] = f"{event['verb']} {resource}"
    out: dict[str, int] = {}
    for what in seen.values():
        out[what] = out.get(what, 0) + 1
    return out


class JobWatch(threading.Thread):
    """From one watch over a namespace: when each PyTorchJob was first seen, and first seen Succeeded."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api_client = api_client
        self.namespace = namespace
        self.seen: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopped = False

    def run(self) -> None:
        from kubernetes import client, watch

        custom = client.CustomObjectsApi(self.api_client)
        while not self.stopped:
            w = watch.Watch()
            try:
                for event in w.stream(custom.list_namespaced_custom_object, *JOBS, self.namespace, "pytorchjobs",
                                      timeout_seconds=60):
                    now = time.monotonic()
                    job = event["object"]
                    name = job["metadata"]["name"]
                    done = any(c.get("type") == "Succeeded" and c.get("status") == "True"
                               for c in (job.get("status") or {}).get("conditions") or [])
                    with self.lock:
                        self.seen.setdefault(name, now)
                        if done:
                            self.succeeded.setdefault(name, now)
                    if self.stopped:
                        w.stop()
                        break
            except Exception:  # the control plane stopping under us at the end, or a dropped watch: re-watch
                time.sleep(0.2)

    def wait(self, names: list[str], timeout: float, table: str = "seen") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(n in getattr(self, table) for n in names):
                    return
            time.sleep(0.05)
        missing = [n for n in names if n not in getattr(self, table)]
        raise TimeoutError(f"jobs not {table} within {timeout}s: {missing[:5]} (+{max(len(missing) - 5, 0)})")


def operator_source(rev: str | None, work: Path) -> tuple[dict[str, str], str]:
    """(extra environment, CRD text) of the operator at ``rev`` (None: this working tree)."""
    if rev is None:
        from ddm_operator.api.crd import render_crd

        return {}, render_crd()
    src = work / f"src-{rev}"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "operator", "trainer"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    env = {"PYTHONPATH": f"{src / 'operator'}{os.pathsep}{src / 'trainer'}"}
    crd = subprocess.run([sys.executable, "-c", "from ddm_operator.api.crd import render_crd; print(render_crd())"],
                         check=True, capture_output=True, text=True, env={**os.environ, **env}, cwd=src).stdout
    return env, crd


def _peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class OperatorProcess:
    """``kopf run --standalone -m ddm_operator.k8s.handlers`` for one namespace, in its own process group, with a
    liveness endpoint; ``kill()`` is SIGKILL (a crashed pod), ``start()`` again is its restart. ``peak_rss_kib``:
    the highest VmHWM of any of its runs (sampled every second, and before each kill)."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, env: dict[str, str] | None = None,
                 verbose: bool = False) -> None:
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.env = dict(env or {})
        self.verbose = verbose
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.peak_rss_kib = 0
        self.liveness = ""
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.liveness = f"http://127.0.0.1:{port}/healthz"
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "-m", "ddm_operator.k8s.handlers",
                 "--namespace", self.namespace, f"--liveness={self.liveness}", *(["--verbose"] if self.verbose else [])],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.log_path.parent)
        self.starts += 1

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds until kopf's liveness endpoint answers (startup done, watches starting)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}; log {self.log_path}")
            try:
                with urllib.request.urlopen(self.liveness, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"operator not live after {timeout:.0f} s; log {self.log_path}")

    def _sample(self) -> None:
        while True:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                self.peak_rss_kib = max(self.peak_rss_kib, _peak_rss_kib(proc.pid))
            time.sleep(1.0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_rss_kib = max(self.peak_rss_kib, _peak_rss_kib(self.proc.pid))
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_rss_kib = max(self.peak_rss_kib, _peak_rss_kib(self.proc.pid))
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
