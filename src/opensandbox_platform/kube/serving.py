"""The controller's small HTTP endpoints: health probes (:8081) and Prometheus metrics (:8443).

The small daemons' HTTP/1.1 server (daemon/http.py: GET and HEAD here) instead of a web framework:
it runs in every controller replica under a 128Mi limit, and brings the same listener limits as
execd's (head size and time, idle connections, a connection cap; `--max-connections`,
`--header-timeout`, ... of the controller). Metrics are served over HTTPS with
Kubernetes authentication and authorization when `secure` (as kubebuilder projects do): the
caller's bearer token goes through a TokenReview, then a SubjectAccessReview for `get` on the
non-resource URL `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opensandbox_platform.daemon.http import AnyResponse, HttpServer, Limits, Request
from opensandbox_platform.daemon.http import Response as HttpResponse
from opensandbox_platform.kube.client import SUBJECT_ACCESS_REVIEWS, TOKEN_REVIEWS, KubeClient

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[dict[str, str]], Awaitable[Response]]
REASONS = {
    200: "OK",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def split_address(address: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """`:8081` / `127.0.0.1:8081` / `0` (disabled) → (host, port)."""
    host, _, port = address.rpartition(":")
    return (host or default_host), int(port)


async def serve(
    host: str,
    port: int,
    routes: dict[str, Route],
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
) -> asyncio.Server:
    async def dispatch(request: Request) -> AnyResponse:
        route = routes.get(request.path)
        if request.method not in ("GET", "HEAD") or route is None:
            return HttpResponse(b"not found\n", 404, content_type="text/plain")
        status, ctype, body = await route(request.headers)
        return HttpResponse(body, status, content_type=ctype)

    return await HttpServer(dispatch, limits).start(host, port, ssl=ssl_context)


def self_signed_context(host_name: str = "opensandbox-controller-metrics") -> ssl.SSLContext:
    """A serving certificate made at start-up, as controller-runtime does without --metrics-cert-dir."""
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "365",
                "-subj",
                f"/CN={host_name}",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    return context


def tls_context(cert_dir: str | None) -> ssl.SSLContext:
    if cert_dir:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(Path(cert_dir, "tls.crt"), Path(cert_dir, "tls.key"))
        return context
    return self_signed_context()


@dataclass
class MetricsAuth:
    """Authenticates with TokenReview and authorizes with SubjectAccessReview; caches answers briefly."""

    client: KubeClient
    ttl: float = 60.0
    _cache: dict[str, tuple[float, int]] = field(default_factory=dict)

    async def check(self, headers: dict[str, str]) -> int:
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return 401
        token = auth[7:].strip()
        cached = self._cache.get(token)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        status = await self._review(token)
        # Grants are cached for `ttl`; denials only briefly, so a new RoleBinding takes effect quickly.
        self._cache[token] = (time.monotonic() + (self.ttl if status == 200 else 5.0), status)
        return status

    async def _review(self, token: str) -> int:
        review = await self.client.create(
            TOKEN_REVIEWS,
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
        )
        result = review.get("status", {})
        if not result.get("authenticated"):
            return 401
        user = result.get("user", {})
        access = await self.client.create(
            SUBJECT_ACCESS_REVIEWS,
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user.get("username"),
                    "uid": user.get("uid"),
                    "groups": user.get("groups", []),
                    "extra": user.get("extra", {}),
                    "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
                },
            },
        )
        return 200 if access.get("status", {}).get("allowed") else 403


def metrics_route(auth: MetricsAuth | None) -> Route:
    async def metrics(headers: dict[str, str]) -> Response:
        if auth is not None:
            try:
                status = await auth.check(headers)
            except Exception as err:
                log.warning("metrics auth failed: %s", err)
                status = 500
            if status != 200:
                return status, "text/plain", f"{REASONS[status].lower()}\n".encode()
        return 200, CONTENT_TYPE_LATEST, generate_latest()

    return metrics


def probe_route(check: Callable[[], bool]) -> Route:
    async def probe(_: dict[str, str]) -> Response:
        return (200, "text/plain", b"ok\n") if check() else (503, "text/plain", b"not ready\n")

    return probe
