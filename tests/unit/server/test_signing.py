"""Signed endpoints and secure access: the tokens (pure), and the routes with a proxy whose
sandbox is an HTTP server on this host's loopback."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from opensandbox_platform.server.app import create_app
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import Endpoint
from opensandbox_platform.server.signing import Signer, SigningKey
from tests.unit.server.test_routes import MemoryRuntime

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
KEY1 = SigningKey("k1", b"1" * 32)
KEY2 = SigningKey("k2", b"2" * 32)
API_KEY = "the-api-key"


def test_route_token_is_bound_to_sandbox_port_and_expiry() -> None:
    signer = Signer([KEY1])
    later = int(NOW.timestamp()) + 60
    token = signer.route_token("sb1", 8080, later)
    signer.check_route("sb1", 8080, token, NOW)
    for sandbox, port, wanted in [("sb2", 8080, 401), ("sb1", 8081, 401)]:
        with pytest.raises(ApiError) as err:
            signer.check_route(sandbox, port, token, NOW)
        assert err.value.status == wanted
    forged = token.replace(str(later), str(later + 3600))  # a longer life than signed
    with pytest.raises(ApiError) as err:
        signer.check_route("sb1", 8080, forged, NOW)
    assert err.value.status == 401
    with pytest.raises(ApiError) as err:
        signer.check_route("sb1", 8080, token, NOW + dt.timedelta(seconds=61))
    assert err.value.status == 403 and err.value.code == "SANDBOX::SIGNATURE_EXPIRED"
    for garbage in ("", "x", f"{later}.k1.short", f"{later}.k9.{'A' * 43}"):
        with pytest.raises(ApiError) as err:
            signer.check_route("sb1", 8080, garbage, NOW)
        assert err.value.status == 401


def test_rotation_overlap_then_retirement() -> None:
    old = Signer([KEY1])
    token = old.route_token("sb1", 80, int(NOW.timestamp()) + 600)
    access = old.access_token("sb1")
    retiring = SigningKey("k1", KEY1.secret, retire_at=NOW + dt.timedelta(hours=1))
    rotated = Signer([KEY2, retiring])
    assert rotated.route_token("sb1", 80, 1).split(".")[1] == "k2"  # the new key signs
    rotated.check_route("sb1", 80, token, NOW)  # the old one still verifies
    rotated.check_access("sb1", access, NOW)
    with pytest.raises(ApiError):
        rotated.check_access("sb1", access, NOW + dt.timedelta(hours=2))  # retired
    with pytest.raises(ApiError):
        Signer([KEY2]).check_access("sb1", access, NOW)  # removed
    with pytest.raises(ValueError):
        Signer([retiring])


def test_access_token_is_the_sandboxs_own() -> None:
    signer = Signer([KEY1])
    signer.check_access("sb1", signer.access_token("sb1"), NOW)
    with pytest.raises(ApiError):
        signer.check_access("sb2", signer.access_token("sb1"), NOW)


# --- the routes ----------------------------------------------------------------------------------------------


class Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.path} key={self.headers.get('open-sandbox-api-key')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None: ...


class LoopbackRuntime(MemoryRuntime):
    """Every port of every sandbox is the echo server; sandbox `s` has secureAccess."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.add("a", "Running", {}, 1)
        self.add("s", "Running", {}, 2)
        self.sandboxes["s"].secure_access = True

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        info = await self.get(sandbox_id)
        return Endpoint(f"127.0.0.1:{self.port}", secure_access=info.secure_access)


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def client(echo_port: int) -> Iterator[TestClient]:
    config = Config.model_validate({"server": {"apiKey": API_KEY, "signingKeys": [{"id": "k1", "secret": "s" * 32}]}})
    with TestClient(create_app(config, LoopbackRuntime(echo_port)), headers={"OPEN-SANDBOX-API-KEY": API_KEY}) as c:
        yield c


