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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube import (CLAIM, GROUP, JOBS, OPERATOR_USER, PLURAL, VERSION, JobWatch, OperatorProcess, operator_requests,
                  operator_source, percentile, shared_volume, start_planes)

NAMESPACE = "bench"


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes import client

    work = Path(tempfile.mkdtemp(prefix="ddm-bench-"))
    (plane,) = start_planes(["bench"], work)
    operator: OperatorProcess | None = None
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
        shared_volume(core, NAMESPACE)
        watcher = JobWatch(plane.api_client(), NAMESPACE)
        watcher.start()
        env = dict(src_env)
        if args.interval is not None:
            env["DDM_RECONCILE_INTERVAL_S"] = f"{args.interval:g}"
        operator = OperatorProcess(plane.user_kubeconfig(OPERATOR_USER, ["system:masters"]), NAMESPACE,
                                   work / "operator.log", env, verbose=args.verbose)
        operator.start()
        operator.wait_ready()
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
        operator.stop()
        rss_kib = operator.peak_rss_kib
    finally:
        watcher.stopped = True
        if operator is not None:
            operator.stop()
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
