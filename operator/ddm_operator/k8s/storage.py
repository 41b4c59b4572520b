"""The run store in a cluster: which storage a DDM may use there, and the operator's own clients of it.

Stages of a DDM run in different pods, on different nodes, maybe in different clusters, so their store must be shared:
``s3://`` (any S3-compatible server), or ``file:///mnt/ddm/...`` on ``spec.storage.volumeClaim``, a ReadWriteMany
PersistentVolumeClaim that every stage's pods mount at ``/mnt/ddm``. A ``file://`` (or plain path) store without a
volume is refused (``check_storage``): each pod would write to its own filesystem and the next stage would find
nothing. ``DDM_ALLOW_UNSHARED_FILE_STORAGE=1`` lifts that for an operator whose stages share its host's filesystem
(the integration tests, which play the stages' pods on the machine that runs the operator).

The operator reads a run's store (progress, the evaluation's table) with the run's ``credentialsSecret``, the Secret
the stage pods get as env, never with its own identity unless the installer says so (``DDM_STORE_POD_IDENTITY=1``:
a Secret without keys then means "the operator's pod identity", IRSA or instance role, as the stages use theirs).
``StoreClients`` re-reads the Secret at most every ``SECRET_RECHECK_S`` seconds (one GET, by name: RBAC grants
``get`` only) and builds a new client when its resourceVersion changed, so rotated keys are used at once, without a
restart. Pods read the Secret at start: every stage started after a rotation gets the new keys.
"""
from __future__ import annotations

import base64
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from ddm_trainer.errors import ConfigError
from ddm_trainer.store import Store, credentials_kind, open_store, s3_credentials

from .. import stages
from ..api.models import STORE_MOUNT_PATH, DecentralizedDiffusionSpec

ALLOW_UNSHARED_ENV = "DDM_ALLOW_UNSHARED_FILE_STORAGE"
POD_IDENTITY_ENV = "DDM_STORE_POD_IDENTITY"
SECRET_RECHECK_S = float(os.environ.get("DDM_SECRET_RECHECK_S", "2"))
STATIC_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINT_KEYS = ("DDM_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION")
log = logging.getLogger("ddm_operator")
# The operator's reads of a store are advisory (progress, results) and made inside the reconcile passes that launch
# the next stages, so a store that does not answer may cost a pass seconds, never minio's default for a stage: 5
# retries with backoff (6 s for a refused connection: every pass of every DDM on that store during an outage) and a
# 300 s connect timeout (an endpoint whose packets are dropped). The caller rests a store that failed (handlers).
OPERATOR_S3_CONNECT_S, OPERATOR_S3_READ_S = 3.0, 15.0


@functools.cache
def operator_http_client() -> Any:
    """One ``urllib3.PoolManager`` for every store the operator reads: short timeouts, one retry without backoff,
    TLS verified as minio's own client does (``SSL_CERT_FILE`` or certifi's bundle)."""
    import certifi
    from urllib3 import PoolManager, Retry, Timeout

    return PoolManager(timeout=Timeout(connect=OPERATOR_S3_CONNECT_S, read=OPERATOR_S3_READ_S), maxsize=16,
                       cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
                       retries=Retry(total=1, backoff_factor=0, status_forcelist=[500, 502, 503, 504]))


class StorageNotShared(ValueError):
    """spec.storage cannot be shared by a cluster's stages (permanent until the spec changes)."""


def check_storage(spec: DecentralizedDiffusionSpec, environ: Mapping[str, str] | None = None) -> None:
    """Raise StorageNotShared, saying why and what to use instead, for a store the stages could not share."""
    storage = spec.storage
    if storage.uri.startswith("s3://") or storage.volume_claim is not None:
        return
    if (os.environ if environ is None else environ).get(ALLOW_UNSHARED_ENV) == "1":
        return
    raise StorageNotShared(
        f"spec.storage.uri {storage.uri!r} is a path on one machine, but each stage runs in its own pod, maybe on "
        f"another node: the next stage would not find what the last one wrote. Use an s3:// uri (with "
        f"credentialsSecret), or set spec.storage.volumeClaim to a ReadWriteMany PersistentVolumeClaim (mounted at "
        f"{STORE_MOUNT_PATH} in every stage) with uri file://{STORE_MOUNT_PATH}/...; no job was created")


def secret_env(data: Mapping[str, str] | None) -> dict[str, str]:
    """A Secret's ``data`` (base64) as the environment a pod gets from it with ``envFrom``."""
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


def operator_credentials(env: Mapping[str, str], environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], Any]:
    """(environment, minio provider) with which the operator reads a store whose Secret holds ``env``.

    The Secret's own credentials when it has them (static keys, session token). Otherwise the operator's pod identity
    (its process environment: web identity, container credentials, instance role) only if ``DDM_STORE_POD_IDENTITY``
    is 1; else ConfigError: whoever may create a DDM must not read buckets with the operator's rights.
    """
    environ = os.environ if environ is None else environ
    if any(env.get(k) for k in STATIC_KEYS):
        return dict(env), s3_credentials(env)  # ConfigError for half a key pair
    if environ.get(POD_IDENTITY_ENV) != "1":
        raise ConfigError(
            f"the store's credentials Secret has no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and the operator does not "
            f"use its own pod identity ({POD_IDENTITY_ENV} is not 1): progress and results cannot be read")
    own = {k: v for k, v in environ.items() if k.startswith("AWS_") and k not in ENDPOINT_KEYS}
    merged = {**{k: v for k, v in environ.items() if k in ENDPOINT_KEYS}, **env}
    return merged, s3_credentials(own)


@dataclass
class _Entry:
    store: Store
    version: str  # the Secret's resourceVersion the client was built from ("" without a Secret)
    checked: float  # monotonic time of the last Secret read


class StoreClients:
    """The operator's store per run, rebuilt when its credentials Secret changes (thread-safe)."""

    def __init__(self, recheck_s: float = SECRET_RECHECK_S) -> None:
        self.recheck_s = recheck_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, core: Any, spec: DecentralizedDiffusionSpec, namespace: str, name: str) -> Store:
        """The run's store; ``core`` (a core_api.CoreApi) reads the Secret, by name, in the DDM's namespace."""
        run = stages.run_uri(spec, namespace, name)
        secret = spec.storage.credentials_secret if run.startswith("s3://") else None
        key = f"{run}|{namespace}/{secret or ''}"
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and (secret is None or now - entry.checked < self.recheck_s):
            return entry.store
        if secret is None:
            if run.startswith("s3://"):
                env, provider = operator_credentials({})
                store = open_store(run, check_bucket=False, env=env, credentials=provider,
                                   http_client=operator_http_client())
            else:
                store = open_store(run, check_bucket=False)
            version = ""
        else:
            obj = core.read_namespaced_secret(secret, namespace)
            version = (obj.get("metadata") or {}).get("resourceVersion") or ""
            if entry is not None and entry.version == version:
                store = entry.store
            else:
                env, provider = operator_credentials(secret_env(obj.get("data") or {}))
                store = open_store(run, check_bucket=False, env=env, credentials=provider,
                                   http_client=operator_http_client())
                log.info("store %s: credentials from Secret %s/%s (resourceVersion %s, %s)", run, namespace, secret,
                         version, credentials_kind(provider))
        with self._lock:
            self._entries[key] = _Entry(store=store, version=version, checked=now)
        return store