def _path(endpoint: str) -> str:
    return endpoint.split("testserver", 1)[1]


def test_signed_endpoint_works_without_the_api_key_until_it_expires(client: TestClient) -> None:
    expires = int(time.time()) + 3
    endpoint = client.get(f"/v1/sandboxes/a/endpoints/8080?expires={expires}").json()["endpoint"]
    assert "/v1/sandboxes/a/signed/8080/" in endpoint
    path = _path(endpoint)
    response = client.get(path + "/hello?x=1", headers={"OPEN-SANDBOX-API-KEY": ""})
    assert response.status_code == 200 and response.text == "/hello?x=1 key=None"  # no key travels inside
    # Another sandbox's signature, another port, a tampered token: 401.
    assert client.get(path.replace("/a/", "/s/"), headers={"OPEN-SANDBOX-API-KEY": ""}).status_code == 401
    assert client.get(path.replace("/8080/", "/8081/"), headers={"OPEN-SANDBOX-API-KEY": ""}).status_code == 401
    tampered = path[:-1] + ("A" if path[-1] != "A" else "B")
    assert client.get(tampered, headers={"OPEN-SANDBOX-API-KEY": ""}).json()["code"] == "SANDBOX::INVALID_SIGNATURE"
    time.sleep(max(0.0, expires - time.time()) + 0.1)
    expired = client.get(path, headers={"OPEN-SANDBOX-API-KEY": ""})
    assert expired.status_code == 403 and expired.json()["code"] == "SANDBOX::SIGNATURE_EXPIRED"


@pytest.mark.parametrize("expires", ["0", "-5", "soon", "99999999999999", str(int(time.time()) + 8 * 86400)])
def test_bad_expires_is_400(client: TestClient, expires: str) -> None:
    response = client.get(f"/v1/sandboxes/a/endpoints/8080?expires={expires}")
    assert response.status_code == 400 and response.json()["code"] == "SANDBOX::INVALID_EXPIRATION"


def test_signed_endpoint_of_an_unknown_sandbox_is_404(client: TestClient) -> None:
    assert client.get(f"/v1/sandboxes/zz/endpoints/80?expires={int(time.time()) + 60}").status_code == 404


def test_secure_sandbox_endpoints_go_through_the_server_with_a_token(client: TestClient) -> None:
    direct = client.get("/v1/sandboxes/s/endpoints/44772").json()
    assert direct["endpoint"] == "testserver/v1/sandboxes/s/proxy/44772"
    token = direct["headers"]["OpenSandbox-Secure-Access"]
    assert client.get("/v1/sandboxes/s/endpoints/44772?use_server_proxy=true").json()["headers"] == direct["headers"]
    ok = client.get(
        "/v1/sandboxes/s/proxy/44772/ping", headers={"OPEN-SANDBOX-API-KEY": "", "OpenSandbox-Secure-Access": token}
    )
    assert ok.status_code == 200
    # The API key alone is not enough for a secureAccess sandbox.
    refused = client.get("/v1/sandboxes/s/proxy/44772/ping")
    assert refused.status_code == 403 and refused.json()["code"] == "SANDBOX::SECURE_ACCESS_REQUIRED"
    # Its token does not open another sandbox, even one without secureAccess.
    other = client.get(
        "/v1/sandboxes/a/proxy/44772/ping", headers={"OPEN-SANDBOX-API-KEY": "", "OpenSandbox-Secure-Access": token}
    )
    assert other.status_code == 401
    # A sandbox without secureAccess keeps its direct endpoint and the API-key proxy.
    assert client.get("/v1/sandboxes/a/endpoints/44772").json()["endpoint"].startswith("127.0.0.1:")
    assert client.get("/v1/sandboxes/a/proxy/44772/ping").status_code == 200
    assert client.get("/v1/sandboxes/a/proxy/44772/ping", headers={"OPEN-SANDBOX-API-KEY": ""}).status_code == 401
