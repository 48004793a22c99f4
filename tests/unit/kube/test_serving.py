"""The controller's probe and metrics listener (the small daemons' HTTP server, with its limits), on
127.0.0.1: routes, 404, HEAD, a refused huge head, and metrics over TLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl

import httpx
import pytest

from opensandbox_platform.daemon.http import Limits
from opensandbox_platform.kube import serving


async def _get(url: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(**kwargs) as client:  # type: ignore[arg-type]
        return await client.get(url)


async def test_probes_answer_and_everything_else_is_404() -> None:
    ready = False
    routes = {"/healthz": serving.probe_route(lambda: True), "/readyz": serving.probe_route(lambda: ready)}
    server = await serving.serve("127.0.0.1", 0, routes, limits=Limits(max_head_bytes=2048, max_request_line=1024))
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        assert (await _get(f"{base}/healthz")).status_code == 200
        assert (await _get(f"{base}/readyz")).status_code == 503
        ready = True
        assert (await _get(f"{base}/readyz")).text == "ok\n"
        assert (await _get(f"{base}/nope")).status_code == 404
        async with httpx.AsyncClient() as client:
            head = await client.head(f"{base}/healthz")
            assert head.status_code == 200 and head.content == b""
            assert (await client.post(f"{base}/healthz")).status_code == 404
            huge = await client.get(f"{base}/healthz", headers={"x-big": "a" * 4096})
            assert huge.status_code == 431
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="self-signed certificates need openssl")
async def test_metrics_over_tls() -> None:
    context = serving.self_signed_context()
    server = await serving.serve("127.0.0.1", 0, {"/metrics": serving.metrics_route(None)}, context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
    try:
        response = await _get(url, verify=False)
        assert response.status_code == 200 and "python_info" in response.text
        with pytest.raises(httpx.HTTPError):
            await _get(url.replace("https", "http"), timeout=2)
    finally:
        server.close()
        await asyncio.sleep(0)
    assert isinstance(context, ssl.SSLContext)
