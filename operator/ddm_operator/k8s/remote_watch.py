"""Watches of our jobs (PyTorchJobs or TrainJobs, the operator's backend) in member clusters: a stage that ends in
another cluster wakes its DDM at once.

kopf watches only the operator's own cluster. For each (namespace, targetCluster Secret) that an unfinished DDM
uses, one thread lists and then watches the jobs carrying ``ddm.io/uid`` there, and calls ``wake(ddm_uid)``
on a phase change the planner sees (the same rule as the local watch: ``handlers.child_wakes_parent``). A watch
that breaks (the member's API server unreachable, its credentials refused) is retried with a growing delay, capped
at ``MAX_RETRY_S``; each retry re-reads the Secret, so a rotated kubeconfig is used. Its re-list after a break
wakes every DDM whose jobs changed phase meanwhile: a member cluster that comes back is picked up without a
restart. ``live(namespace, cluster)`` says whether the watch is connected; while it is not, the DDMs fall back to
polling that cluster (handlers.REMOTE_INTERVAL_S). A watch nobody uses any more ends (no request to a cluster no
unfinished DDM uses).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import builders as b

WATCH_TIMEOUT_S = 240  # the server ends a watch after this; we then resume from the last resourceVersion
REQUEST_TIMEOUT_S = 30.0  # list, and the read timeout of the watch stream beyond WATCH_TIMEOUT_S
MAX_RETRY_S = 5.0
log = logging.getLogger("ddm_operator")

Key = tuple[str, str]  # (namespace, targetCluster Secret name)


class RemoteWatches:
    """One watch thread per (namespace, cluster) in use; ``client_for(namespace, cluster)`` gives its ApiClient and
    ``wakes(event_type, job, seen)`` decides whether an event wakes the DDM named by the job's ddm.io/uid label."""

    def __init__(self, client_for: Callable[[str, str], Any], wakes: Callable[[str | None, dict[str, Any], dict[str, str]], bool],
                 wake: Callable[[str], None], backend: b.Backend = b.PYTORCHJOB) -> None:
        self._client_for, self._wakes, self._wake = client_for, wakes, wake
        self._backend = backend  # the kind of job the operator makes (handlers.BACKEND)
        self._users: dict[Key, set[str]] = {}
        self._live: dict[Key, bool] = {}
        self._threads: dict[Key, threading.Thread] = {}
        self._lock = threading.Lock()

    def use(self, namespace: str, clusters: set[str], ddm_uid: str) -> None:
        """DDM ``ddm_uid`` has stages in ``clusters`` (its current set: clusters it no longer uses are released)."""
        with self._lock:
            for key, users in self._users.items():
                if key[0] == namespace and key[1] not in clusters:
                    users.discard(ddm_uid)
            for cluster in clusters:
                key = (namespace, cluster)
                self._users.setdefault(key, set()).add(ddm_uid)
                thread = self._threads.get(key)
                if thread is None or not thread.is_alive():
                    thread = threading.Thread(target=self._run, args=(key,), daemon=True,
                                              name=f"remote-watch-{namespace}-{cluster}")
                    self._threads[key] = thread
                    thread.start()

    def release(self, ddm_uid: str) -> None:
        """The DDM finished or is gone: its clusters are watched only for the other DDMs that use them."""
        with self._lock:
            for users in self._users.values():
                users.discard(ddm_uid)

    def live(self, namespace: str, cluster: str) -> bool:
        return self._live.get((namespace, cluster), False)

    def watched(self, namespace: str) -> set[str]:
        """The clusters of ``namespace`` whose watch is connected now."""
        return {c for (ns, c), up in list(self._live.items()) if ns == namespace and up}

    def _in_use(self, key: Key) -> bool:
        with self._lock:
            if self._users.get(key):
                return True
            self._threads.pop(key, None)  # a later use() starts a new thread
            self._live.pop(key, None)
            return False

    def _run(self, key: Key) -> None:
        from kubernetes import client, watch

        namespace, cluster = key
        seen: dict[str, str] = {}  # job uid -> phase, as child_wakes_parent keeps it
        delay = 0.5
        while self._in_use(key):
            try:
                custom = client.CustomObjectsApi(self._client_for(namespace, cluster))
                args = (self._backend.group, self._backend.version, namespace, self._backend.plural)
                listed = custom.list_namespaced_custom_object(*args, label_selector=b.LABEL_UID,
                                                              _request_timeout=REQUEST_TIMEOUT_S)
                present = set()
                for job in listed.get("items") or []:
                    present.add(job["metadata"]["uid"])
                    self._event("MODIFIED", job, seen)  # after a break: what changed while we could not see
                for gone in set(seen) - present:  # deleted while we could not see
                    seen.pop(gone, None)
                version = listed["metadata"]["resourceVersion"]
                if not self._live.get(key):
                    log.info("watching %ss of cluster %s in %s", self._backend.kind, cluster, namespace)
                self._live[key], delay = True, 0.5
                while self._in_use(key):
                    stream = watch.Watch().stream(custom.list_namespaced_custom_object, *args,
                                                  label_selector=b.LABEL_UID, resource_version=version,
                                                  timeout_seconds=WATCH_TIMEOUT_S, allow_watch_bookmarks=True,
                                                  _request_timeout=(REQUEST_TIMEOUT_S, WATCH_TIMEOUT_S + REQUEST_TIMEOUT_S))
                    for event in stream:
                        obj = event["object"]
                        if event["type"] == "ERROR":  # 410 Gone: our resourceVersion is too old, list again
                            raise RuntimeError(f"watch error: {obj.get('message') if isinstance(obj, dict) else obj}")
                        version = obj["metadata"].get("resourceVersion", version)
                        if event["type"] != "BOOKMARK":
                            self._event(event["type"], obj, seen)
                        if not self._in_use(key):
                            break
            except Exception as exc:  # unreachable, refused, expired credentials, Secret gone: retry, poll meanwhile
                if self._live.get(key, True):
                    log.warning("watch of cluster %s in %s broke (%s: %s); the DDMs poll it until it is back",
                                cluster, namespace, type(exc).__name__, str(exc)[:200])
                self._live[key] = False
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)

    def _event(self, event_type: str, job: dict[str, Any], seen: dict[str, str]) -> None:
        if self._wakes(event_type, job, seen):
            uid = ((job.get("metadata") or {}).get("labels") or {}).get(b.LABEL_UID)
            if uid:
                self._wake(uid)
