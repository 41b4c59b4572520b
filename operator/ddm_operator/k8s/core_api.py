"""The few core/v1 requests the operator makes (Secrets, ConfigMaps, Pods, Events), answered as plain dicts.

kubernetes' generated ``CoreV1Api`` imports, for its type annotations, every model any of its 400 methods names:
252 modules and 20 MiB of the operator's resident memory (measured on kubernetes 37.0.2 in the 100 x 8 fleet run,
bench/fleet.py), for seven requests whose answers we read as dicts anyway. This sends the same requests through the
same ``ApiClient`` (its configuration, authentication, connection pool and ``ApiException`` on a non-2xx answer),
with the response type ``object``, i.e. the JSON as it came, as ``CustomObjectsApi`` does for our own resources.
Keyword arguments other than the selectors are the client's per-request options (``_request_timeout``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["CoreApi"]

_ANSWERS = {"200": "object", "201": "object", "202": "object"}


class CoreApi:
    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def _request(self, method: str, path: str, namespace: str, name: str | None = None,
                 query: dict[str, str | None] | None = None, body: Any = None,
                 _request_timeout: Any = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        path_params = {"namespace": namespace, **({"name": name} if name is not None else {})}
        request = self.api_client.param_serialize(
            method=method, resource_path=path, path_params=path_params,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api_client.call_api(*request, _request_timeout=_request_timeout)
        response.read()
        return self.api_client.response_deserialize(response, _ANSWERS).data  # raises ApiException on non-2xx

    def read_namespaced_secret(self, name: str, namespace: str, **kw: Any) -> dict[str, Any]:
        return self._request("GET", "/api/v1/namespaces/{namespace}/secrets/{name}", namespace, name, **kw)

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self._request("POST", "/api/v1/namespaces/{namespace}/configmaps", namespace, body=body, **kw)

    def read_namespaced_config_map(self, name: str, namespace: str, **kw: Any) -> dict[str, Any]:
        return self._request("GET", "/api/v1/namespaces/{namespace}/configmaps/{name}", namespace, name, **kw)

    def delete_collection_namespaced_config_map(self, namespace: str, label_selector: str,
                                                **kw: Any) -> dict[str, Any]:
        return self._request("DELETE", "/api/v1/namespaces/{namespace}/configmaps", namespace,
                             query={"labelSelector": label_selector}, **kw)

    def list_namespaced_pod(self, namespace: str, label_selector: str | None = None, **kw: Any) -> dict[str, Any]:
        return self._request("GET", "/api/v1/namespaces/{namespace}/pods", namespace,
                             query={"labelSelector": label_selector}, **kw)

    def list_namespaced_event(self, namespace: str, field_selector: str | None = None, **kw: Any) -> dict[str, Any]:
        return self._request("GET", "/api/v1/namespaces/{namespace}/events", namespace,
                             query={"fieldSelector": field_selector}, **kw)
