"""Deleting a DDM whose member cluster stopped answering, on two real control planes.

Cluster b is made unreachable the way a firewall or a dead load balancer makes it: the kubeconfig Secret the
operator reads is pointed at a socket that accepts TCP connections and never answers (requests hang, they are not
refused). The operator must give up after DDM_REMOTE_CLEANUP_TIMEOUT_S, release the DDM and name what it left behind.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.test_operator import (
    GROUP,
    PLURAL,
    VERSION,
    Harness,
    Operator,
    chart_account,
    ddm_crd,  # noqa: F401 (fixture)
    ddm_spec,
    inline_kubeconfig,
    render_rbac,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

CLEANUP_TIMEOUT_S = 4.0  # DDM_REMOTE_CLEANUP_TIMEOUT_S of this test's operator
REQUEST_TIMEOUT_S = 2.0  # DDM_REMOTE_REQUEST_TIMEOUT_S: one hung request to b costs at most 2 tries of this


def expert_one_in_b(h: Harness, remote: Harness, name: str, tmp_path: Path) -> None:
    """A DDM of K=2 whose expert 1 trains in member cluster b: created, its clustering done, that expert's job in b."""
    h.create(name, ddm_spec(2, tmp_path, experts={
        "overrides": [{"experts": [1], "placement": {"targetCluster": "cluster-b"}}]}))
    h.wait_jobs(f"{name}-cluster-a1")
    h.succeed(f"{name}-cluster-a1")
    remote.wait_jobs(f"{name}-expert-001-a1")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose listener never accepts: the kernel completes the TCP handshake, the TLS hello is
    never answered, so every request to it hangs until the client's own timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


def test_deleting_a_ddm_whose_member_cluster_hangs_ends_within_the_bound(
        k8s_cluster: Any, k8s_cluster_b: Any, k8s_namespace: str, ddm_crd: None, silent_port: int,  # noqa: F811
        tmp_path: Path) -> None:
    from kubernetes import client

    ns = k8s_namespace
    release, account = chart_account(ns)
    k8s_cluster.apply_yaml(render_rbac(ns, release))
    op = Operator(k8s_cluster.serviceaccount_kubeconfig(ns, account), ns, tmp_path / "operator.log",
                  env={"DDM_REMOTE_CLEANUP_TIMEOUT_S": f"{CLEANUP_TIMEOUT_S:g}",
                       "DDM_REMOTE_REQUEST_TIMEOUT_S": f"{REQUEST_TIMEOUT_S:g}",
                       # the member's Secret is read on every use: the hung kubeconfig is seen by the deletion
                       # itself (by default a client is reused for up to 2 s, and the cleanup then still succeeded)
                       "DDM_SECRET_RECHECK_S": "0"})
    h = Harness(k8s_cluster, ns)
    kubeconfig = inline_kubeconfig(k8s_cluster_b.user_kubeconfig("ddm-operator", ["system:masters"]))
    h.core.create_namespaced_secret(ns, {"metadata": {"name": "cluster-b"}, "stringData": {"kubeconfig": kubeconfig}})
    with k8s_cluster_b.api_client() as api_b:
        client.CoreV1Api(api_b).create_namespace({"metadata": {"name": ns}})
        remote = Harness(k8s_cluster_b, ns)
        op.start()
        try:
            expert_one_in_b(h, remote, "far", tmp_path)
            uid = h.ddm("far")["metadata"]["uid"]  # type: ignore[index]
            # b stops answering: same cluster, same credentials, a server address where nothing ever replies
            hung = yaml.safe_load(kubeconfig)
            hung["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{silent_port}"
            h.core.replace_namespaced_secret("cluster-b", ns, {"metadata": {"name": "cluster-b"},
                                                               "stringData": {"kubeconfig": yaml.safe_dump(hung)}})
            asked = time.monotonic()
            h.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "far")
            # the bound: the timeout, plus the last try's hung requests (2 tries of 2 s each), plus kopf's turn
            bound = CLEANUP_TIMEOUT_S + 2 * 2 * REQUEST_TIMEOUT_S + 5
            wait_for(lambda: h.ddm("far") is None, "DDM released although cluster b hangs", timeout=bound + 30)
            took = time.monotonic() - asked
            print(f"\nDDM released {took:.1f} s after its deletion (cleanup timeout {CLEANUP_TIMEOUT_S:g} s)")
            assert CLEANUP_TIMEOUT_S <= took <= bound, f"released after {took:.1f} s (bound {bound:.0f} s)"
            events = wait_for(lambda: [e for e in h.events("far") if e.startswith("CleanupIncomplete")],
                              "CleanupIncomplete event")
            assert len(events) == 1, events
            assert (f"cluster cluster-b: PyTorchJobs and ConfigMaps in namespace {ns} with label ddm.io/uid={uid}"
                    in events[0]), events
            assert "timed out" in events[0].lower(), events  # why: the requests hung, they were not refused
            # what the Event names is indeed still there in b; the local children went with the DDM
            assert sorted(remote.jobs()) == ["far-expert-001-a1"]
            assert remote.configmaps(f"ddm.io/uid={uid}") == []  # its config travels in the job
            wait_for(lambda: not h.jobs(), "local jobs garbage-collected")
        finally:
            op.stop()
            print(op.log())
            remote.api.close()
            h.api.close()
            client.CoreV1Api(api_b).delete_namespace(ns)


