"""Watches of our jobs (PyTorchJobs or TrainJobs, the operator's backend) in every cluster a DDM uses, the operator's
own (cluster None) and member clusters (a targetCluster Secret's name), and the index of jobs they keep.

For each (namespace, cluster) that an unfinished DDM uses, one thread lists and then watches the jobs carrying
``ddm.io/uid`` there. It keeps them in memory by DDM uid (``jobs``), so a pass reads its children without a request,
and calls ``wake(ddm_uid)`` on a phase change the planner sees (``handlers.child_wakes_parent``).

Why the index cannot lose a change: it is served only while its watch is connected and has listed since it last
broke (``jobs`` returns None otherwise, and the pass lists the cluster itself, as before the index). Every (re)start
of the watch begins with a full list that *replaces* the index of that cluster, so a job created, changed or deleted
while the watch was down is seen as it is now, and the DDMs whose jobs changed phase meanwhile are woken. A watch
that resumes after the server ended it (``WATCH_TIMEOUT_S``) resumes from the last resourceVersion, from which the
API server replays every change (or answers 410 Gone, which makes us list again). The jobs a pass creates are put in
the index from the create's answer (``record``), so the next pass sees them even before the watch delivers them.

A watch that breaks (the member's API server unreachable, its credentials refused) is retried with a growing delay,
capped at ``MAX_RETRY_S``; each retry takes the cluster's current client, so a rotated kubeconfig is used, and the
index is served only while it was filled through the client the cluster has now (a Secret replaced with rejected
credentials is noticed by the pass's own list, not hidden behind an index filled with the old ones). A member
cluster that comes back is picked up without a restart. A watch nobody uses any more ends and its index is dropped
(no request to a cluster no unfinished DDM uses).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import builders as b

WATCH_TIMEOUT_S = 60  # the server ends a watch after this; we then resume from the last resourceVersion
REQUEST_TIMEOUT_S = 30.0  # list, and the read timeout of the watch stream beyond WATCH_TIMEOUT_S
MAX_RETRY_S = 5.0
FIRST_LIST_WAIT_S = 10.0  # a pass waits this long at most for a new watch's first list (a hung member: then it lists)
log = logging.getLogger("ddm_operator")

Key = tuple[str, "str | None"]  # (namespace, targetCluster Secret name; None: the operator's own cluster)


def _version(obj: dict[str, Any]) -> int:
    """metadata.resourceVersion as a number (etcd's revision; -1 if absent or not a number: then any copy is newer)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


KEPT_METADATA = ("name", "namespace", "uid", "labels", "resourceVersion", "creationTimestamp", "deletionTimestamp")


def _slim(job: dict[str, Any]) -> dict[str, Any]:
    """What observe.job_state reads of a job: its identity and labels, whether it is suspended, its status. The pod
    templates and managedFields are most of a job's size: kept whole, 1,100 jobs held 40 MiB more at 100x8."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    return {"apiVersion": job.get("apiVersion"), "kind": job.get("kind"),
            "metadata": {k: meta[k] for k in KEPT_METADATA if k in meta},
            "spec": {"runPolicy": {"suspend": (spec.get("runPolicy") or {}).get("suspend")}, "suspend": spec.get("suspend")},
            "status": job.get("status") or {}}


class _Index:
    """The jobs of one (namespace, cluster): job uid -> job, and DDM uid -> job uids."""

    def __init__(self, client: Any) -> None:
        self.client = client  # the ApiClient it was listed with
        self.jobs: dict[str, dict[str, Any]] = {}
        self.by_ddm: dict[str, set[str]] = {}

    def put(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        uid, ddm = meta.get("uid"), (meta.get("labels") or {}).get(b.LABEL_UID)
        if not uid or not ddm:
            return
        held = self.jobs.get(uid)
        if held is not None and _version(held) > _version(job):
            return  # an older copy (a create's answer after the watch's newer event)
        self.jobs[uid] = _slim(job)
        self.by_ddm.setdefault(ddm, set()).add(uid)

    def drop(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        uid, ddm = meta.get("uid"), (meta.get("labels") or {}).get(b.LABEL_UID)
        self.jobs.pop(uid, None)
        if ddm in self.by_ddm:
            self.by_ddm[ddm].discard(uid)
            if not self.by_ddm[ddm]:
                del self.by_ddm[ddm]


class RemoteWatches:
    """One watch thread per (namespace, cluster) in use; ``client_for(namespace, cluster)`` gives its ApiClient (None
    for the operator's own cluster: the default client) and ``wakes(event_type, job, seen)`` decides whether an event
    wakes the DDM named by the job's ddm.io/uid label."""

    def __init__(self, client_for: Callable[[str, str | None], Any],
                 wakes: Callable[[str | None, dict[str, Any], dict[str, str]], bool],
                 wake: Callable[[str], None], backend: b.Backend = b.PYTORCHJOB,
                 on_failure: Callable[[str, str | None], None] | None = None) -> None:
        self._client_for, self._wakes, self._wake = client_for, wakes, wake
        self._on_failure = on_failure or (lambda namespace, cluster: None)
        self._backend = backend  # the kind of job the operator makes (handlers.BACKEND)
        self._users: dict[Key, set[str]] = {}
        self._live: dict[Key, bool] = {}
        self._index: dict[Key, _Index] = {}  # kept across a break, to tell what went while we could not see
        self._synced: set[Key] = set()  # watch connected and listed since it last broke: its index is served
        self._tried: dict[Key, threading.Event] = {}  # set once a new watch's first list answered or failed
        self._threads: dict[Key, threading.Thread] = {}
        self._lock = threading.Lock()
        self.lists = 0  # full lists made by the watches (first start and every restart): for tests

    def use(self, namespace: str, clusters: set[str | None], ddm_uid: str) -> None:
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
                    self._tried[key] = threading.Event()
                    thread = threading.Thread(target=self._run, args=(key,), daemon=True,
                                              name=f"job-watch-{namespace}-{cluster or 'own'}")
                    self._threads[key] = thread
                    thread.start()

    def release(self, ddm_uid: str) -> None:
        """The DDM finished or is gone: its clusters are watched only for the other DDMs that use them."""
        with self._lock:
            for users in self._users.values():
                users.discard(ddm_uid)

    def live(self, namespace: str, cluster: str | None) -> bool:
        return self._live.get((namespace, cluster), False)

    def watched(self, namespace: str) -> set[str]:
        """The member clusters of ``namespace`` whose watch is connected now."""
        return {c for (ns, c), up in list(self._live.items()) if ns == namespace and up and c is not None}

    def jobs(self, namespace: str, cluster: str | None, ddm_uid: str, client: Any) -> list[dict[str, Any]] | None:
        """The jobs of DDM ``ddm_uid`` in ``cluster`` as the watch last saw them; None when the index cannot be
        trusted: its watch is not connected or has not listed since it broke, or it was filled through another
        client than ``client``, the cluster's current one (its Secret changed). A watch just started is waited for
        (its first list, at most ``FIRST_LIST_WAIT_S``): one list for all DDMs rather than one per DDM's pass."""
        tried = self._tried.get((namespace, cluster))
        if tried is not None:
            tried.wait(FIRST_LIST_WAIT_S)
        with self._lock:
            index = self._index.get((namespace, cluster))
            if (namespace, cluster) not in self._synced or index is None or index.client is not client:
                return None
            return [index.jobs[u] for u in index.by_ddm.get(ddm_uid, ())]

    def record(self, namespace: str, cluster: str | None, job: dict[str, Any]) -> None:
        """A job this operator just created (the create's answer): in the index before the watch delivers it."""
        with self._lock:
            index = self._index.get((namespace, cluster))
            if (namespace, cluster) in self._synced and index is not None:
                index.put(job)

    def _in_use(self, key: Key) -> bool:
        with self._lock:
            if self._users.get(key):
                return True
            self._threads.pop(key, None)  # a later use() starts a new thread
            self._live.pop(key, None)
            self._index.pop(key, None)
            self._synced.discard(key)
            self._tried.pop(key, None)
            return False

    def _run(self, key: Key) -> None:
        from kubernetes import client, watch

        namespace, cluster = key
        seen: dict[str, str] = {}  # job uid -> phase, as child_wakes_parent keeps it
        delay = 0.5
        while self._in_use(key):
            try:
                api_client = self._client_for(namespace, cluster)
                custom = client.CustomObjectsApi(api_client)
                args = (self._backend.group, self._backend.version, namespace, self._backend.plural)
                listed = custom.list_namespaced_custom_object(*args, label_selector=b.LABEL_UID,
                                                              _request_timeout=REQUEST_TIMEOUT_S)
                self.lists += 1
                version = listed["metadata"]["resourceVersion"]
                index = _Index(api_client)
                present = {job["metadata"]["uid"] for job in listed.get("items") or []}
                with self._lock:  # the list replaces the index: what changed or went while we could not see
                    before = self._index.get(key)
                    gone = [j for u, j in (before.jobs.items() if before else ()) if u not in present]
                    if before is not None and before.client is api_client:  # keep creates newer than the list
                        for job in before.jobs.values():
                            if _version(job) > _version(listed):
                                index.put(job)
                    for job in listed.get("items") or []:
                        index.put(job)
                    self._index[key] = index
                    self._synced.add(key)
                self._first_try_done(key)
                for job in listed.get("items") or []:
                    self._event("MODIFIED", job, seen)  # after a break: what changed while we could not see
                for job in gone:  # deleted while we could not see: its DDM looks again
                    if _version(job) <= _version(listed):
                        self._event("DELETED", job, seen)
                for uid in set(seen) - present:
                    seen.pop(uid, None)
                if not self._live.get(key):
                    log.info("watching %ss of cluster %s in %s", self._backend.kind, cluster or "(own)", namespace)
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
                            with self._lock:  # the index first, then the wake-up: the pass it starts sees it
                                (index.drop if event["type"] == "DELETED" else index.put)(obj)
                            self._event(event["type"], obj, seen)
                        if not self._in_use(key):
                            break
                    if self._client_for(namespace, cluster) is not api_client:  # the Secret changed: list anew
                        break
            except Exception as exc:  # unreachable, refused, expired credentials, Secret gone: retry, poll meanwhile
                with self._lock:  # kept, to be compared with the next list; not served meanwhile
                    self._synced.discard(key)
                self._first_try_done(key)
                if self._live.get(key, True):
                    log.warning("watch of cluster %s in %s broke (%s: %s); the DDMs list it until it is back",
                                cluster or "(own)", namespace, type(exc).__name__, str(exc)[:200])
                    self._on_failure(namespace, cluster)
                self._live[key] = False
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)

    def _first_try_done(self, key: Key) -> None:
        tried = self._tried.get(key)
        if tried is not None:
            tried.set()

    def _event(self, event_type: str, job: dict[str, Any], seen: dict[str, str]) -> None:
        if self._wakes(event_type, job, seen):
            uid = ((job.get("metadata") or {}).get("labels") or {}).get(b.LABEL_UID)
            if uid:
                self._wake(uid)
