"""Storage in a cluster: a file:// store without a shared volume refused, the volume mounted in every stage, the
operator's store clients re-read with a changed credentials Secret and never with its own identity unless allowed."""
from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from minio.credentials import IamAwsProvider, StaticProvider

from ddm_operator import planner as pl
from ddm_operator.api.models import STORE_MOUNT_PATH, DecentralizedDiffusionSpec
from ddm_operator.k8s import builders as b
from ddm_operator.k8s.handlers import job_request
from ddm_operator.k8s.storage import (
    ALLOW_UNSHARED_ENV,
    POD_IDENTITY_ENV,
    StorageNotShared,
    StoreClients,
    check_storage,
    operator_credentials,
)
from ddm_trainer.errors import ConfigError
from ddm_trainer.store import FileStore

OWNER = b.Owner(name="run", namespace="team", uid="u-1")


def spec(storage: dict[str, Any]) -> DecentralizedDiffusionSpec:
    return DecentralizedDiffusionSpec.model_validate({
        "dataset": {"uri": "s3://data/shards", "imageSize": 32},
        "clustering": {"numClusters": 2},
        "experts": {"modelPreset": "DiT-T/4", "steps": 10},
        "storage": storage,
    })


@pytest.mark.parametrize("uri", ["file:///runs/x", "/runs/x"])
def test_a_file_store_without_a_volume_is_refused_saying_why(uri: str) -> None:
    with pytest.raises(StorageNotShared) as info:
        check_storage(spec({"uri": uri}), environ={})
    message = str(info.value)
    for needle in ("spec.storage.uri", uri, "s3://", "spec.storage.volumeClaim", "ReadWriteMany",
                   f"file://{STORE_MOUNT_PATH}/", "no job was created"):
        assert needle in message, message


def test_s3_a_volume_or_the_test_setting_pass() -> None:
    check_storage(spec({"uri": "s3://bucket/runs"}), environ={})
    check_storage(spec({"uri": f"file://{STORE_MOUNT_PATH}/runs", "volumeClaim": "ddm-runs"}), environ={})
    check_storage(spec({"uri": "file:///runs/x"}), environ={ALLOW_UNSHARED_ENV: "1"})


@pytest.mark.parametrize("uri", ["file:///data/runs", f"file://{STORE_MOUNT_PATH}x/runs", "s3://b/runs"])
def test_volume_claim_needs_a_uri_under_the_mount(uri: str) -> None:
    with pytest.raises(ValueError, match=rf"spec\.storage\.volumeClaim: is mounted at {STORE_MOUNT_PATH}"):
        spec({"uri": uri, "volumeClaim": "pvc"})


