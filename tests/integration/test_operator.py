"""The operator against a real control plane: `kopf run` as a subprocess, as the chart's least-privilege ServiceAccount.

No kubelet runs pods here, so most tests play the training operator as its source says it behaves: they patch
PyTorchJob status (Running, Succeeded, Failed with the controller's own message) and leave the failed pod with its
container's exit code, and check what the DDM operator does next (tests/integration/test_training_operator.py runs the
real training operator, scheduler and kwok). The last test runs the jobs for
real (``JobExecutor``): each PyTorchJob's container command, config and Secret env as a local process, training a
tiny DDM into the real S3 server.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.k8s import helm_binary, inline_kubeconfig

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ddm-operator"
GROUP, VERSION, PLURAL = "ddm.io", "v1alpha1", "decentralizeddiffusions"
JOBS = ("kubeflow.org", "v1")
WAIT_S = 60.0


# ---------------------------------------------------------------- helpers


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def chart_account(namespace: str) -> tuple[str, str]:
    """(release, ServiceAccount name) of a test install for one namespace: a release name without the chart's name
    makes the chart's fullname ``<release>-ddm-operator``, so each namespace's cluster-scoped objects (the framework
    ClusterRole and its binding) are its own."""
    release = f"ddm-{namespace}"
    return release, f"{release}-ddm-operator"


def render_rbac(namespace: str, release: str, values: tuple[str, ...] = ()) -> str:
    """The chart's RBAC for a single-namespace install: `helm template` when helm exists, else the kept rendering
    (of the default values: other ``values``, ``key=value`` for --set, need helm)."""
    helm = helm_binary()
    if helm is None and values:
        pytest.skip(f"rendering the chart with {values} needs helm (scripts/testenv-build.sh --helm)")
    shows = ["serviceaccount", "clusterrole-framework", "clusterrolebinding-framework", "role-application",
             "rolebinding-application"]
    if helm is not None:
        args = [helm, "template", release, str(CHART), "--kube-version", "1.37.2", "--namespace", namespace, "--set", f"watchNamespaces={{{namespace}}}"]
        args += [a for s in shows for a in ("--show-only", f"templates/{s}.yaml")]
        args += [a for v in values for a in ("--set", v)]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout
    text = (CHART / "rbac-rendered.yaml").read_text()
    return text.replace("ddm-system", namespace).replace("ddm-operator", chart_account(namespace)[1])


def chart_operator_command(namespace: str, port: int, interval_s: float, extra_args: tuple[str, ...] = ()
                           ) -> tuple[list[str], dict[str, str]]:
    """The operator's command line and env exactly as the chart's Deployment runs them (when helm is built);
    ``interval_s`` is both its safety-net and its remote-cluster re-plan interval."""
    helm = helm_binary()
    if helm is None:
        return ([str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "-m", "ddm_operator.k8s.handlers",
                 f"--namespace={namespace}", f"--liveness=http://127.0.0.1:{port}/healthz", *extra_args],
                {"DDM_RECONCILE_INTERVAL_S": f"{interval_s:g}", "DDM_REMOTE_INTERVAL_S": f"{interval_s:g}"})
    rendered = subprocess.run(
        [helm, "template", "ddm-operator", str(CHART), "--kube-version", "1.37.2", "--namespace", namespace,
         "--set", f"watchNamespaces={{{namespace}}}", "--set", f"livenessProbe.port={port}",
         "--set-json", 'allowedTrainerImages=["ddm-trainer:test"]',  # the image these tests' DDMs name
         "--set-string", f"reconcileIntervalSeconds={interval_s:g}",
         "--set-string", f"remoteReconcileIntervalSeconds={interval_s:g}",
         "--set-json", f"extraArgs={json.dumps(list(extra_args))}", "--show-only", "templates/deployment.yaml"],
        check=True, capture_output=True, text=True).stdout
    container = yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"][0]
    command = [str(Path(sys.executable).parent / container["command"][0]), *container.get("args", [])]
    return command, {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


class Operator:
    """The operator as the chart's Deployment runs it, in its own process group; kill() is SIGKILL (a node crash)."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, interval_s: float = 1.0,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.namespace, self.log_path, self.interval_s = kubeconfig, namespace, log_path, interval_s
        self.extra_args = extra_args
        self.env = dict(env or {})  # settings of the operator's own (DDM_*), over the chart's
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.liveness = ""

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.liveness = f"http://127.0.0.1:{port}/healthz"
        # No store credentials of its own: the operator must read a run's store with the run's credentials Secret.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DDM_S3"))}
        command, chart_env = chart_operator_command(self.namespace, port, self.interval_s, self.extra_args)
        env.update(chart_env, **self.env, KUBECONFIG=str(self.kubeconfig))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     cwd=ROOT)
        log.close()
        self.starts += 1

    def wait_ready(self, timeout: float = 60) -> None:
        """Until kopf's liveness endpoint answers: startup done, watches about to run."""
        import urllib.request

        def ok() -> bool:
            try:
                with urllib.request.urlopen(self.liveness, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(ok, "operator liveness", timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Harness:
    """Admin-side view of one namespace: the DDM, its PyTorchJobs, ConfigMaps and Events."""

    def __init__(self, plane: Any, namespace: str) -> None:
        from kubernetes import client

        self.plane, self.ns = plane, namespace
        self.api = plane.api_client()
        self.custom, self.core = client.CustomObjectsApi(self.api), client.CoreV1Api(self.api)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DecentralizedDiffusion",
                "metadata": {"name": name, "namespace": self.ns}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def ddm(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.ddm(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def jobs(self) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(*JOBS, self.ns, "pytorchjobs")["items"]
        return {j["metadata"]["name"]: j for j in items}

    def configmaps(self, selector: str) -> list[str]:
        return [c.metadata.name for c in self.core.list_namespaced_config_map(self.ns, label_selector=selector).items]

    def stage_config(self, job_name: str) -> dict[str, Any]:
        """The trainer config a job's pods read at /etc/ddm/config.yaml: its pod template's ddm.io/config."""
        job = self.custom.get_namespaced_custom_object(*JOBS, self.ns, "pytorchjobs", job_name)
        return yaml.safe_load(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["annotations"][
            "ddm.io/config"])

    def job_status(self, name: str, *conditions: tuple[str, str]) -> None:
        """Play the training operator: set the job's conditions ((type, message), ...)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conds = [{"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": m, "lastUpdateTime": now,
                  "lastTransitionTime": now} for t, m in conditions]
        replica = {"Master": {"active": 0 if conditions and conditions[-1][0] in ("Succeeded", "Failed") else 1}}
        self.custom.patch_namespaced_custom_object_status(
            *JOBS, self.ns, "pytorchjobs", name, {"status": {"conditions": conds, "replicaStatuses": replica}})

    def succeed(self, name: str) -> None:
        self.job_status(name, ("Created", ""), ("Running", ""), ("Succeeded", "PyTorchJob succeeded"))

    def fail(self, name: str, exit_code: int) -> None:
        """What the training operator v1.9.4 and kubelet leave behind when the Master's container exits non-zero
        under ``restartPolicy: Never``: the pod ``<job>-master-0`` (label training.kubeflow.org/job-name) whose
        container ``pytorch`` terminated with the code, and the job Failed with the controller's own message, which
        names no code (pkg/controller.v1/pytorch/pytorchjob_controller.go, UpdateJobStatus)."""
        pod = {"metadata": {"name": f"{name}-master-0", "labels": {"training.kubeflow.org/job-name": name,
                                                                    "training.kubeflow.org/replica-type": "master"}},
               "spec": {"containers": [{"name": "pytorch", "image": "ddm-trainer:test"}], "restartPolicy": "Never"}}
        self.core.create_namespaced_pod(self.ns, pod)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": exit_code, "reason": "Error", "startedAt": now, "finishedAt": now}
        self.core.patch_namespaced_pod_status(f"{name}-master-0", self.ns, {"status": {
            "phase": "Failed", "containerStatuses": [{"name": "pytorch", "image": "ddm-trainer:test", "imageID": "",
                                                      "ready": False, "restartCount": 0,
                                                      "state": {"terminated": terminated}}]}})
        self.job_status(name, ("Created", ""), ("Running", ""),
                        ("Failed", f"PyTorchJob {name} is failed because 1 Master replica(s) failed."))

    def events(self, name: str) -> list[str]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [f"{e.reason}: {e.message}" for e in items]

    def wait_jobs(self, *names: str) -> dict[str, dict[str, Any]]:
        return wait_for(lambda: (j := self.jobs()) and all(n in j for n in names) and j, f"jobs {names}")

    def wait_phase(self, name: str, phase: str, timeout: float = WAIT_S) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status(name)).get("phase") == phase and s, f"{name} phase {phase}", timeout)


def ddm_spec(k: int, tmp: Path, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"uri": "file:///data/fmnist", "imageSize": 28, "channels": 1},
        "clustering": {"numClusters": k, "fineClusters": 4 * k, "encoder": "efficientnet_lite0"},
        "experts": {"modelPreset": "DiT-T/4", "steps": 100, "gpusPerNode": 0},
        "storage": {"uri": f"file://{tmp}/runs"},
        "trainerImage": "ddm-trainer:test",
        "failurePolicy": {"backoffSeconds": 0},
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


@pytest.fixture(scope="session")
def ddm_crd(k8s_cluster: Any) -> None:
    """Our CRD from the models (the same text `ddm crd --write` puts in crds/), applied server-side."""
    from ddm_operator.api.crd import render_crd

    k8s_cluster.apply_yaml(render_crd())
    k8s_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/decentralizeddiffusions.ddm.io")


@pytest.fixture
def operator(k8s_cluster: Any, k8s_namespace: str, ddm_crd: None, tmp_path: Path) -> Iterator[Operator]:
    """The operator for one namespace, as the chart's ServiceAccount with the chart's RBAC (not an admin)."""
    release, account = chart_account(k8s_namespace)
    k8s_cluster.apply_yaml(render_rbac(k8s_namespace, release))
    kubeconfig = k8s_cluster.serviceaccount_kubeconfig(k8s_namespace, account)
    op = Operator(kubeconfig, k8s_namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    print(op.log())


@pytest.fixture
def h(k8s_cluster: Any, k8s_namespace: str) -> Iterator[Harness]:
    harness = Harness(k8s_cluster, k8s_namespace)
    yield harness
    harness.api.close()


# ---------------------------------------------------------------- tests


def test_full_sequence_k4_status_events_and_garbage_collection(operator: Operator, h: Harness, tmp_path: Path) -> None:
    h.create("seq", ddm_spec(4, tmp_path, distillation={"enabled": True, "steps": 10}))
    jobs = h.wait_jobs("seq-cluster-a1")
    job = jobs["seq-cluster-a1"]
    uid = h.ddm("seq")["metadata"]["uid"]  # type: ignore[index]
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    assert job["metadata"]["labels"]["ddm.io/stage"] == "cluster"
    assert h.stage_config("seq-cluster-a1")["num_clusters"] == 4  # the config travels in the job: no ConfigMap
    assert h.configmaps(f"ddm.io/uid={uid}") == []
    h.wait_phase("seq", "Clustering")

    h.succeed("seq-cluster-a1")
    experts = [f"seq-expert-{k:03d}-a1" for k in range(4)]
    h.wait_jobs(*experts, "seq-router-a1")
    status = h.wait_phase("seq", "Training")
    assert status["stages"]["clustering"]["phase"] == "Succeeded" and status["expertsTotal"] == 4

    # Progress: the trainer's report in the store shows up as step of total.
    progress = tmp_path / "runs" / h.ns / "seq" / "progress"
    progress.mkdir(parents=True)
    (progress / "expert-002.json").write_text('{"stage": "expert", "index": 2, "event": "progress", "step": 37, "total": 100}')
    h.job_status(experts[2], ("Created", ""), ("Running", ""))
    wait_for(lambda: h.status("seq")["experts"][2].get("step") == 37, "expert 2 progress 37/100")

    for name in experts[:3]:
        h.succeed(name)
    wait_for(lambda: h.status("seq").get("expertsReady") == 3, "3 experts ready")
    out = h.plane.kubectl("get", "ddm", "seq", "-n", h.ns).stdout
    assert re.search(r"seq\s+Training\s+3\s+4", out), out
    h.succeed(experts[3])
    h.succeed("seq-router-a1")
    h.wait_jobs("seq-evaluate-a1")
    h.wait_phase("seq", "Evaluating")
    # The evaluation's committed table (as the trainer writes it) becomes status results and the Best FID column.
    from ddm_trainer.store import FileStore

    table = [{"strategy": "full", "fid": 12.5, "kid_mean": 0.01, "nfe": 200.0, "gflops_per_sample": 9.0, "n": 100},
             {"strategy": "top1", "fid": 9.25, "kid_mean": 0.008, "nfe": 50.0, "gflops_per_sample": 3.0, "n": 100},
             {"strategy": "monolith", "fid": 7.0, "kid_mean": 0.005, "nfe": 50.0, "gflops_per_sample": 3.0, "n": 100}]
    FileStore(tmp_path / "runs" / h.ns / "seq").commit("evaluation", {"results.json": b"{}"}, {"table": table})
    h.succeed("seq-evaluate-a1")
    h.wait_jobs("seq-distill-a1")
    h.wait_phase("seq", "Distilling")
    assert "seq-evaluate-student-a1" not in h.jobs()  # the student's row waits for the student
    h.succeed("seq-distill-a1")
    # The evaluation again, adding the student's row to the committed table, once distillation Succeeded.
    student_job = h.wait_jobs("seq-evaluate-student-a1")["seq-evaluate-student-a1"]
    assert student_job["metadata"]["labels"]["ddm.io/stage"] == "evaluate-student"
    status = h.wait_phase("seq", "Evaluating")
    assert status["stages"]["distillation"]["phase"] == "Succeeded"
    assert status["stages"]["studentEvaluation"]["jobName"] == "seq-evaluate-student-a1"
    config = h.stage_config("seq-evaluate-student-a1")
    assert config["strategies"][-1] == "student" and config["progress"] == "evaluate-student"
    student = {"strategy": "student", "fid": 7.7, "kid_mean": 0.006, "nfe": 50.0, "gflops_per_sample": 3.0, "n": 100}
    FileStore(tmp_path / "runs" / h.ns / "seq").commit("evaluation", {"results.json": b"{}"},
                                                        {"table": [*table, student]})
    h.succeed("seq-evaluate-student-a1")
    status = h.wait_phase("seq", "Succeeded")
    assert status["expertsReady"] == 4 and status["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

    assert sorted(h.jobs()) == sorted(["seq-cluster-a1", *experts, "seq-router-a1", "seq-evaluate-a1", "seq-distill-a1",
                                       "seq-evaluate-student-a1"])
    events = "\n".join(h.events("seq"))
    for expected in ("clustering Running -> Succeeded", "expert 3 Running -> Succeeded", "phase Training -> Evaluating",
                     "phase Distilling -> Evaluating", "student evaluation Pending -> Running",
                     "phase Evaluating -> Succeeded"):
        assert expected in events, events
    assert status["bestFid"] == 9.25, status  # top1; the monolith row is a baseline, not a DDM result
    assert [r["strategy"] for r in status["results"]["fid"]] == ["full", "top1", "monolith", "student"]
    assert status["results"]["studentVsMonolith"] == 1.1  # 7.7 / 7.0
    assert status["results"]["artifacts"]["expert-003"].endswith("/seq/experts/003/final")
    out = h.plane.kubectl("get", "ddm", "-n", h.ns).stdout
    assert re.search(r"seq\s+Succeeded\s+4\s+4\s+\S+\s+9\.25", out), out

    # Deleting the DDM: the garbage collector removes every child through the owner references.
    h.custom.delete_namespaced_custom_object(GROUP, VERSION, h.ns, PLURAL, "seq")
    wait_for(lambda: not h.jobs() and not h.configmaps(f"ddm.io/uid={uid}"), "children garbage-collected", 90)


def test_retry_then_permanent_failure_degrades_and_continues(operator: Operator, h: Harness, tmp_path: Path) -> None:
    h.create("deg", ddm_spec(4, tmp_path, failurePolicy={"minExperts": 3, "maxRetriesPerExpert": 2, "backoffSeconds": 3}))
    h.wait_jobs("deg-cluster-a1")
    h.succeed("deg-cluster-a1")
    h.wait_jobs(*[f"deg-expert-{k:03d}-a1" for k in range(4)], "deg-router-a1")

    h.fail("deg-expert-000-a1", 151)  # retryable (OOM): a new attempt, alone
    h.wait_jobs("deg-expert-000-a2")
    wait_for(lambda: h.status("deg")["experts"][0].get("jobName") == "deg-expert-000-a2", "status shows attempt 2")
    h.fail("deg-expert-001-a1", 3)  # permanent (bad data): never retried
    status = wait_for(lambda: (s := h.status("deg")).get("experts", [{}] * 4)[1].get("phase") == "Failed" and s,
                      "expert 1 failed for good")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Degraded"] == "True"
    for name in ("deg-expert-000-a2", "deg-expert-002-a1", "deg-expert-003-a1", "deg-router-a1"):
        h.succeed(name)
    h.wait_jobs("deg-evaluate-a1")
    h.succeed("deg-evaluate-a1")
    status = h.wait_phase("deg", "Degraded")
    assert status["expertsReady"] == 3
    assert "deg-expert-001-a2" not in h.jobs() and "deg-expert-002-a2" not in h.jobs()
    events = "\n".join(h.events("deg"))
    assert "expert 0 Running -> Retrying" in events and "expert 0 retried as deg-expert-000-a2" in events, events


def test_below_min_experts_fails_and_cancels_the_rest(operator: Operator, h: Harness, tmp_path: Path) -> None:
    h.create("few", ddm_spec(2, tmp_path))
    h.wait_jobs("few-cluster-a1")
    h.succeed("few-cluster-a1")
    h.wait_jobs("few-expert-000-a1", "few-expert-001-a1", "few-router-a1")
    h.fail("few-expert-000-a1", 4)  # non-finite loss: permanent; minExperts defaults to K=2
    status = h.wait_phase("few", "Failed")
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "TooFewExperts", failed
    wait_for(lambda: h.jobs()["few-expert-001-a1"]["spec"]["runPolicy"]["suspend"] is True, "survivor cancelled")


def test_suspend_and_resume(operator: Operator, h: Harness, tmp_path: Path) -> None:
    h.create("sus", ddm_spec(2, tmp_path))
    h.wait_jobs("sus-cluster-a1")
    h.succeed("sus-cluster-a1")
    names = ["sus-expert-000-a1", "sus-expert-001-a1", "sus-router-a1"]
    h.wait_jobs(*names)
    h.succeed("sus-expert-000-a1")
    h.patch_spec("sus", {"suspend": True})
    h.wait_phase("sus", "Suspended")
    wait_for(lambda: all(h.jobs()[n]["spec"]["runPolicy"]["suspend"] for n in names[1:]), "running jobs suspended")
    assert h.jobs()["sus-expert-000-a1"]["spec"]["runPolicy"]["suspend"] is False  # finished: left alone
    h.patch_spec("sus", {"suspend": False})
    wait_for(lambda: not any(h.jobs()[n]["spec"]["runPolicy"]["suspend"] for n in names[1:]), "jobs resumed")
    h.wait_phase("sus", "Training")
    assert len(h.jobs()) == 4


@contextlib.contextmanager
def verbose_operator(plane: Any, namespace: str, log_path: Path, interval_s: float) -> Iterator[Operator]:
    """The operator as the chart runs it with ``--verbose`` (its debug lines count the passes) and a given interval."""
    release, account = chart_account(namespace)
    plane.apply_yaml(render_rbac(namespace, release))
    op = Operator(plane.serviceaccount_kubeconfig(namespace, account), namespace, log_path, interval_s=interval_s,
                  extra_args=("--verbose",))
    op.start()
    try:
        yield op
    finally:
        op.stop()


def passes(op: Operator, name: str) -> int:
    """Reconcile passes over DDM ``name`` so far, from the operator's debug log."""
    return len(re.findall(rf"reconciled {re.escape(op.namespace)}/{re.escape(name)};", op.log_path.read_text(errors="replace")))


def timed(act: Callable[[], None], done: Callable[[], Any], what: str, timeout: float = 30) -> float:
    """Seconds from ``act()`` until ``done()`` holds (polled every 20 ms)."""
    start = time.monotonic()
    act()
    while not done():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_finished_child_wakes_its_ddm_at_once(k8s_cluster: Any, k8s_namespace: str, ddm_crd: None, h: Harness,
                                                tmp_path: Path) -> None:
    """Safety-net timer 60 s (the old operator re-planned every 5 s): each stage's end moves the DDM on within 2 s,
    so only the watch on its PyTorchJobs can have woken it."""
    with verbose_operator(k8s_cluster, k8s_namespace, tmp_path / "operator.log", interval_s=60) as op:
        op.wait_ready()
        h.create("ev", ddm_spec(2, tmp_path))
        h.wait_jobs("ev-cluster-a1")
        h.wait_phase("ev", "Clustering")
        experts = ["ev-expert-000-a1", "ev-expert-001-a1"]
        took = {
            "cluster -> Training": timed(lambda: h.succeed("ev-cluster-a1"),
                                         lambda: h.status("ev").get("phase") == "Training" and len(h.jobs()) == 4,
                                         "Training and 3 new jobs"),
            "expert 0 -> expertsReady 1": timed(lambda: h.succeed(experts[0]),
                                                lambda: h.status("ev").get("expertsReady") == 1, "1 expert ready"),
        }
        h.succeed(experts[1])
        took["router -> Evaluating"] = timed(lambda: h.succeed("ev-router-a1"),
                                             lambda: h.status("ev").get("phase") == "Evaluating"
                                             and "ev-evaluate-a1" in h.jobs(), "Evaluating and its job")
        took["evaluate -> Succeeded"] = timed(lambda: h.succeed("ev-evaluate-a1"),
                                              lambda: h.status("ev").get("phase") == "Succeeded", "Succeeded")
        print(f"\nstage end -> DDM status: {took}; {passes(op, 'ev')} passes")
        assert max(took.values()) < 2.0, took


def test_a_finished_ddm_is_not_polled_until_its_spec_changes(k8s_cluster: Any, k8s_namespace: str, ddm_crd: None,
                                                              h: Harness, tmp_path: Path) -> None:
    """Safety net 1 s: an unfinished DDM is looked at every second without events; once Succeeded, no pass at all,
    until a spec change (observedGeneration 2), then none again."""
    window = 4.0
    with verbose_operator(k8s_cluster, k8s_namespace, tmp_path / "operator.log", interval_s=1) as op:
        h.create("quiet", ddm_spec(1, tmp_path))
        h.wait_jobs("quiet-cluster-a1")
        before = passes(op, "quiet")
        time.sleep(window)
        assert passes(op, "quiet") - before >= window - 1, "the safety net polls an unfinished DDM"
        for job in ("quiet-cluster-a1", "quiet-expert-000-a1", "quiet-router-a1", "quiet-evaluate-a1"):
            h.wait_jobs(job)
            h.succeed(job)
        h.wait_phase("quiet", "Succeeded")
        time.sleep(1.0)  # the daemon's stop and its last pass
        before = passes(op, "quiet")
        time.sleep(window)
        assert passes(op, "quiet") == before, "a finished DDM was re-planned on a timer"
        h.patch_spec("quiet", {"failurePolicy": {"backoffSeconds": 7}})
        wait_for(lambda: h.status("quiet").get("observedGeneration") == 2, "spec change handled")
        assert h.status("quiet")["phase"] == "Succeeded"
        time.sleep(1.0)
        before = passes(op, "quiet")
        time.sleep(window)
        assert passes(op, "quiet") == before, "re-planned on a timer after the spec change was handled"


def test_s3_run_read_with_the_credentials_secret(s3_env: Any, operator: Operator, h: Harness, tmp_path: Path) -> None:
    """Progress and results of an s3:// run reach status through spec.storage.credentialsSecret alone."""
    from ddm_trainer.store import open_store

    h.core.create_namespaced_secret(h.ns, {"metadata": {"name": "s3-creds"}, "stringData": s3_env.env()})
    base = s3_env.fresh_uri("operator")
    h.create("s3run", ddm_spec(2, tmp_path, storage={"uri": base, "credentialsSecret": "s3-creds"}))
    h.wait_jobs("s3run-cluster-a1")
    h.succeed("s3run-cluster-a1")
    h.wait_jobs("s3run-expert-000-a1", "s3run-expert-001-a1", "s3run-router-a1")
    run = open_store(f"{base}/{h.ns}/s3run")  # the test's own (environment) credentials, as a trainer pod has
    run.put_json("progress/expert-001.json", {"stage": "expert", "index": 1, "event": "progress", "step": 21})
    h.job_status("s3run-expert-001-a1", ("Created", ""), ("Running", ""))
    wait_for(lambda: h.status("s3run")["experts"][1].get("step") == 21, "expert 1 progress from s3")
    for name in ("s3run-expert-000-a1", "s3run-expert-001-a1", "s3run-router-a1"):
        h.succeed(name)
    h.wait_jobs("s3run-evaluate-a1")
    run.commit("evaluation", {"results.json": b"{}"}, {"table": [{"strategy": "top1", "fid": 4.5, "nfe": 20.0, "n": 50}]})
    h.succeed("s3run-evaluate-a1")
    status = h.wait_phase("s3run", "Succeeded")
    assert status["bestFid"] == 4.5
    assert status["results"]["artifacts"]["router"] == f"{base}/{h.ns}/s3run/router/final"


def test_expert_on_second_cluster_and_remote_cleanup(operator: Operator, h: Harness, k8s_cluster_b: Any,
                                                     tmp_path: Path) -> None:
    from kubernetes import client

    remote_kubeconfig = inline_kubeconfig(k8s_cluster_b.user_kubeconfig("ddm-operator", ["system:masters"]))
    h.core.create_namespaced_secret(h.ns, {"metadata": {"name": "cluster-b"}, "stringData": {"kubeconfig": remote_kubeconfig}})
    with k8s_cluster_b.api_client() as api_b:
        client.CoreV1Api(api_b).create_namespace({"metadata": {"name": h.ns}})
        remote = Harness(k8s_cluster_b, h.ns)
        # expert 1 and the router in cluster b: both observed there (the router was not, and was relaunched for ever)
        spec = ddm_spec(2, tmp_path, experts={"overrides": [{"experts": [1], "placement": {"targetCluster": "cluster-b"}}]},
                        router={"placement": {"targetCluster": "cluster-b"}})
        h.create("mc", spec)
        h.wait_jobs("mc-cluster-a1")
        h.succeed("mc-cluster-a1")
        h.wait_jobs("mc-expert-000-a1")
        rjobs = remote.wait_jobs("mc-expert-001-a1", "mc-router-a1")
        assert "mc-expert-001-a1" not in h.jobs() and "mc-router-a1" not in h.jobs()
        remote.succeed("mc-router-a1")
        wait_for(lambda: ((h.status("mc").get("stages") or {}).get("router") or {}).get("phase") == "Succeeded",
                 "remote router followed to Succeeded")
        time.sleep(3)  # several reconciles (interval 1 s): a stage it could not see would be launched again
        assert sorted(remote.jobs()) == ["mc-expert-001-a1", "mc-router-a1"], remote.jobs().keys()
        assert "ownerReferences" not in rjobs["mc-expert-001-a1"]["metadata"]
        assert remote.stage_config("mc-expert-001-a1")["cluster_index"] == 1
        assert not remote.configmaps("ddm.io/key=expert-001")
        remote.succeed("mc-expert-001-a1")
        status = wait_for(lambda: (s := h.status("mc")).get("experts", [{}, {}])[1].get("phase") == "Succeeded" and s,
                          "remote expert succeeded")
        assert status["experts"][1]["cluster"] == "cluster-b"
        h.custom.delete_namespaced_custom_object(GROUP, VERSION, h.ns, PLURAL, "mc")
        wait_for(lambda: h.ddm("mc") is None, "DDM deleted after its finalizer ran")
        assert not remote.jobs() and not remote.configmaps("ddm.io/key=expert-001")
        assert not remote.configmaps("ddm.io/key=router")
        remote.api.close()
        client.CoreV1Api(api_b).delete_namespace(h.ns)


@pytest.mark.slow
def test_crash_safety_sigkill_at_ten_points(operator: Operator, h: Harness, tmp_path: Path) -> None:
    """SIGKILL a warm operator at 10 points of a K=4 run, several mid-reconcile; each restart must neither duplicate
    nor lose a stage (deterministic names + create-or-adopt + re-planning from observed children)."""
    kills = 0

    def crash(delay: float) -> None:
        nonlocal kills
        time.sleep(delay)
        operator.kill()
        kills += 1
        operator.start()
        operator.wait_ready()

    operator.wait_ready()
    h.create("crash", ddm_spec(4, tmp_path))
    crash(0.05)  # 1: while handling the creation
    h.wait_jobs("crash-cluster-a1")
    crash(0.0)  # 2: cluster job created, status maybe not yet patched
    h.succeed("crash-cluster-a1")
    experts = [f"crash-expert-{k:03d}-a1" for k in range(4)]
    wait_for(lambda: any(n in h.jobs() for n in [*experts, "crash-router-a1"]), "first expert/router job")
    crash(0.0)  # 3: in the middle of launching 4 experts + router
    h.wait_jobs(*experts, "crash-router-a1")
    h.wait_phase("crash", "Training")
    crash(0.5)  # 4: idle, timer running
    for i, name in enumerate(experts):
        h.succeed(name)
        crash(0.03 * i)  # 5-8: right after each expert finishes
    h.succeed("crash-router-a1")
    h.wait_jobs("crash-evaluate-a1")
    crash(0.0)  # 9: evaluation just launched
    h.succeed("crash-evaluate-a1")
    crash(0.05)  # 10: while finishing
    status = h.wait_phase("crash", "Succeeded", timeout=90)
    assert kills >= 10
    assert sorted(h.jobs()) == sorted(["crash-cluster-a1", *experts, "crash-router-a1", "crash-evaluate-a1"])
    uid = h.ddm("crash")["metadata"]["uid"]  # type: ignore[index]
    assert not h.configmaps(f"ddm.io/uid={uid}")
    assert status["expertsReady"] == 4 and status["stages"]["evaluation"]["attempts"] == 1
    assert all(e["retries"] == 0 and e["phase"] == "Succeeded" for e in status["experts"])


def test_whole_chart_is_accepted_by_the_apiserver(k8s_cluster: Any, k8s_namespace: str) -> None:
    """Both install modes of the chart, server-side dry run (RBAC, Deployment, ServiceAccount validate)."""
    helm = helm_binary()
    if helm is None:
        pytest.skip("helm not built (scripts/testenv-build.sh --extras)")
    for extra in ([], ["--set", f"watchNamespaces={{{k8s_namespace}}}"]):
        rendered = subprocess.run(
            [helm, "template", "ddm-operator", str(CHART), "--kube-version", "1.37.2", "--namespace", k8s_namespace,
             "--skip-crds", *extra], check=True, capture_output=True, text=True).stdout
        out = k8s_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered).stdout
        assert "deployment.apps/ddm-operator created (server dry run)" in out, out


# ---------------------------------------------------------------- the jobs it creates, executed for real


class JobExecutor:
    """Plays kubelet and the Kubeflow training operator for real: runs each PyTorchJob's Master container as a process.

    What a pod would get, taken from the objects the DDM operator created and nothing else: the container's command
    and env, its config volume (the downward API's file of the pod template's annotation, or a ConfigMap)
    materialised at the mount path's stand-in, ``envFrom`` Secrets decoded. No host
    store credentials leak in. Exit 0 -> Succeeded; else Failed as the training
    operator reports it (a signal N as 128 + N, as a container runtime does).
    """

    def __init__(self, h: Harness, workdir: Path) -> None:
        self.h, self.workdir = h, workdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[str, int] = {}

    def _container_env(self, container: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DDM_S3"))}
        for source in container.get("envFrom", []):
            secret = self.h.core.read_namespaced_secret(source["secretRef"]["name"], self.h.ns)
            env.update({k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        return env

    def _start(self, name: str, job: dict[str, Any]) -> None:
        template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        pod, annotations = template["spec"], template["metadata"].get("annotations") or {}
        container = pod["containers"][0]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        command = [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:]]
        root = self.workdir / name
        for mount in container.get("volumeMounts", []):
            local = root / mount["mountPath"].strip("/")
            local.mkdir(parents=True)
            volume = volumes[mount["name"]]
            if "downwardAPI" in volume:  # kubelet writes each item's field: here, annotations only
                files = {item["path"]: annotations[item["fieldRef"]["fieldPath"].split("'")[1]]
                         for item in volume["downwardAPI"]["items"]}
            else:
                files = self.h.core.read_namespaced_config_map(volume["configMap"]["name"], self.h.ns).data or {}
            for file, text in files.items():
                (local / file).write_text(text)
            command = [a.replace(mount["mountPath"], str(local)) for a in command]
        with (self.workdir / f"{name}.log").open("wb") as log:
            self.running[name] = subprocess.Popen(command, cwd=root, env=self._container_env(container), stdout=log,
                                                  stderr=subprocess.STDOUT)
        self.h.job_status(name, ("Created", ""), ("Running", ""))

    def step(self) -> None:
        """One kubelet sync: start new, unsuspended jobs (two at a time on 2 cores); report those that exited."""
        for name, proc in list(self.running.items()):
            if (rc := proc.poll()) is not None:
                del self.running[name]
                rc = 128 - rc if rc < 0 else rc
                self.exit_codes[name] = rc
                self.h.succeed(name) if rc == 0 else self.h.fail(name, rc)
        for name, job in sorted(self.h.jobs().items()):
            if len(self.running) >= 2:
                break
            if name not in self.running and name not in self.exit_codes and not job["spec"]["runPolicy"]["suspend"]:
                self._start(name, job)

    def kill(self, name: str) -> None:
        """The node dies under the pod: SIGKILL, reported as exit code 137 on the next step()."""
        self.running[name].kill()

    def stop(self) -> None:
        for proc in self.running.values():
            proc.kill()
            proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.stem}\n{p.read_text(errors='replace')[-1500:]}" for p in self.workdir.glob("*.log"))


@pytest.mark.e2e
@pytest.mark.slow
def test_executed_jobs_train_a_whole_ddm_on_s3(s3_env: Any, operator: Operator, h: Harness, fashion_mnist_dir: Path,
                                               tmp_path: Path) -> None:
    """The PyTorchJobs the operator writes, run as pods would run them, train a whole tiny DDM on real
    images into a real S3 store; expert 1's pod is killed after its first checkpoint, and its retry resumes from it;
    the status then carries the real evaluation's FID table."""
    from ddm_trainer import layout
    from ddm_trainer.store import open_store

    h.core.create_namespaced_secret(h.ns, {"metadata": {"name": "s3-creds"}, "stringData": s3_env.env()})
    base = s3_env.fresh_uri("executed")
    h.create("real", {
        "dataset": {"uri": str(fashion_mnist_dir), "imageSize": 16, "channels": 1, "limit": 200},
        "clustering": {"encoder": "raw-pixels", "fineClusters": 8, "numClusters": 2},
        # 200 steps, a checkpoint every 10: a wide window to kill expert 1 between its first checkpoint and its end
        "experts": {"modelPreset": "DiT-T/4", "steps": 200, "batchSize": 16, "lr": 0.001, "precision": "fp32",
                    "checkpointEvery": 10, "gpusPerNode": 0},
        "router": {"preset": "DiT-T/4", "steps": 10, "batchSize": 16, "precision": "fp32", "gpusPerNode": 0},
        "evaluation": {"strategies": ["full", "top1"], "numSamples": 8, "steps": 2},
        "distillation": {"enabled": True, "studentPreset": "DiT-T/4", "steps": 2, "batchSize": 8},
        "storage": {"uri": base, "credentialsSecret": "s3-creds"},
        "trainerImage": "ddm-trainer:test",
        "failurePolicy": {"backoffSeconds": 0},
    })
    run = open_store(f"{base}/{h.ns}/real")  # the test's own (environment) credentials
    executor = JobExecutor(h, tmp_path / "pods")
    executor.workdir.mkdir()
    victim, killed_after = "real-expert-001-a1", ""
    try:
        deadline = time.monotonic() + 600
        while (phase := h.status("real").get("phase")) not in ("Succeeded", "Failed"):
            assert time.monotonic() < deadline, f"still {phase} after 600 s\n{executor.logs()}"
            executor.step()
            if not killed_after and victim in executor.running:
                if done := run.committed_prefixes(layout.checkpoints(layout.expert(1))):
                    executor.kill(victim)
                    killed_after = done[-1]
            time.sleep(0.5)
    finally:
        executor.stop()
    status = h.status("real")
    assert phase == "Succeeded", f"{status}\n{executor.logs()}"

    expected = ["real-cluster-a1", "real-expert-000-a1", "real-expert-001-a2", "real-router-a1", "real-evaluate-a1",
                "real-distill-a1", "real-evaluate-student-a1"]
    assert killed_after, "expert 1 finished before the test could kill it"
    # Each stage ran once and passed, but expert 1: killed (137, retryable) and retried once, alone.
    assert executor.exit_codes == {**dict.fromkeys(expected, 0), victim: 137}, executor.logs()
    resumed = [json.loads(line.split(" ", 1)[1]) for line in (executor.workdir / "real-expert-001-a2.log").read_text()
               .splitlines() if line.startswith("DDM_PROGRESS ") and '"resumed"' in line]
    assert len(resumed) == 1 and resumed[0]["step"] >= int(killed_after.rsplit("-", 1)[1]), (killed_after, resumed)
    assert status["experts"][1]["retries"] == 1, status["experts"]
    secret = s3_env.env()["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in json.dumps(job) for job in h.jobs().values()), "credentials inlined in a PyTorchJob"

    # The status's table is the one the evaluation stage committed to S3.
    table = run.read_manifest("evaluation")["table"]  # type: ignore[index]
    assert [row["strategy"] for row in status["results"]["fid"]] == [row["strategy"] for row in table] == \
        ["full", "top1", "student"]
    fids = [row["fid"] for row in table]
    assert all(isinstance(f, float) and f > 0 for f in fids), table
    assert status["bestFid"] == pytest.approx(min(row["fid"] for row in table if row["strategy"] != "student"))
    for stage in (layout.expert(0), layout.expert(1), layout.ROUTER, layout.DISTILLATION):
        assert run.read_manifest(layout.final(stage)) is not None, stage
    assert status["expertsReady"] == 2
    assert status["results"]["artifacts"]["student"] == run.url(layout.final(layout.DISTILLATION))
