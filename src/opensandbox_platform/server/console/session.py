"""The console's login: a signed session cookie and the CSRF token that goes with it (pure logic).

The API key is typed once on the login page; the browser then holds only a cookie
`<expiry>.<nonce>.<mac>` (HttpOnly, SameSite=Strict, Path=/console, Secure unless configured off),
signed with a key derived from the API key. Nothing is stored on the server, so every replica
accepts it, and changing the API key ends every session. The CSRF token is derived from the cookie:
the page reads it from `/console/api/session` (same origin only) and sends it in a header with each
state-changing call, which a cross-site form or `fetch` cannot do.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

COOKIE = "osb_console"
CSRF_HEADER = "x-console-csrf"


class Signer:
    def __init__(self, api_key: str, lifetime_seconds: float) -> None:
        # Without an API key the server is open and so is the console; a per-process secret still
        # makes CSRF tokens nobody outside a page of this server can know.
        secret = api_key.encode() if api_key else secrets.token_bytes(32)
        self.key = hmac.new(secret, b"opensandbox-console-session", hashlib.sha256).digest()
        self.api_key = api_key
        self.lifetime = lifetime_seconds

    @property
    def open(self) -> bool:
        """No API key configured: the console needs no login (as the API needs no key)."""
        return not self.api_key

    def key_matches(self, given: str) -> bool:
        return bool(self.api_key) and hmac.compare_digest(given.encode(), self.api_key.encode())

    def _mac(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        expiry = int((now or time.time()) + self.lifetime)
        payload = f"{expiry}.{secrets.token_hex(16)}"
        return f"{payload}.{self._mac(payload)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        if self.open:
            return True
        if not cookie or cookie.count(".") != 2:
            return False
        expiry, nonce, mac = cookie.split(".")
        if not expiry.isdigit() or not hmac.compare_digest(mac, self._mac(f"{expiry}.{nonce}")):
            return False
        return int(expiry) > (now or time.time())

    def csrf(self, cookie: str | None) -> str:
        return self._mac(f"csrf.{cookie or ''}")[:32]

    def csrf_ok(self, cookie: str | None, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf(cookie), given or "")
