"""S3 credentials: which minio provider each environment selects (store.s3_credentials), and the chain's temporary
links fetching real keys from a loopback credentials endpoint (the ECS / EKS Pod Identity protocol)."""
from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from minio.credentials import IamAwsProvider, StaticProvider

from ddm_trainer.errors import ConfigError
from ddm_trainer.store import _minio_client, credentials_kind, s3_credentials

AWS_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_REGION", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
             "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """IamAwsProvider reads AWS_* from the process environment first: none of the session's may leak in."""
    for name in AWS_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_static_keys() -> None:
    provider = s3_credentials({"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
    assert isinstance(provider, StaticProvider)
    creds = provider.retrieve()
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("id", "secret", None)
    assert credentials_kind(provider) == "static keys"


def test_session_token_rides_with_the_keys() -> None:
    provider = s3_credentials({"AWS_ACCESS_KEY_ID": "ASIA1", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "tok"})
    assert isinstance(provider, StaticProvider) and provider.retrieve().session_token == "tok"
    assert credentials_kind(provider) == "session token"


def test_static_keys_win_over_web_identity(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "token"), "AWS_ROLE_ARN": "arn:aws:iam::1:role/r"}
    assert isinstance(s3_credentials(env), StaticProvider)


@pytest.mark.parametrize(("env", "missing"), [
    ({"AWS_ACCESS_KEY_ID": "id"}, "AWS_SECRET_ACCESS_KEY"),
    ({"AWS_SECRET_ACCESS_KEY": "s"}, "AWS_ACCESS_KEY_ID"),
])
def test_half_a_key_pair_is_a_config_error(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError, match=f"{missing} is unset"):
        s3_credentials(env)


def test_web_identity_irsa(tmp_path: Path) -> None:
    token = tmp_path / "token"
    env = {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": "arn:aws:iam::123:role/ddm",
           "AWS_ROLE_SESSION_NAME": "expert-003", "AWS_REGION": "eu-west-1",
           "AWS_ENDPOINT_URL_STS": "https://sts.example"}
    provider = s3_credentials(env)
    assert isinstance(provider, IamAwsProvider) and credentials_kind(provider) == "web identity"
    assert (provider._identity_file, provider._role_arn, provider._role_session_name, provider._aws_region,
            provider._custom_endpoint) == (str(token), "arn:aws:iam::123:role/ddm", "expert-003", "eu-west-1",
                                           "https://sts.example")


def test_web_identity_needs_a_role(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs AWS_ROLE_ARN"):
        s3_credentials({"AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "token")})


def test_container_credentials_and_instance_role() -> None:
    full = s3_credentials({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"})
    relative = s3_credentials({"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc"})
    assert credentials_kind(full) == credentials_kind(relative) == "container credentials"
    assert relative._relative_uri == "/v2/credentials/abc"
    instance = s3_credentials({"DDM_S3_ENDPOINT": "https://s3.example"})
    assert isinstance(instance, IamAwsProvider) and credentials_kind(instance) == "instance role"


class _CredentialsEndpoint(BaseHTTPRequestHandler):
    """The container credentials protocol: GET with the Authorization token -> temporary keys as JSON."""

    requests: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        body = json.dumps({"AccessKeyId": "ASIATEMP", "SecretAccessKey": "temp-secret", "Token": "temp-token",
                           "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def credentials_endpoint() -> Iterator[str]:
    _CredentialsEndpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), _CredentialsEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_container_credentials_fetched_into_the_client(credentials_endpoint: str, tmp_path: Path) -> None:
    """EKS Pod Identity: the agent's URI and a token file the kubelet rotates."""
    (tmp_path / "token").write_text("pod-token")
    env = {"DDM_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{credentials_endpoint}/creds",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(tmp_path / "token")}
    client = _minio_client(env)
    creds = client._provider.retrieve()
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("ASIATEMP", "temp-secret", "temp-token")
    assert _CredentialsEndpoint.requests == [{"path": "/creds", "authorization": "pod-token"}]
    client._provider.retrieve()  # cached until they expire
    assert len(_CredentialsEndpoint.requests) == 1
