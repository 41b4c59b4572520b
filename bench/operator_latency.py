"""Operator latency under load: N DecentralizedDiffusions of K experts at once on a real local control plane.

The bench plays the training operator (no kubelet): it marks each stage's PyTorchJobs Succeeded and measures how long
the DDM operator takes to create the next stage's jobs (all of them), from the moment the last job of the previous
stage was marked. Also: API requests per DDM (the apiserver's apiserver_request_total for the resources the operator
touches, minus the bench's own requests) and the operator's peak RSS.

    python bench/operator_latency.py [--ddms 20] [--experts 8] [--interval 5]

Writes bench/results/operator_latency.json: records {"metric","value","unit","reference","ratio","command",
"machine","date"}. Needs the test control plane binaries (scripts/testenv-build.sh, built on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GROUP, VERSION, PLURAL = "ddm.io", "v1alpha1", "decentralizeddiffusions"
JOBS = ("kubeflow.org", "v1")
NAMESPACE = "bench"
RESOURCES = ("decentralizeddiffusions", "pytorchjobs", "configmaps", "events")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def request_total(plane: Any) -> float:
    """Sum of apiserver_request_total over the resources the operator uses (all verbs, all codes)."""
    context = ssl.create_default_context(cafile=str(plane.ca_path))
    context.load_cert_chain(str(plane._admin_cert[0]), str(plane._admin_cert[1]))
    with urllib.request.urlopen(f"{plane.server}/metrics", context=context, timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            resource = re.search(r'resource="([^"]*)"', line)
            if resource and resource.group(1) in RESOURCES:
                total += float(line.rsplit(" ", 1)[1])
    return total


class JobWatch(threading.Thread):
    """Records the first time each PyTorchJob name is seen (ADDED), from one watch over the namespace."""

    def __init__(self, api_client: Any) -> None:
        super().__init__(daemon=True)
        self.api_client = api_client
        self.seen: dict[str, float] = {}
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
                    name = event["object"]["metadata"]["name"]
                    with self.lock:
                        self.seen.setdefault(name, time.monotonic())
                    if self.stopped:
                        w.stop()
                        break
            except Exception:  # the control plane stopping under us at the end, or a dropped watch: re-watch
                time.sleep(0.2)

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(n in self.seen for n in names):
                    return
            time.sleep(0.05)
        missing = [n for n in names if n not in self.seen]
        raise TimeoutError(f"jobs not created within {timeout}s: {missing[:5]} (+{max(len(missing) - 5, 0)})")


def spec(k: int, tmp: str) -> dict[str, Any]:
    return {
        "dataset": {"uri": "file:///data/bench", "imageSize": 32},
        "clustering": {"numClusters": k, "fineClusters": 8 * k},
        "experts": {"modelPreset": "DiT-S/2", "steps": 1000, "gpusPerNode": 1},
        "storage": {"uri": f"file://{tmp}/runs"},
        "trainerImage": "ddm-trainer:bench",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddms", type=int, default=20)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--interval", type=float, default=5.0, help="operator timer interval (s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator_latency.json")
    args = parser.parse_args()

    from fixtures.k8s import start_control_plane
    from kubernetes import client

    from ddm_operator.api.crd import render_crd

    work = Path(tempfile.mkdtemp(prefix="ddm-bench-"))
    plane = start_control_plane("bench", work)
    operator: subprocess.Popen[bytes] | None = None
    watcher: Any = argparse.Namespace(stopped=False)
    try:
        plane.apply_yaml(render_crd())
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/decentralizeddiffusions.ddm.io")
        api = plane.api_client()
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        watcher = JobWatch(plane.api_client())
        watcher.start()
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "DDM_RECONCILE_INTERVAL_S": str(args.interval)}
        log = (work / "operator.log").open("wb")
        operator = subprocess.Popen(
            [str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "-m", "ddm_operator.k8s.handlers",
             "--namespace", NAMESPACE], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        time.sleep(3)
        before = request_total(plane)
        own = 0  # the bench's own requests to the counted resources (creates, status patches)
        names = [f"d{i:02d}" for i in range(args.ddms)]
        started = time.monotonic()
        for name in names:
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "DecentralizedDiffusion",
                "metadata": {"name": name}, "spec": spec(args.experts, str(work))})
            own += 1
        watcher.wait([f"{n}-cluster-a1" for n in names], 120)
        first_launch = [watcher.seen[f"{n}-cluster-a1"] - started for n in names]

        def succeed(job: str) -> None:
            nonlocal own
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            conds = [{"type": t, "status": "True", "reason": t, "message": "", "lastTransitionTime": now}
                     for t in ("Created", "Running", "Succeeded")]
            custom.patch_namespaced_custom_object_status(*JOBS, NAMESPACE, "pytorchjobs", job, {"status": {"conditions": conds}})
            own += 1

        latencies: dict[str, list[float]] = {"cluster->experts+router": [], "experts+router->evaluate": []}
        stages = [
            ("cluster->experts+router", lambda n: [f"{n}-cluster-a1"],
             lambda n: [f"{n}-expert-{k:03d}-a1" for k in range(args.experts)] + [f"{n}-router-a1"]),
            ("experts+router->evaluate",
             lambda n: [f"{n}-expert-{k:03d}-a1" for k in range(args.experts)] + [f"{n}-router-a1"],
             lambda n: [f"{n}-evaluate-a1"]),
        ]
        for label, done, following in stages:
            marked: dict[str, float] = {}
            for n in names:  # all DDMs at once: every stage boundary of every DDM lands together
                for job in done(n):
                    succeed(job)
                marked[n] = time.monotonic()
            watcher.wait([j for n in names for j in following(n)], 300)
            for n in names:
                latencies[label].append(max(watcher.seen[j] for j in following(n)) - marked[n])
        for n in names:
            succeed(f"{n}-evaluate-a1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            phases = [custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, n).get("status", {}).get("phase")
                      for n in names]
            if all(p == "Succeeded" for p in phases):
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"not all DDMs Succeeded: {phases}")
        elapsed = time.monotonic() - started
        after = request_total(plane)
        rss_kib = 0
        for line in Path(f"/proc/{operator.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss_kib = int(line.split()[1])
    finally:
        watcher.stopped = True
        if operator is not None and operator.poll() is None:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=20)
        plane.stop()

    all_lat = [v for vs in latencies.values() for v in vs]
    command = "python bench/operator_latency.py " + " ".join(sys.argv[1:])
    machine = f"{platform.node()} {os.cpu_count()} CPU (shared), {platform.system()} {platform.release()}"
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def record(metric: str, value: float, unit: str, reference: float | None = None) -> dict[str, Any]:
        return {"metric": metric, "value": round(value, 4), "unit": unit, "reference": reference,
                "ratio": round(value / reference, 4) if reference else None, "command": command,
                "machine": machine, "date": date}

    per_ddm = (after - before - own) / args.ddms
    records = [
        record("stage_transition_latency_p50", statistics.median(all_lat), "s"),
        record("stage_transition_latency_p99", percentile(all_lat, 99), "s"),
        *[record(f"stage_transition_latency_p50[{k}]", statistics.median(v), "s") for k, v in latencies.items()],
        *[record(f"stage_transition_latency_p99[{k}]", percentile(v, 99), "s") for k, v in latencies.items()],
        record("first_launch_latency_p50", statistics.median(first_launch), "s"),
        record("api_requests_per_ddm", per_ddm, "requests"),
        record("operator_peak_rss", rss_kib / 1024, "MiB"),
        record("run_wall_time", elapsed, "s"),
        record("ddms", args.ddms, "count"),
        record("experts_per_ddm", args.experts, "count"),
        record("timer_interval", args.interval, "s"),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    for r in records:
        print(f"{r['metric']:48s} {r['value']:>10} {r['unit']}")


if __name__ == "__main__":
    main()
