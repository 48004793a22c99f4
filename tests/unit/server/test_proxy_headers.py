"""What the proxy relays of a sandbox's response headers."""

from __future__ import annotations

import httpx

from opensandbox_platform.server.proxy import ISOLATED_PAGE, _response_headers


def response(*headers: tuple[str, str]) -> httpx.Response:
    return httpx.Response(200, headers=list(headers))


def test_each_cookie_is_relayed_on_its_own_but_not_the_servers() -> None:
    got = _response_headers(
        response(("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2"), ("Set-Cookie", "osb_console=forged")),
        "/v1/sandboxes/x/proxy/80",
        isolate=False,
        protected_cookies=frozenset({"osb_console"}),
    )
    assert [v for k, v in got if k == "set-cookie"] == ["a=1; Path=/", "b=2"]


def test_redirects_stay_in_the_prefix_and_hop_by_hop_headers_go() -> None:
    got = dict(
        _response_headers(
            response(("Location", "/next"), ("Connection", "close"), ("X-App", "1")), "/p", False, frozenset()
        )
    )
    assert got == {"location": "/p/next", "x-app": "1"}


def test_isolation_adds_a_sandboxing_policy_next_to_the_pages_own() -> None:
    got = _response_headers(response(("Content-Security-Policy", "default-src 'self'")), "/p", True, frozenset())
    assert [v for k, v in got if k == "content-security-policy"] == ["default-src 'self'", ISOLATED_PAGE]
