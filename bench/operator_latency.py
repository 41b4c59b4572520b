"""Operator latency under load: N DecentralizedDiffusions of K experts at once on a real local control plane.

Two environments. Default: a bare control plane; the bench plays the training operator (no kubelet): it marks each
stage's PyTorchJobs Succeeded. ``--fleet``: the test environment's fleet plane (kube-scheduler, kwok GPU nodes and
the real Kubeflow training operator, tests/fixtures/k8s.py): pods run for ``--run-ms`` on the simulated nodes and the
training operator writes the jobs' conditions. Either way the latency of a stage transition is the time from the
moment the last job of a stage is Succeeded (the bench's mark, or the Succeeded condition as its own watch sees it)
until the DDM operator has created the next stage's jobs (all of them). Also: the DDM operator's own API requests
per DDM (from the API server's audit log of that one user, every verb, watches included) and its peak RSS.

    python bench/operator_latency.py [--fleet] [--ddms 20] [--experts 8] [--interval S] [--operator-rev REV]

``--operator-rev REV`` runs the operator (and its CRD) as committed at REV (git archive into a temporary directory),
e.g. the timer-based one before issue 13 for a before/after in one session. Results go through bench/common.py's
record() into bench/results/operator_latency.json, one metric name per environment and operator. Needs the test
control plane binaries (scripts/testenv-build.sh, built on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

GROUP, VERSION, PLURAL = "ddm.io", "v1alpha1", "decentralizeddiffusions"
JOBS = ("kubeflow.org", "v1")
NAMESPACE = "bench"
OPERATOR_USER = "ddm-bench-operator"  # the operator's client certificate: the audit log counts its requests alone
CLAIM = "bench-runs"  # a ReadWriteMany claim bound to a hostPath volume: the run store the stages would share


def shared_volume(core: Any) -> None:
    """The PersistentVolume and the claim bound to it that spec.storage.volumeClaim names (kwok pods mount nothing,
    but the scheduler binds a pod only once its claim is Bound)."""
    access = ["ReadWriteMany"]
    core.create_persistent_volume({"metadata": {"name": f"{NAMESPACE}-{CLAIM}"}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": access, "hostPath": {"path": "/tmp/ddm-bench-runs"},
        "storageClassName": "", "claimRef": {"namespace": NAMESPACE, "name": CLAIM}}})
    core.create_namespaced_persistent_volume_claim(NAMESPACE, {"metadata": {"name": CLAIM}, "spec": {
        "accessModes": access, "storageClassName": "", "volumeName": f"{NAMESPACE}-{CLAIM}",
        "resources": {"requests": {"storage": "1Gi"}}}})
    deadline = time.monotonic() + 60
    while core.read_namespaced_persistent_volume_claim(CLAIM, NAMESPACE).status.phase != "Bound":
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


class JobWatch(threading.Thread):
    """From one watch over the namespace: when each PyTorchJob was first seen, and first seen Succeeded."""

    def __init__(self, api_client: Any) -> None:
        super().__init__(daemon=True)
        self.api_client = api_client
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
                for event in w.stream(custom.list_namespaced_custom_object, *JOBS, NAMESPACE, "pytorchjobs",
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


def spec(k: int, tmp: str, fleet: bool, run_ms: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dataset": {"uri": "file:///data/bench", "imageSize": 32},
        "clustering": {"numClusters": k, "fineClusters": 8 * k},
        "experts": {"modelPreset": "DiT-S/2", "steps": 1000, "gpusPerNode": 1},
        "storage": {"uri": "file:///mnt/ddm", "volumeClaim": CLAIM},  # a path on one node needs a shared volume
        "trainerImage": "ddm-trainer:bench",
    }
    if fleet:  # every stage's pod runs run_ms on a kwok GPU node, then exits 0
        from fixtures.k8s import RUN_MS_ANNOTATION

        placement = {"nodeSelector": {"pool": "gpu"}, "podAnnotations": {RUN_MS_ANNOTATION: str(run_ms)}}
        for section in ("experts", "router", "evaluation"):
            out.setdefault(section, {})["placement"] = placement
    return out


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fixtures import k8s as fixtures
    from kubernetes import client

    work = Path(tempfile.mkdtemp(prefix="ddm-bench-"))
    fixtures.ControlPlane._write_audit_policy = audit_policy_with_operator  # type: ignore[method-assign]
    plane = fixtures.start_control_plane("bench", work)
    operator: subprocess.Popen[bytes] | None = None
    watcher: Any = argparse.Namespace(stopped=False)
    try:
        if args.fleet:
            plane.start_fleet()
            plane.add_gpu_nodes("gpu", -(-args.ddms * (args.experts + 1) // 8) + 1)  # every stage at once, 8 GPUs each
        src_env, crd = operator_source(args.operator_rev, work)
        plane.apply_yaml(crd)
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/decentralizeddiffusions.ddm.io")
        api = plane.api_client()
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        shared_volume(core)
        watcher = JobWatch(plane.api_client())
        watcher.start()
        env = {**os.environ, **src_env, "KUBECONFIG": str(plane.user_kubeconfig(OPERATOR_USER, ["system:masters"]))}
        if args.interval is not None:
            env["DDM_RECONCILE_INTERVAL_S"] = f"{args.interval:g}"
        log = (work / "operator.log").open("wb")
        operator = subprocess.Popen(
            [str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "-m", "ddm_operator.k8s.handlers",
             "--namespace", NAMESPACE, *(["--verbose"] if args.verbose else [])], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            cwd=work)
        time.sleep(3)
        names = [f"d{i:02d}" for i in range(args.ddms)]
        started = time.monotonic()
        for name in names:
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "DecentralizedDiffusion",
                "metadata": {"name": name}, "spec": spec(args.experts, str(work), args.fleet, args.run_ms)})
        try:
            watcher.wait([f"{n}-cluster-a1" for n in names], 120)
        except TimeoutError:
            status = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, names[0]).get("status")
            raise TimeoutError(f"no first stage; {names[0]} status: {status}") from None
        first_launch = [watcher.seen[f"{n}-cluster-a1"] - started for n in names]

        def succeed(job: str) -> None:  # plays the training operator (bare plane only)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            conds = [{"type": t, "status": "True", "reason": t, "message": "", "lastTransitionTime": now}
                     for t in ("Created", "Running", "Succeeded")]
            custom.patch_namespaced_custom_object_status(*JOBS, NAMESPACE, "pytorchjobs", job, {"status": {"conditions": conds}})

        latencies: dict[str, list[float]] = {"cluster->experts+router": [], "experts+router->evaluate": []}
        stages = [
            ("cluster->experts+router", lambda n: [f"{n}-cluster-a1"],
             lambda n: [f"{n}-expert-{k:03d}-a1" for k in range(args.experts)] + [f"{n}-router-a1"]),
            ("experts+router->evaluate",
             lambda n: [f"{n}-expert-{k:03d}-a1" for k in range(args.experts)] + [f"{n}-router-a1"],
             lambda n: [f"{n}-evaluate-a1"]),
        ]
        for label, done, following in stages:
            if not args.fleet:
                for n in names:  # all DDMs at once: every stage boundary of every DDM lands together
                    for job in done(n):
                        succeed(job)
            watcher.wait([j for n in names for j in done(n)], 300, "succeeded")
            watcher.wait([j for n in names for j in following(n)], 300)
            for n in names:
                finished = max(watcher.succeeded[j] for j in done(n))
                latencies[label].append(max(watcher.seen[j] for j in following(n)) - finished)
        if not args.fleet:
            for n in names:
                succeed(f"{n}-evaluate-a1")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            phases = [custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, n).get("status", {}).get("phase")
                      for n in names]
            if all(p == "Succeeded" for p in phases):
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"not all DDMs Succeeded: {phases}")
        elapsed = time.monotonic() - started
        busy = operator_requests(plane)
        time.sleep(args.idle)  # all finished: what the operator still asks the API server while nothing happens
        requests = operator_requests(plane)
        idle = sum(requests.values()) - sum(busy.values())
        rss_kib = 0
        for line in Path(f"/proc/{operator.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss_kib = int(line.split()[1])
    finally:
        watcher.stopped = True
        if operator is not None and operator.poll() is None:
            os.killpg(operator.pid, 15)
            operator.wait(timeout=20)
        plane.stop()
    return {"latencies": latencies, "first_launch": first_launch, "requests": requests, "rss_kib": rss_kib,
            "elapsed": elapsed, "idle_requests": idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddms", type=int, default=20)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--fleet", action="store_true", help="real training operator, scheduler and kwok GPU nodes")
    parser.add_argument("--run-ms", type=int, default=2000, help="--fleet: how long each stage's pod runs")
    parser.add_argument("--interval", type=float, default=None,
                        help="DDM_RECONCILE_INTERVAL_S of the operator (default: its own default)")
    parser.add_argument("--operator-rev", default=None, help="run the operator as committed at this git revision")
    parser.add_argument("--idle", type=float, default=20.0,
                        help="seconds after all finished, counted in the requests (and alone, per minute)")
    parser.add_argument("--verbose", action="store_true", help="the operator's debug log (operator.log in its work dir)")
    args = parser.parse_args()

    from common import record

    out = run(args)
    latencies = out["latencies"]
    all_lat = [v for vs in latencies.values() for v in vs]
    tag = f"{'fleet' if args.fleet else 'bare'}, {args.ddms}x{args.experts}, operator {args.operator_rev or 'this tree'}"
    total_requests = sum(out["requests"].values())

    def rec(metric: str, value: float, unit: str) -> None:
        record("operator_latency", f"{metric}[{tag}]", round(value, 4), unit)

    rec("stage_transition_latency_p50", statistics.median(all_lat), "s")
    rec("stage_transition_latency_p99", percentile(all_lat, 99), "s")
    for k, v in latencies.items():
        rec(f"stage_transition_latency_p50/{k}", statistics.median(v), "s")
        rec(f"stage_transition_latency_p99/{k}", percentile(v, 99), "s")
    rec("first_launch_latency_p50", statistics.median(out["first_launch"]), "s")
    rec("operator_api_requests_per_ddm", total_requests / args.ddms, "requests")
    for verb, count in sorted(out["requests"].items()):
        rec(f"operator_api_requests_per_ddm/{verb}", count / args.ddms, "requests")
    if args.idle > 0:
        rec("operator_api_requests_per_finished_ddm_per_minute", out["idle_requests"] / args.ddms * 60 / args.idle,
            "requests")
    rec("operator_peak_rss", out["rss_kib"] / 1024, "MiB")
    rec("run_wall_time", out["elapsed"], "s")


if __name__ == "__main__":
    main()
