"""operator/ddm_operator/k8s/multicluster.py ClusterClients: how often a member cluster's kubeconfig Secret is read."""
from __future__ import annotations

import base64
from typing import Any

import yaml

from ddm_operator.k8s import multicluster
from ddm_operator.k8s.multicluster import ClusterClients


class Secrets:
    """read_namespaced_secret as core_api.CoreApi answers it, counting the reads; ``version`` is its resourceVersion."""

    def __init__(self) -> None:
        self.reads, self.version = 0, 1

    def read_namespaced_secret(self, name: str, namespace: str) -> dict[str, Any]:
        self.reads += 1
        kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "b",
                      "clusters": [{"name": "b", "cluster": {"server": "https://127.0.0.1:6443"}}],
                      "contexts": [{"name": "b", "context": {"cluster": "b", "user": "b"}}],
                      "users": [{"name": "b", "user": {"token": f"t{self.version}"}}]}
        return {"metadata": {"resourceVersion": str(self.version)},
                "data": {"kubeconfig": base64.b64encode(yaml.safe_dump(kubeconfig).encode()).decode()}}


def test_failures_make_at_most_one_secret_read_a_second(monkeypatch: Any) -> None:
    now = [100.0]
    monkeypatch.setattr(multicluster.time, "monotonic", lambda: now[0])
    secrets, clients = Secrets(), ClusterClients(recheck_s=2.0)
    first = clients.get(secrets, "ns", "cluster-b")
    assert secrets.reads == 1
    for _ in range(50):  # 50 passes fail against the member within 0.5 s: no new read yet
        now[0] += 0.01
        clients.invalidate("ns", "cluster-b")
        assert clients.get(secrets, "ns", "cluster-b") is first
    assert secrets.reads == 1
    now[0] += 0.6  # 1.1 s after the read: the next failure makes the next use read the Secret again
    clients.invalidate("ns", "cluster-b")
    secrets.version = 2  # fixed meanwhile (new credentials): a new client
    second = clients.get(secrets, "ns", "cluster-b")
    assert secrets.reads == 2 and second is not first
    assert second.configuration.api_key["BearerToken"] == "Bearer t2"
    clients.invalidate("ns", "cluster-b")  # right after that read: ignored
    assert clients.get(secrets, "ns", "cluster-b") is second and secrets.reads == 2
    now[0] += 2.0  # recheck_s passed: read again, same version, same client
    assert clients.get(secrets, "ns", "cluster-b") is second and secrets.reads == 3
