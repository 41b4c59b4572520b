"""What one stage launch creates, against recording fakes of the API: the job alone while the stage config fits in
it; for a larger config, its ConfigMap first (here and in every MultiKueue worker), then the job that mounts it."""
from __future__ import annotations

from typing import Any

from ddm_operator.k8s import builders as b
from ddm_operator.k8s import handlers

OWNER = b.Owner(name="d", namespace="ns", uid="u-1")


class Recorder:
    """Both API clients of every cluster: each create is appended to ``made`` as (cluster, kind, name)."""

    def __init__(self) -> None:
        self.made: list[tuple[str | None, str, str]] = []

    def api(self, cluster: str | None) -> Any:
        recorder = self

        class Api:
            def create_namespaced_config_map(self, namespace: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
                recorder.made.append((cluster, "ConfigMap", body["metadata"]["name"]))
                return body

            def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                                body: dict[str, Any], **_: Any) -> dict[str, Any]:
                recorder.made.append((cluster, body["kind"], body["metadata"]["name"]))
                return body

        return Api()


def launch(monkeypatch: Any, config: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    recorder = Recorder()
    monkeypatch.setattr(handlers, "_client_for", lambda namespace, cluster: cluster)
    monkeypatch.setattr(handlers, "_core", lambda api=None: recorder.api(api))
    monkeypatch.setattr(handlers, "_custom", lambda api=None: recorder.api(api))
    monkeypatch.setattr(handlers._remote, "record", lambda *a: None)
    placement = b.Placement(queue_name="multi", multi_kueue_workers={"worker-1": "worker-1-kubeconfig"})
    handlers._launch(b.JobRequest(owner=OWNER, key="expert-001", attempt=1, image="img", command=["ddm-train"],
                                  config=config, placement=placement))
    return recorder.made


def test_a_config_that_fits_is_one_create_of_the_job(monkeypatch: Any) -> None:
    assert launch(monkeypatch, {"run_uri": "s3://b/r", "index": 1}) == [(None, "PyTorchJob", "d-expert-001-a1")]


def test_a_config_too_large_for_the_job_is_a_configmap_here_and_in_each_worker_first(monkeypatch: Any) -> None:
    prompts = ["x" * 1024] * (b.CONFIG_IN_JOB_MAX_BYTES // 1024 + 1)
    assert launch(monkeypatch, {"run_uri": "s3://b/r", "prompts": prompts}) == [
        (None, "ConfigMap", "d-expert-001-a1"), ("worker-1-kubeconfig", "ConfigMap", "d-expert-001-a1"),
        (None, "PyTorchJob", "d-expert-001-a1")]