def test_every_stage_mounts_the_volume_and_its_config_points_under_it() -> None:
    s = spec({"uri": f"file://{STORE_MOUNT_PATH}/runs", "volumeClaim": "ddm-runs"})
    for key in (pl.CLUSTER, pl.expert_key(1), pl.ROUTER, pl.EVALUATE):
        req = job_request(s, OWNER, key, 1)
        pod = b.build_pytorchjob(req)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert {"name": b.STORE_VOLUME, "persistentVolumeClaim": {"claimName": "ddm-runs"}} in pod["volumes"]
        assert {"name": b.STORE_VOLUME, "mountPath": STORE_MOUNT_PATH} in pod["containers"][0]["volumeMounts"]
        assert "envFrom" not in pod["containers"][0]
        assert req.config["run_uri"] == f"file://{STORE_MOUNT_PATH}/runs/team/run"
    s3 = b.build_pytorchjob(job_request(spec({"uri": "s3://b/r", "credentialsSecret": "creds"}), OWNER, pl.ROUTER, 1))
    pod = s3["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["config"]


# ---------------------------------------------------------------- the operator's credentials


def test_operator_uses_the_secrets_keys() -> None:
    env, provider = operator_credentials({"DDM_S3_ENDPOINT": "http://s3:8333", "AWS_ACCESS_KEY_ID": "id",
                                          "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}, environ={})
    assert isinstance(provider, StaticProvider) and provider.retrieve().session_token == "t"
    assert env["DDM_S3_ENDPOINT"] == "http://s3:8333"


def test_operator_never_borrows_its_own_identity_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    own = {"AWS_ACCESS_KEY_ID": "operator-own", "AWS_SECRET_ACCESS_KEY": "operator-secret"}
    with pytest.raises(ConfigError, match=POD_IDENTITY_ENV):
        operator_credentials({"DDM_S3_ENDPOINT": "http://s3:8333"}, environ=own)
    env, provider = operator_credentials({"DDM_S3_ENDPOINT": "http://s3:8333"}, environ={**own, POD_IDENTITY_ENV: "1"})
    assert isinstance(provider, StaticProvider) and provider.retrieve().access_key == "operator-own"
    assert "AWS_ACCESS_KEY_ID" not in env  # the Secret's view, plus the operator's endpoint at most
    for name in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    _, provider = operator_credentials({}, environ={POD_IDENTITY_ENV: "1", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/t",
                                                    "AWS_ROLE_ARN": "arn:aws:iam::1:role/op"})
    assert isinstance(provider, IamAwsProvider) and provider._role_arn == "arn:aws:iam::1:role/op"


class FakeCore:
    """read_namespaced_secret as the API returns it (core_api.CoreApi: the JSON): metadata.resourceVersion, base64 data."""

    def __init__(self) -> None:
        self.version, self.data, self.reads = 1, {}, 0

    def set(self, **data: str) -> None:
        self.version += 1
        self.data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        assert (name, namespace) == ("creds", "team")
        self.reads += 1
        return {"metadata": {"resourceVersion": str(self.version)}, "data": dict(self.data)}


def test_store_clients_rebuild_when_the_secret_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    core = FakeCore()
    core.set(DDM_S3_ENDPOINT="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="old", AWS_SECRET_ACCESS_KEY="old-s")
    clients = StoreClients(recheck_s=0.0)
    s = spec({"uri": "s3://bucket/runs", "credentialsSecret": "creds"})
    first = clients.get(core, s, "team", "run")
    assert first.uri == "s3://bucket/runs/team/run"
    assert first.client._provider.retrieve().access_key == "old"
    assert clients.get(core, s, "team", "run") is first and core.reads == 2  # same resourceVersion: same client
    core.set(DDM_S3_ENDPOINT="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="new", AWS_SECRET_ACCESS_KEY="new-s")
    rotated = clients.get(core, s, "team", "run")
    assert rotated is not first and rotated.client._provider.retrieve().access_key == "new"


def test_store_clients_read_the_secret_at_most_once_per_recheck_interval() -> None:
    core = FakeCore()
    core.set(DDM_S3_ENDPOINT="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    clients = StoreClients(recheck_s=60.0)
    s = spec({"uri": "s3://bucket/runs", "credentialsSecret": "creds"})
    for _ in range(5):
        clients.get(core, s, "team", "run")
    assert core.reads == 1


def test_file_store_needs_no_secret(tmp_path: Path) -> None:
    store = StoreClients().get(None, spec({"uri": f"file://{tmp_path}"}), "team", "run")
    assert isinstance(store, FileStore) and store.root == tmp_path / "team" / "run"


def test_the_operators_store_reads_give_up_fast_when_the_store_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection costs the operator's pass milliseconds: one retry without backoff (minio's own client
    retries 5 times with backoff, about 6 s a read, measured in bench/fleet.py --faults store-flap as 5.7-5.9 s
    stage latency for every DDM whose pass hit the outage), and connects time out after seconds, not minutes."""
    import socket

    from ddm_operator.k8s import storage

    with socket.socket() as sock:  # a port nothing listens on: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    core = FakeCore()
    core.set(DDM_S3_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    store = StoreClients().get(core, spec({"uri": "s3://bucket/runs", "credentialsSecret": "creds"}), "team", "run")
    assert store.client._http is storage.operator_http_client()
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)refused|connect|retries"):
        store.read_manifest("evaluation")
    assert time.monotonic() - start < 1.5
    timeout = storage.operator_http_client().connection_pool_kw["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout) == (storage.OPERATOR_S3_CONNECT_S,
                                                               storage.OPERATOR_S3_READ_S) and timeout.connect_timeout <= 5
