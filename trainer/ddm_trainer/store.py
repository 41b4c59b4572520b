"""One artifact store over a run URI: a local directory (``file:///...`` or a plain path) or ``s3://bucket/prefix``.

Commit protocol: a stage writes its data objects first and a small ``MANIFEST.json`` last. A reader trusts only
what a manifest names, so a crash mid-write leaves either the previous committed state or the new one, never a
half-written one. Each single object write is itself atomic (rename on disk; S3 PUTs are atomic).

S3 endpoint and credentials come from the environment, as a pod gets them from a Secret:
``DDM_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; ``http://`` means no TLS), optional
``AWS_REGION``, and the first of these credentials that the environment names (``s3_credentials``):

1. static keys: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``, with ``AWS_SESSION_TOKEN`` for temporary ones;
2. web identity (EKS IRSA and the like): ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` (optional
   ``AWS_ROLE_SESSION_NAME``; the STS endpoint is ``AWS_ENDPOINT_URL_STS``, else AWS's for ``AWS_REGION``), the
   token file re-read whenever the temporary keys expire;
3. container credentials (ECS, EKS Pod Identity): ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` or ``..._RELATIVE_URI``;
4. otherwise the instance role (EC2 instance metadata).

Each is the minio SDK's own provider (``minio.credentials``); 2-4 renew their temporary keys before they expire.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

from .errors import ConfigError, MissingArtifactError, StoreError

MANIFEST = "MANIFEST.json"


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store(ABC):
    """Keys are '/'-separated paths relative to the store's root."""

    uri: str

    # -- primitives ----------------------------------------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raises MissingArtifactError naming the URI when the key is absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def child(self, prefix: str) -> "Store": ...

    @abstractmethod
    def local_path(self) -> Path | None:
        """The directory behind a file store, None for object stores."""

    def url(self, key: str = "") -> str:
        return self.uri.rstrip("/") + ("/" + key.strip("/") if key else "")

    # -- conveniences --------------------------------------------------------------------------------------------
    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.get_bytes(key))
        return out

    # -- commit protocol -----------------------------------------------------------------------------------------
    def commit(self, prefix: str, files: dict[str, bytes], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``files`` under ``prefix``, then the manifest naming them (sizes and sha256) last."""
        entries = {}
        for name, data in files.items():
            self.put_bytes(_join(prefix, name), data)
            entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"files": entries, "committed_at": time.time(), **(meta or {})}
        self.put_json(_join(prefix, MANIFEST), manifest)
        return manifest

    def read_manifest(self, prefix: str) -> dict[str, Any] | None:
        """The manifest under ``prefix``, or None when nothing was committed there."""
        key = _join(prefix, MANIFEST)
        if not self.exists(key):
            return None
        return self.get_json(key)

    def read_committed(self, prefix: str, name: str, verify: bool = True) -> bytes:
        """A file that the manifest under ``prefix`` names; checks its hash so torn writes are never trusted."""
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise MissingArtifactError(f"no committed manifest at {self.url(prefix)}")
        if name not in manifest["files"]:
            raise MissingArtifactError(f"{self.url(_join(prefix, name))} is not named by its manifest")
        data = self.get_bytes(_join(prefix, name))
        if verify and hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
            raise MissingArtifactError(f"{self.url(_join(prefix, name))} does not match its manifest hash")
        return data

    def committed_prefixes(self, parent: str) -> list[str]:
        """Sub-prefixes of ``parent`` that hold a manifest, sorted (e.g. checkpoints ``step-00000100``)."""
        out = set()
        for key in self.list(parent):
            rel = key[len(parent.strip("/")) :].strip("/") if parent else key
            parts = rel.split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                out.add(_join(parent, parts[0]))
        return sorted(out)


class FileStore(Store):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).absolute()
        self.uri = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key.strip("/") if key.strip("/") else self.root

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old object or the new one
        except OSError as e:
            raise StoreError(f"cannot write {self.url(key)}: {e.strerror or e}") from e

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise MissingArtifactError(f"{self.url(key)} does not exist") from None
        except IsADirectoryError:
            raise MissingArtifactError(f"{self.url(key)} is a directory, not a file") from None
        except OSError as e:
            raise StoreError(f"cannot read {self.url(key)}: {e.strerror or e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        if base.is_file():
            return [prefix.strip("/")]
        keys = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.endswith(".tmp"):
                keys.append(p.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def child(self, prefix: str) -> "FileStore":
        return FileStore(self._path(prefix))

    def local_path(self) -> Path:
        return self.root


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", client: Any = None, check_bucket: bool = True):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client if client is not None else _minio_client()
        if check_bucket:
            try:
                found = self.client.bucket_exists(bucket)
            except Exception as e:  # network errors: retryable
                raise StoreError(f"cannot reach the object store for {self.uri}: {e}") from e
            if not found:
                raise ConfigError(f"bucket '{bucket}' does not exist (store URI {self.uri})")

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))
        except Exception as e:
            raise StoreError(f"cannot write {self.url(key)}: {e}") from e

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, self._key(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise MissingArtifactError(f"{self.url(key)} does not exist") from None
            raise StoreError(f"cannot read {self.url(key)}: {e}") from e
        except Exception as e:
            raise StoreError(f"cannot read {self.url(key)}: {e}") from e

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._key(key))
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"):
                return False
            raise StoreError(f"cannot stat {self.url(key)}: {e}") from e
        except Exception as e:
            raise StoreError(f"cannot stat {self.url(key)}: {e}") from e

    def _iter(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix)
        if full:
            full += "/"
        try:
            for obj in self.client.list_objects(self.bucket, prefix=full or None, recursive=True):
                name = obj.object_name
                yield name[len(self.prefix) :].lstrip("/") if self.prefix else name
        except Exception as e:
            raise StoreError(f"cannot list {self.url(prefix)}: {e}") from e

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._iter(prefix))

    def delete_prefix(self, prefix: str) -> None:
        from minio.deleteobjects import DeleteObject

        keys = [DeleteObject(self._key(k)) for k in self._iter(prefix)]
        if keys:
            errors = list(self.client.remove_objects(self.bucket, keys))
            if errors:
                raise StoreError(f"cannot delete under {self.url(prefix)}: {errors[0]}")

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self.bucket, _join(self.prefix, prefix), client=self.client, check_bucket=False)

    def local_path(self) -> None:
        return None


# Instance metadata answers in milliseconds where it exists; elsewhere fail in seconds rather than minutes.
_METADATA_TIMEOUT_S = 2.0


def s3_credentials(env: Mapping[str, str]) -> Any:
    """The minio credentials provider the environment ``env`` selects (module docstring: first match wins).

    Raises ConfigError for a half-given choice (a key id without its secret, a token file without a role), which no
    retry can fix. Web identity, container credentials and the instance role go through ``IamAwsProvider``, which
    reads the same ``AWS_*`` names from the process environment first (for a pod, the same environment).
    """
    from minio.credentials import IamAwsProvider, StaticProvider
    from urllib3 import PoolManager, Retry, Timeout

    key_id = env.get("AWS_ACCESS_KEY_ID") or ""
    secret = env.get("AWS_SECRET_ACCESS_KEY") or ""
    if key_id or secret:
        if not (key_id and secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
            raise ConfigError(f"S3 static credentials need both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: {missing} is unset")
        return StaticProvider(key_id, secret, env.get("AWS_SESSION_TOKEN") or None)
    http = PoolManager(timeout=Timeout(connect=_METADATA_TIMEOUT_S, read=_METADATA_TIMEOUT_S),
                       retries=Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    region = env.get("AWS_REGION") or None
    token_file = env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if token_file:
        role = env.get("AWS_ROLE_ARN")
        if not role:
            raise ConfigError(f"AWS_WEB_IDENTITY_TOKEN_FILE ({token_file}) needs AWS_ROLE_ARN, the role to assume")
        return IamAwsProvider(token_file=token_file, role_arn=role, role_session_name=env.get("AWS_ROLE_SESSION_NAME"),
                              region=region, custom_endpoint=env.get("AWS_ENDPOINT_URL_STS"), http_client=http)
    full, relative = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"), env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if full or relative:
        # minio 7.2 takes its auth_token argument as the token *file* (EKS Pod Identity's); a token value it reads
        # from the process environment (AWS_CONTAINER_AUTHORIZATION_TOKEN) itself
        return IamAwsProvider(full_uri=full, relative_uri=relative, http_client=http,
                              auth_token=env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"))
    return IamAwsProvider(region=region, http_client=http)


def credentials_kind(provider: Any) -> str:
    """A word for logs and messages: which link of the chain ``s3_credentials`` chose."""
    from minio.credentials import StaticProvider

    if isinstance(provider, StaticProvider):
        return "session token" if provider.retrieve().session_token else "static keys"
    if getattr(provider, "_identity_file", None):
        return "web identity"
    if getattr(provider, "_full_uri", None) or getattr(provider, "_relative_uri", None):
        return "container credentials"
    return "instance role"


def _minio_client(env: Mapping[str, str] | None = None, credentials: Any = None, http_client: Any = None) -> Any:
    """A client from ``env`` (default: the process environment; the operator passes a Secret's data instead).

    ``credentials``: a minio provider to use instead of the one ``s3_credentials(env)`` selects. ``http_client``: a
    ``urllib3.PoolManager`` instead of minio's own (5 retries with backoff, 300 s timeouts: right for a stage).
    """
    from minio import Minio

    env = os.environ if env is None else env
    endpoint = env.get("DDM_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise ConfigError("s3:// store needs an endpoint: set DDM_S3_ENDPOINT (e.g. http://127.0.0.1:8333)")
    parsed = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
    if not parsed.netloc:
        raise ConfigError(f"DDM_S3_ENDPOINT is not a host[:port] URL: {endpoint!r}")
    return Minio(
        parsed.netloc,
        credentials=credentials if credentials is not None else s3_credentials(env),
        region=env.get("AWS_REGION") or None,
        secure=parsed.scheme == "https",
        http_client=http_client,
    )


def open_store(uri: str, check_bucket: bool = True, env: Mapping[str, str] | None = None,
               credentials: Any = None, http_client: Any = None) -> Store:
    """``file:///abs/dir``, a plain local path, or ``s3://bucket[/prefix]``.

    ``env`` supplies the S3 endpoint and credentials (same names as the environment variables) instead of
    ``os.environ``: the operator reads them from the run's credentials Secret. ``credentials``: a minio provider
    that replaces the one ``env`` selects; ``http_client``: the connections' pool, timeouts and retries.
    """
    if not uri or not isinstance(uri, str):
        raise ConfigError(f"store URI must be a non-empty string, got {uri!r}")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"s3 URI has no bucket: {uri!r}")
        client = _minio_client(env, credentials, http_client) \
            if env is not None or credentials is not None or http_client is not None else None
        return S3Store(parsed.netloc, parsed.path, client=client, check_bucket=check_bucket)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file URI must be file:///absolute/path, got {uri!r}")
        return FileStore(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return FileStore(uri)
    raise ConfigError(f"unsupported store URI scheme {parsed.scheme!r} in {uri!r} (use file:// or s3://)")
