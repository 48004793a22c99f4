"""The web console's server side with an in-memory runtime: the signed session cookie, what a
visitor without it gets, the login's cookie, CSRF and Origin checks, the CSP, the config switches.
(The page itself, its terminal and the abuse of both in a real browser: tests/e2e/test_console.py.)"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from opensandbox_platform.server.app import create_app
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.console.session import COOKIE, Signer
from opensandbox_platform.server.runtimes.base import Endpoint
from opensandbox_platform.server.signing import SECURE_ACCESS_HEADER
from tests.unit.server.test_routes import MemoryRuntime

KEY = "the-key"


def test_a_cookie_is_valid_until_it_expires_and_only_unaltered_and_under_its_key() -> None:
    signer = Signer(KEY, 3600)
    cookie = signer.issue(now=1000)
    assert signer.valid(cookie, now=1000 + 3599)
    assert not signer.valid(cookie, now=1000 + 3601)
    expiry, nonce, mac = cookie.split(".")
    assert not signer.valid(f"{int(expiry) + 999999}.{nonce}.{mac}", now=1000)  # a longer life is not signed
    assert not Signer("another-key", 3600).valid(cookie, now=1000)  # a changed API key ends every session
    for junk in (None, "", "a.b", "x.y.z", cookie + ".", KEY):
        assert not signer.valid(junk, now=1000)
    assert signer.csrf_ok(cookie, signer.csrf(cookie))
    assert not signer.csrf_ok(cookie, signer.csrf(signer.issue(now=1000)))  # another session's token
    assert not signer.csrf_ok(cookie, None) and not signer.csrf_ok(cookie, "")
    assert KEY not in cookie


def test_without_an_api_key_the_console_is_open() -> None:
    signer = Signer("", 3600)
    assert signer.open and signer.valid(None) and not signer.key_matches("")


def make_client(key: str = KEY, **console: object) -> Iterator[TestClient]:
    runtime = MemoryRuntime()
    runtime.add("sb-1", "Running", {"team": "a"}, 0)
    config = Config.model_validate({"server": {"apiKey": key}, "console": console})
    # HTTPS: a Secure cookie is sent back only there (or to loopback, as browsers do).
    with TestClient(create_app(config, runtime), base_url="https://testserver") as client:
        yield client


@pytest.fixture
def client() -> Iterator[TestClient]:
    yield from make_client()


def logged_in(client: TestClient) -> str:
    response = client.post("/console/login", data={"api_key": KEY}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/"
    return response.headers["set-cookie"]


def test_nothing_without_a_login(client: TestClient) -> None:
    page = client.get("/console", follow_redirects=False)
    assert (page.status_code, page.headers["location"]) == (303, "/console/login")
    sandbox = "/console/api/sandboxes/sb-1"
    for path in ("/console/api/session", "/console/api/sandboxes", sandbox, f"{sandbox}/endpoints/44772",
                 f"{sandbox}/diagnostics/logs", f"{sandbox}/diagnostics/events"):  # fmt: skip
        refused = client.get(path)
        assert refused.status_code == 401 and refused.json()["code"] == "MISSING_API_KEY"
        assert "sb-1" not in refused.text
    # The API key header is not a console session: the console is for browsers.
    assert client.get("/console/api/sandboxes", headers={"OPEN-SANDBOX-API-KEY": KEY}).status_code == 401
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/console/api/sandboxes/sb-1/terminal"):
        pass
    assert closed.value.code == 1008


def test_login_sets_a_strict_http_only_cookie_and_never_the_key(client: TestClient) -> None:
    wrong = client.post("/console/login", data={"api_key": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers and "Wrong API key." in wrong.text
    cookie = logged_in(client)
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/console" in cookie.lower() and KEY not in cookie
    listed = client.get("/console/api/sandboxes")
    assert [s["id"] for s in listed.json()["items"]] == ["sb-1"]


def test_a_login_from_another_site_or_with_a_huge_body_is_refused(client: TestClient) -> None:
    foreign = client.post("/console/login", data={"api_key": KEY}, headers={"origin": "http://evil.example"})
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    assert client.post("/console/login", content=b"api_key=" + b"k" * 10000).status_code == 413


def test_changes_need_the_csrf_token_and_this_origin(client: TestClient) -> None:
    logged_in(client)
    token = client.get("/console/api/session").json()["csrf"]
    renew = "/console/api/sandboxes/sb-1/renew"
    assert client.post(renew, json={"seconds": 60}).status_code == 403
    assert client.post(renew, json={"seconds": 60}, headers={"x-console-csrf": "0" * 32}).status_code == 403
    foreign = {"x-console-csrf": token, "origin": "http://evil.example"}
    assert client.post(renew, json={"seconds": 60}, headers=foreign).status_code == 403
    own = {"x-console-csrf": token, "origin": "https://testserver"}
    for bad in ({"seconds": 0}, {"seconds": "60"}, {"seconds": True}, [60]):
        refused = client.post(renew, json=bad, headers=own)
        assert refused.status_code == 400 and refused.json()["code"] == "SANDBOX::INVALID_PARAMETER"
    assert client.post(renew, json={"seconds": 60}, headers=own).status_code == 200
    assert client.post("/console/api/sandboxes/nope/renew", json={"seconds": 60}, headers=own).status_code == 404
    assert client.post("/console/logout", headers=own).status_code == 204
    assert COOKIE not in client.cookies


def test_every_console_response_has_the_csp(client: TestClient) -> None:
    for path in ("/console/login", "/console/static/console.js", "/console/api/session"):
        response = client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp, path
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in client.get("/health").headers


def test_endpoints_name_their_headers_and_never_show_their_values(client: TestClient) -> None:
    logged_in(client)
    base = "/console/api/sandboxes/sb-1/endpoints"
    direct = client.get(f"{base}/44772").json()  # the runtime's answer carries {"X-Token": "t"}
    assert direct == {"port": 44772, "endpoint": "10.0.0.1:44772", "headerNames": ["X-Token"], "expiresAt": None}
    client.app.state.runtime.sandboxes["sb-1"].secure_access = True  # type: ignore[attr-defined]
    proxied = client.get(f"{base}/8080", params={"use_server_proxy": "true"})
    api = client.get("/v1/sandboxes/sb-1/endpoints/8080?use_server_proxy=true", headers={"OPEN-SANDBOX-API-KEY": KEY})
    token = api.json()["headers"]
    assert proxied.json()["endpoint"] == "testserver/sandboxes/sb-1/proxy/8080"
    assert proxied.json()["headerNames"] == [SECURE_ACCESS_HEADER] and token[SECURE_ACCESS_HEADER] not in proxied.text
    signed = client.get(f"{base}/8080", params={"expiresIn": "600"}).json()
    assert signed["endpoint"].startswith("testserver/sandboxes/sb-1/signed/8080/") and signed["headerNames"] == []
    assert abs(dt.datetime.fromisoformat(signed["expiresAt"]).timestamp() - (time.time() + 600)) < 5
    too_long = client.get(f"{base}/8080", params={"expiresIn": str(8 * 86400)})
    assert too_long.status_code == 400 and too_long.json()["code"] == "SANDBOX::INVALID_EXPIRATION"
    for bad in (f"{base}/0", f"{base}/8080?expiresIn=0", f"{base}/8080?expiresIn=soon"):
        assert client.get(bad).status_code == 400, bad
    assert client.get("/console/api/sandboxes/nope/endpoints/8080").status_code == 404


def test_diagnostics_are_the_apis_plain_text(client: TestClient) -> None:
    logged_in(client)
    client.app.state.runtime.output = "<script>alert(1)</script>\nlast line\n"  # type: ignore[attr-defined]
    logs = client.get("/console/api/sandboxes/sb-1/diagnostics/logs", params={"tail": "1"})
    assert logs.text == "last line\n" and logs.headers["content-type"].startswith("text/plain")
    everything = client.get("/console/api/sandboxes/sb-1/diagnostics/logs")
    assert everything.text.startswith("<script>") and everything.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in everything.headers["content-security-policy"]
    assert everything.headers["cache-control"] == "no-store"
    events = client.get("/console/api/sandboxes/sb-1/diagnostics/events")
    assert "ContainerStarted: from the engine" in events.text
    assert client.get("/console/api/sandboxes/sb-1/diagnostics/logs", params={"tail": "0"}).status_code == 400
    assert client.get("/console/api/sandboxes/nope/diagnostics/events").status_code == 404


def test_static_files_stay_in_their_directory(client: TestClient) -> None:
    for path in ("/console/static/../routes.py", "/console/static/%2e%2e/routes.py", "/console/static/..%2fsession.py"):
        assert client.get(path).status_code == 404, path


def test_the_switches() -> None:
    for client in make_client(enabled=False):
        assert client.get("/console").status_code == 404
        assert client.get("/console/static/console.js").status_code == 404
    for client in make_client(terminal=False):
        logged_in(client)
        assert client.get("/console/api/session").json()["terminal"] is False
        with (
            pytest.raises(WebSocketDisconnect) as closed,
            client.websocket_connect("/console/api/sandboxes/sb-1/terminal"),
        ):
            pass
        assert closed.value.code == 1008
    for client in make_client(key=""):  # an open server: an open console, no login page
        assert client.get("/console").status_code == 200
        assert client.get("/console/login", follow_redirects=False).headers["location"] == "/console/"
        assert client.get("/console/api/session").json()["open"] is True
    for client in make_client(secureCookie=False):
        assert "secure" not in logged_in(client).lower()


class HostileExecd(http.server.BaseHTTPRequestHandler):
    """What a sandbox that replaced its execd may answer the console."""

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if "nope" in self.path:
            self.reply(404, "application/json", b'{"code": "FILE_NOT_FOUND", "message": "no such file"}')
        elif path == "/directories/list" and "huge" in self.path:
            self.reply(200, "application/json", b"[" + b'{"path": "/x"},' * 400_000 + b"{}]")
        elif path == "/directories/list":
            entries = [{"path": "/a", "type": "script", "size": "9", "extra": "<b>"}, "junk", {"path": 7}]
            self.reply(200, "application/json", json.dumps(entries).encode())
        elif path == "/metrics":
            self.reply(200, "application/json", json.dumps({"cpu_count": "<script>", "cpu_used_pct": 1}).encode())
        elif path == "/files/download":
            self.reply(200, "text/html", b"<script>alert(1)</script>", {"content-disposition": "inline"})
        else:
            self.reply(500, "text/plain", b"?")

    def reply(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None: ...


@pytest.fixture
def hostile() -> Iterator[TestClient]:
    execd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileExecd)
    threading.Thread(target=execd.serve_forever, daemon=True).start()
    runtime = MemoryRuntime()
    runtime.add("sb-1", "Running", {}, 0)
    port = execd.server_address[1]

    async def upstream(sandbox_id: str, _: int) -> Endpoint:
        await runtime.get(sandbox_id)
        return Endpoint(f"127.0.0.1:{port}")

    runtime.upstream = upstream  # type: ignore[method-assign]
    config = Config.model_validate({"server": {"apiKey": KEY}})
    try:
        with TestClient(create_app(config, runtime), base_url="https://testserver") as client:
            logged_in(client)
            yield client
    finally:
        execd.shutdown()


def test_what_a_hostile_execd_answers_is_capped_checked_and_never_rendered(hostile: TestClient) -> None:
    listing = hostile.get("/console/api/sandboxes/sb-1/files", params={"path": "/"}).json()
    assert listing["entries"] == [{"path": "/a", "type": "other", "size": None, "modifiedAt": None, "mode": None}]
    huge = hostile.get("/console/api/sandboxes/sb-1/files", params={"path": "/huge"})
    assert huge.status_code == 502 and huge.json()["code"] == "BACKEND_RESPONSE_FAILED"
    assert hostile.get("/console/api/sandboxes/sb-1/resources").status_code == 502
    missing = hostile.get("/console/api/sandboxes/sb-1/files", params={"path": "/nope"})
    assert missing.status_code == 404  # execd's own 4xx is passed on, as {code, message}
    download = hostile.get("/console/api/sandboxes/sb-1/files/download", params={"path": "/x/<evil>.html"})
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"] == 'attachment; filename="_evil_.html"'
    assert download.headers["x-content-type-options"] == "nosniff"
    assert hostile.get("/console/api/sandboxes/nope/resources").status_code == 404
