"""Clients for other clusters: a kubeconfig read from a Secret in the DDM's namespace, checked, and cached.

A kubeconfig is code-adjacent: ``exec`` and ``auth-provider`` run programs in the operator's pod, file paths
(``tokenFile``, ``client-certificate``, ...) read the operator's own files (its ServiceAccount token), and
``insecure-skip-tls-verify`` hands the credentials to whoever answers. All of these are rejected; the Secret must
carry inline data (``certificate-authority-data``, ``client-certificate-data``/``client-key-data`` or ``token``).
"""
from __future__ import annotations

import base64
import os
import threading
import time
from typing import Any

import yaml

from ddm_trainer.errors import ConfigError

SECRET_KEYS = ("kubeconfig", "config", "value")  # the first present one is used
FORBIDDEN_USER_FIELDS = ("exec", "auth-provider", "tokenFile", "token-file", "client-certificate", "client-key",
                         "username", "password")
FORBIDDEN_CLUSTER_FIELDS = ("insecure-skip-tls-verify", "certificate-authority")
REQUEST_RETRIES = 1
POOL_SIZE = 64
INVALIDATE_MIN_S = 1.0  # after a failed request, the Secret is read again at most this often


def validate_kubeconfig(config: Any, where: str) -> dict[str, Any]:
    """Return the kubeconfig if it is safe to use, else ConfigError naming ``where`` and the field."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: kubeconfig is not a YAML mapping")
    clusters = config.get("clusters") or []
    users = config.get("users") or []
    if not clusters or not config.get("contexts"):
        raise ConfigError(f"{where}: kubeconfig has no clusters or contexts")
    for entry in clusters:
        cluster = (entry or {}).get("cluster") or {}
        for bad in FORBIDDEN_CLUSTER_FIELDS:
            if cluster.get(bad):
                raise ConfigError(f"{where}: cluster {entry.get('name')!r} uses {bad!r}, which is not allowed")
        if not str(cluster.get("server", "")).startswith("https://"):
            raise ConfigError(f"{where}: cluster {entry.get('name')!r} server must be https://")
    for entry in users:
        user = (entry or {}).get("user") or {}
        for bad in FORBIDDEN_USER_FIELDS:
            if bad in user:
                raise ConfigError(f"{where}: user {entry.get('name')!r} uses {bad!r}, which is not allowed")
    return config


def kubeconfig_from_secret_data(data: dict[str, str], where: str) -> dict[str, Any]:
    """Decode a Secret's ``data`` (base64 values) into a checked kubeconfig."""
    for key in SECRET_KEYS:
        if key in (data or {}):
            try:
                text = base64.b64decode(data[key], validate=True).decode()
                parsed = yaml.safe_load(text)
            except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ConfigError(f"{where}: key {key!r} is not a base64 YAML kubeconfig ({exc})") from None
            return validate_kubeconfig(parsed, where)
    raise ConfigError(f"{where}: Secret has none of the keys {', '.join(SECRET_KEYS)}")


class ClusterClients:
    """One kubernetes ApiClient per (namespace, Secret, resourceVersion): a rotated Secret gets a new client. The
    Secret is read again at most every ``recheck_s`` seconds (DDM_SECRET_RECHECK_S, as for the store's Secret): a
    pass that creates K jobs in a member cluster reads it once, not K times; a failed request makes the next use read it
    again (``invalidate``)."""

    def __init__(self, recheck_s: float = float(os.environ.get("DDM_SECRET_RECHECK_S", "2"))) -> None:
        self.recheck_s = recheck_s
        self._clients: dict[tuple[str, str], tuple[str, Any, float]] = {}
        self._reading: dict[tuple[str, str], threading.Lock] = {}  # held while a thread reads that Secret
        self._lock = threading.Lock()

    def get(self, core_api: Any, namespace: str, secret_name: str) -> Any:
        """The ApiClient for the cluster in ``namespace/secret_name`` (read with ``core_api``, a core_api.CoreApi)."""
        from kubernetes import client as k8s_client
        from kubernetes import config as k8s_config

        where = f"Secret {namespace}/{secret_name}"
        with self._lock:
            cached = self._clients.get((namespace, secret_name))
            reading = self._reading.setdefault((namespace, secret_name), threading.Lock())
        now = time.monotonic()
        if cached and now - cached[2] < self.recheck_s:
            return cached[1]
        if cached and not reading.acquire(blocking=False):
            return cached[1]  # another thread is reading the Secret right now: one GET per recheck, not one per caller
        try:
            if not cached:
                reading.acquire()
            try:
                secret = core_api.read_namespaced_secret(secret_name, namespace)
            except k8s_client.ApiException as exc:
                if exc.status == 404:
                    raise ConfigError(f"{where}: not found (spec placement.targetCluster)") from None
                raise
        finally:
            reading.release()
        version = (secret.get("metadata") or {}).get("resourceVersion") or ""
        with self._lock:  # the newest entry: another thread may have made this version's client meanwhile
            cached = self._clients.get((namespace, secret_name)) or cached
            if cached and cached[0] == version:
                self._clients[(namespace, secret_name)] = (version, cached[1], now)
                return cached[1]
        config = kubeconfig_from_secret_data(secret.get("data") or {}, where)
        configuration = k8s_client.Configuration()
        # urllib3 retries a timed-out GET or DELETE 3 times by default: with the callers' per-request timeout that
        # would make a dead member cost four timeouts per request; one retry covers a dropped connection.
        configuration.retries = REQUEST_RETRIES
        configuration.connection_pool_maxsize = POOL_SIZE  # passes x launch threads at once, as for our own cluster
        api_client = k8s_config.new_client_from_config_dict(config, client_configuration=configuration)
        with self._lock:  # one client per Secret version, whoever made it first: the job index is tied to it
            held = self._clients.get((namespace, secret_name))
            if held and held[0] == version:
                return held[1]
            self._clients[(namespace, secret_name)] = (version, api_client, now)
        return api_client

    def invalidate(self, namespace: str, secret_name: str) -> None:
        """A request with this Secret's client failed (refused, timed out, 401): its next use reads the Secret again
        at once, so a Secret fixed after expired credentials is picked up on the next pass, not after recheck_s;
        but not again within ``INVALIDATE_MIN_S`` of the last read, however many passes fail meanwhile (a member
        down 5 minutes at 100 DDMs x K=8 made their passes read its Secret 4,239 times, 14 a second)."""
        with self._lock:
            cached = self._clients.get((namespace, secret_name))
            if cached and time.monotonic() - cached[2] >= INVALIDATE_MIN_S:
                self._clients[(namespace, secret_name)] = (cached[0], cached[1], float("-inf"))

    def cached(self) -> int:
        return len(self._clients)
