"""The operator's index of its jobs (operator/ddm_operator/k8s/remote_watch.py) against a real API server: what
changed while its watch was cut is seen when the watch comes back, because every restart lists again.

The watch reaches the API server through a TCP relay this test can cut (every connection closed, the port refused)
and open again at the same address, the way a member cluster's network drops out. While it is cut, a job is marked
Succeeded, another deleted and a third created: none of it reaches the watch as an event.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

JOBS = ("kubeflow.org", "v1", "pytorchjobs")


class Relay:
    """127.0.0.1:<port> -> target, byte for byte (TLS passes through); ``cut()`` closes every connection and stops
    listening, ``open()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self.port, self._server = server.getsockname()[1], server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            server, conns, self._server, self._conns = self._server, self._conns, None, []
        for s in [server, *conns]:
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def relay(k8s_cluster: Any) -> Iterator[Relay]:
    server = yaml.safe_load(k8s_cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    r = Relay((host, int(port)))
    r.open()
    yield r
    r.cut()


def job(name: str, ddm_uid: str) -> dict[str, Any]:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": {"ddm.io/uid": ddm_uid, "ddm.io/key": "expert-000",
                                                  "ddm.io/attempt": "1"}},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "Never", "template": {
                "spec": {"containers": [{"name": "pytorch", "image": "ddm-trainer:test"}]}}}}}}


def wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out := check():
            return out
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_change_missed_while_the_watch_was_cut_is_seen_after_it_lists_again(
        k8s_cluster: Any, k8s_namespace: str, relay: Relay) -> None:
    from kubernetes import client, config

    from ddm_operator.k8s import handlers
    from ddm_operator.k8s.remote_watch import RemoteWatches

    ns = k8s_namespace
    admin = client.CustomObjectsApi(k8s_cluster.api_client())
    via_relay = yaml.safe_load(k8s_cluster.kubeconfig.read_text())
    via_relay["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
    operator_client = config.new_client_from_config_dict(via_relay)
    woken: list[str] = []
    watches = RemoteWatches(lambda namespace, cluster: operator_client, handlers.child_wakes_parent, woken.append)
    for name, ddm in (("one-expert-000-a1", "u1"), ("two-expert-000-a1", "u2")):
        admin.create_namespaced_custom_object(*JOBS[:2], ns, JOBS[2], job(name, ddm))
    watches.use(ns, {None}, "u1")
    watches.use(ns, {None}, "u2")
    try:
        names = lambda ddm: sorted(j["metadata"]["name"] for j in watches.jobs(ns, None, ddm, operator_client) or [])  # noqa: E731
        wait_for(lambda: names("u1") == ["one-expert-000-a1"] and names("u2") == ["two-expert-000-a1"], "index filled")
        assert watches.lists == 1
        assert watches.jobs(ns, None, "u1", object()) is None  # another client (a changed Secret): not served

        relay.cut()
        wait_for(lambda: not watches.live(ns, None), "the watch to notice the cut")
        assert watches.jobs(ns, None, "u1", operator_client) is None  # not served while cut: the pass lists itself
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        admin.patch_namespaced_custom_object_status(*JOBS[:2], ns, JOBS[2], "one-expert-000-a1", {"status": {
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                            "lastUpdateTime": now, "lastTransitionTime": now}]}})
        admin.delete_namespaced_custom_object(*JOBS[:2], ns, JOBS[2], "two-expert-000-a1")
        admin.create_namespaced_custom_object(*JOBS[:2], ns, JOBS[2], job("one-router-a1", "u1"))
        time.sleep(1.0)
        assert watches.jobs(ns, None, "u1", operator_client) is None
        woken.clear()

        relay.open()  # the same address: the watch's retry lists again
        wait_for(lambda: watches.jobs(ns, None, "u1", operator_client) is not None, "the watch back", timeout=60)
        assert watches.lists == 2
        assert names("u1") == ["one-expert-000-a1", "one-router-a1"]
        assert names("u2") == []  # deleted while unseen: gone from the index
        done = next(j for j in watches.jobs(ns, None, "u1", operator_client) or []
                    if j["metadata"]["name"] == "one-expert-000-a1")
        assert handlers.job_state(done).phase == "Succeeded"
        assert "u1" in woken and "u2" in woken, woken  # both DDMs look again: one's job finished, the other's went
    finally:
        watches.release("u1")
        watches.release("u2")
        relay.cut()