def test_expired_member_credentials_are_named_in_the_status_and_a_fixed_secret_is_picked_up(
        k8s_cluster: Any, k8s_cluster_b: Any, k8s_namespace: str, ddm_crd: None, tmp_path: Path) -> None:  # noqa: F811
    """b's kubeconfig Secret replaced with a token b's API server rejects (401), as when credentials expire: the DDM
    says so (ClustersReachable=False, reason Unauthorized) and waits; the valid Secret put back is used at the next
    pass, without restarting the operator, and the DDM goes on (condition Reconnected, its next stage launched)."""
    from kubernetes import client

    ns = k8s_namespace
    release, account = chart_account(ns)
    k8s_cluster.apply_yaml(render_rbac(ns, release))
    op = Operator(k8s_cluster.serviceaccount_kubeconfig(ns, account), ns, tmp_path / "operator.log")
    h = Harness(k8s_cluster, ns)
    kubeconfig = inline_kubeconfig(k8s_cluster_b.user_kubeconfig("ddm-operator", ["system:masters"]))
    expired = yaml.safe_load(kubeconfig)
    expired["users"][0]["user"] = {"token": "expired-token-b-does-not-know"}

    def put_secret(text: str) -> None:
        h.core.replace_namespaced_secret("cluster-b", ns, {"metadata": {"name": "cluster-b"},
                                                           "stringData": {"kubeconfig": text}})

    def reachable() -> dict[str, Any]:
        return next((c for c in h.status("cred").get("conditions") or [] if c["type"] == "ClustersReachable"), {})

    h.core.create_namespaced_secret(ns, {"metadata": {"name": "cluster-b"}, "stringData": {"kubeconfig": kubeconfig}})
    with k8s_cluster_b.api_client() as api_b:
        client.CoreV1Api(api_b).create_namespace({"metadata": {"name": ns}})
        remote = Harness(k8s_cluster_b, ns)
        op.start()
        try:
            expert_one_in_b(h, remote, "cred", tmp_path)
            h.wait_jobs("cred-expert-000-a1", "cred-router-a1")
            put_secret(yaml.safe_dump(expired))
            cond = wait_for(lambda: (c := reachable()).get("status") == "False" and c, "ClustersReachable=False")
            assert cond["reason"] == "Unauthorized", cond
            assert "cluster cluster-b rejected our credentials: HTTP 401 Unauthorized" in cond["message"], cond
            h.succeed("cred-expert-000-a1")
            h.succeed("cred-router-a1")
            remote.succeed("cred-expert-001-a1")  # finished while b could not be read: nothing moves on yet
            time.sleep(3)
            assert "cred-evaluate-a1" not in h.jobs() and reachable()["status"] == "False"
            put_secret(kubeconfig)  # the credentials renewed
            cond = wait_for(lambda: (c := reachable()).get("status") == "True" and c, "ClustersReachable=True")
            assert cond["reason"] == "Reconnected" and "rejected our credentials" in cond["message"], cond
            h.wait_jobs("cred-evaluate-a1")  # b's expert seen Succeeded: the DDM went on
            assert op.starts == 1 and op.proc is not None and op.proc.poll() is None  # no restart
            assert any("ClusterUnreachable" in e and "Unauthorized" in e for e in h.events("cred")), h.events("cred")
        finally:
            op.stop()
            print(op.log())
            remote.api.close()
            h.api.close()
            client.CoreV1Api(api_b).delete_namespace(ns)
